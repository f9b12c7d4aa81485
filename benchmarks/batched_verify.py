"""Study: verifying several rows' drafts in one target call, each row with its own number of positions.

ONNX Runtime 1.32's CPU GroupQueryAttention refuses batch > 1 for several new positions over a past, but
takes them at batch 1. `row_split` rewrites a builder target graph so that one call runs the projections,
MLPs and lm_head over all rows' new positions at once (one flat [1, N] sequence) while attention stays
GroupQueryAttention, once per row slot at batch 1, on that row's slice of the positions and its own row of
the shared KV buffer, written in place as before (no copies, rollback stays O(1)). Slot r takes its own
past/present pair per layer (`row{r}.` + the usual names); `row_starts`/`row_ends` [R] pick each slot's
positions, `seqlens_k`/`row_totals` [R] its lengths, `row_order` [N] drops the one position an idle
slot attends with (GroupQueryAttention refuses zero), and an idle slot is bound to a one-position scratch
buffer, so it writes nothing in a row.

For the target of PACKAGE, with each row's cache prefilled to about `--context` positions, this prints each
row's largest logit difference against its verify alone (all rows with n positions, then rows with
different numbers), then the median cost of today's calls (batch-1 verifies, the batched one-token step,
one row's call of m positions) and of the row-split graph's, interleaved, relative to one step of one row.
`--attention` instead times one layer's attention of 4 rows x 5 new positions (SmolLM2's heads) as ONNX's
standard Attention (opset 23, batch 4, over a slice of the buffer) and as 4 batch-1 GroupQueryAttentions.

    python benchmarks/batched_verify.py PACKAGE [--rows 4] [--positions 5] [--context 200] [--clock cpu]
    python benchmarks/batched_verify.py --tiny      # a random fp32 builder graph
    python benchmarks/batched_verify.py --attention
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ortspec.runtime.model.session import session_options
from ortspec.runtime.package import graph_names as names

from common import load_average

STARTS, ENDS, TOTALS, ORDER = "row_starts", "row_ends", "row_totals", "row_order"
Calls = dict[int, tuple[list[int], int]]  # row -> (new tokens, positions already cached)


def row_name(r: int, name: str) -> str:
    return f"row{r}.{name}"


def int64(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], values))


def row_split(model: onnx.ModelProto, rows: int) -> onnx.ModelProto:
    """`model` (a builder target graph, fused qkv) with each GroupQueryAttention split into `rows` batch-1 ones."""
    graph = model.graph
    nodes = [int64("axis0", [0]), int64("axis1", [1])]
    for r in range(rows):  # each slot's start, end, seqlens_k and total, [1] each
        nodes += [int64(f"row{r}.lo", [r]), int64(f"row{r}.hi", [r + 1])]
        for source in (STARTS, ENDS, names.SEQLENS_K, TOTALS):
            nodes.append(helper.make_node("Slice", [source, f"row{r}.lo", f"row{r}.hi", "axis0"], [f"row{r}.{source}"]))
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        if node.input[1] or node.input[2]:
            raise ValueError("the study splits fused-qkv attention only (no q/k norms)")
        outs = []
        for r in range(rows):
            sliced, out = f"{node.name}.row{r}.qkv", f"{node.name}.row{r}.out"
            bounds = [f"row{r}.{STARTS}", f"row{r}.{ENDS}"]
            nodes.append(helper.make_node("Slice", [node.input[0], *bounds, "axis1"], [sliced]))
            lengths = [f"row{r}.{names.SEQLENS_K}", f"row{r}.{TOTALS}"]
            pasts = [row_name(r, x) for x in node.input[3:5]]
            attention = helper.make_node(
                "GroupQueryAttention",
                [sliced, "", "", *pasts, *lengths, *node.input[7:]],
                [out, *(row_name(r, x) for x in node.output[1:])],
                name=f"{node.name}.row{r}",
                domain=node.domain,
            )
            attention.attribute.extend(node.attribute)
            nodes.append(attention)
            outs.append(out)
        nodes.append(helper.make_node("Concat", outs, [f"{node.name}.joined"], axis=1))
        nodes.append(helper.make_node("Gather", [f"{node.name}.joined", ORDER], [node.output[0]], axis=1))
    inputs, outputs = [], []
    for value in graph.input:
        if value.name.startswith(names.PAST_PREFIX):
            inputs += [per_row(value, r) for r in range(rows)]
        elif value.name == names.SEQLENS_K:
            ints = ((STARTS, TensorProto.INT64), (ENDS, TensorProto.INT64), (TOTALS, TensorProto.INT32))
            inputs += [helper.make_tensor_value_info(n, t, [rows]) for n, t in ints]
            inputs.append(helper.make_tensor_value_info(names.SEQLENS_K, TensorProto.INT32, [rows]))
            inputs.append(helper.make_tensor_value_info(ORDER, TensorProto.INT64, ["positions"]))
        elif value.name != names.TOTAL_SEQUENCE_LENGTH:
            inputs.append(value)
    for value in graph.output:
        outputs += [per_row(value, r) for r in range(rows)] if value.name.startswith("present.") else [value]
    split = helper.make_graph(nodes, graph.name, inputs, outputs, list(graph.initializer))
    out = helper.make_model(split, opset_imports=list(model.opset_import), producer_name="ortspec")
    out.ir_version = model.ir_version
    return out


def per_row(value: onnx.ValueInfoProto, r: int) -> onnx.ValueInfoProto:
    """A cache input/output of slot r: one row of the buffer."""
    dims = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
    return helper.make_tensor_value_info(row_name(r, value.name), value.type.tensor_type.elem_type, [1, *dims[1:]])


class Buffers:
    """The shared KV buffer [rows, kv_heads, positions, head_dim] per past input, and a one-position scratch."""

    def __init__(self, session: ort.InferenceSession, rows: int, max_length: int) -> None:
        self.pasts = [i.name for i in session.get_inputs() if i.name.startswith(names.PAST_PREFIX)]
        shape = session.get_inputs()[-1].shape
        self.arrays = [np.zeros((rows, shape[1], max_length, shape[3]), np.float32) for _ in self.pasts]
        self.scratch = [np.zeros((1, shape[1], 1, shape[3]), np.float32) for _ in self.pasts]


def bind_in_place(binding: ort.IOBinding, past: str, array: np.ndarray) -> None:
    present = past.replace(names.PAST_PREFIX, "present.")
    binding.bind_input(past, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    binding.bind_output(present, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


def run(session: ort.InferenceSession, binding: ort.IOBinding, inputs: dict[str, np.ndarray]) -> np.ndarray:
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    binding.bind_cpu_input(names.LOGITS_TO_KEEP, np.array([0], np.int64))
    binding.bind_output(names.HIDDEN_STATES, "cpu")
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()  # logits: bound first


def today(session: ort.InferenceSession, buffers: Buffers, tokens: np.ndarray, lengths: list[int], row: int = 0):
    """Today's graph: rows [row, row + len(tokens)) with tokens [rows, n] (n > 1: one row), logits [rows, n, vocab]."""
    binding = session.io_binding()
    binding.bind_output(names.LOGITS, "cpu")
    for past, array in zip(buffers.pasts, buffers.arrays, strict=True):
        bind_in_place(binding, past, array[row : row + len(tokens)])
    seqlens = np.array([length + tokens.shape[1] - 1 for length in lengths], np.int32)
    total = np.array(seqlens.max() + 1, np.int32)
    inputs = {names.INPUT_IDS: tokens, names.SEQLENS_K: seqlens, names.TOTAL_SEQUENCE_LENGTH: total}
    return run(session, binding, inputs)


def split_call(session: ort.InferenceSession, buffers: Buffers, slots: int, calls: Calls) -> list[np.ndarray]:
    """The row-split graph on `calls`; each call's logits [its tokens, vocab], in row order."""
    binding = session.io_binding()
    binding.bind_output(names.LOGITS, "cpu")
    flat: list[int] = []
    starts, ends, seqlens, totals, order = [], [], [], [], []
    for r in range(slots):
        tokens, length = calls.get(r, ([], 0))
        for past, array, scratch in zip(buffers.pasts, buffers.arrays, buffers.scratch, strict=True):
            bind_in_place(binding, row_name(r, past), array[r : r + 1] if tokens else scratch)
        done = sum(e - s for s, e in zip(starts, ends, strict=True))  # positions of the slots before this one
        order += range(done, done + len(tokens))
        starts.append(len(flat) if tokens else 0)
        flat += tokens
        ends.append(len(flat) if tokens else 1)
        seqlens.append(length + len(tokens) - 1 if tokens else 0)
        totals.append(length + len(tokens) if tokens else 1)
    inputs = {
        names.INPUT_IDS: np.array([flat], np.int64),
        STARTS: np.array(starts, np.int64),
        ENDS: np.array(ends, np.int64),
        names.SEQLENS_K: np.array(seqlens, np.int32),
        TOTALS: np.array(totals, np.int32),
        ORDER: np.array(order, np.int64),
    }
    logits = run(session, binding, inputs)[0]
    bounds = np.cumsum([0] + [len(calls[r][0]) for r in sorted(calls)])
    return [logits[a:b] for a, b in itertools.pairwise(bounds)]


def load(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def timed(cases: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median ms of each case, the cases interleaved. Each timed call follows an untimed one of the same case:
    a call right after the other session's runs slower (its weights were evicted from the caches), and a
    server runs one session."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            case()
            start = clock()
            case()
            samples[name].append((clock() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def study(target_onnx: Path, args: argparse.Namespace) -> None:
    split_path = target_onnx.with_name(f"row_split{args.rows}.onnx")
    onnx.save(row_split(onnx.load(str(target_onnx), load_external_data=False), args.rows), str(split_path))
    before = rss_mb()
    plain = load(target_onnx, args.threads)
    middle = rss_mb()
    split = load(split_path, args.threads)
    added = (middle - before, rss_mb() - middle)
    print(f"RSS added: {added[0]:.0f} MB by today's session, {added[1]:.0f} MB by the row-split one")
    rows, n, ctx = args.rows, args.positions, args.context
    vocab = int(next(o for o in plain.get_outputs() if o.name == names.LOGITS).shape[-1])
    rng = np.random.default_rng(0)
    ids = lambda *shape: rng.integers(10, min(1000, vocab), size=shape)  # noqa: E731
    lengths = [ctx - 3 * r for r in range(rows)]
    ours, theirs = Buffers(plain, rows, ctx + 64), Buffers(plain, rows, ctx + 64)
    for r in range(rows):  # each row's cache: a prompt of random tokens, prefilled alone
        today(plain, ours, ids(1, lengths[r]), [0], r)
    for a, b in zip(ours.arrays, theirs.arrays, strict=True):
        b[...] = a
    tokens = ids(rows, n)
    for counts in ([n] * rows, [n - r % n for r in range(rows)]):
        shared = split_call(split, theirs, rows, {r: (list(tokens[r, : counts[r]]), lengths[r]) for r in range(rows)})
        for r in range(rows):
            alone = today(plain, ours, tokens[r : r + 1, : counts[r]], [lengths[r]], r)[0]
            diff = float(np.abs(alone - shared[r]).max())
            print(f"row {r}, {counts[r]} positions: max |logit difference| to its verify alone {diff:.2e}")

    def verify(r: int, m: int = n) -> Callable[[], object]:
        return lambda: today(plain, ours, tokens[r : r + 1, :m], [lengths[r]], r)

    def shared_call(counts: dict[int, int]) -> Callable[[], object]:
        calls = {r: (list(tokens[r, :m]), lengths[r]) for r, m in counts.items()}
        return lambda: split_call(split, theirs, rows, calls)

    cases: dict[str, Callable[[], object]] = {
        "today: step of 1 row": verify(0, 1),
        f"today: batched step of {rows} rows": lambda: today(plain, ours, tokens[:, :1], lengths),
        f"today: 1 verify of {n}, batch 1": verify(0),
        f"today: {rows} verifies of {n}, batch 1 each": lambda: [verify(r)() for r in range(rows)],
        f"today: 1 verify of {n}, then {rows - 1} rows' step": lambda: (
            verify(0)(),
            today(plain, ours, tokens[1:, :1], lengths[1:], 1),
        ),
        f"split: {rows} rows x {n}": shared_call(dict.fromkeys(range(rows), n)),
        f"split: {rows} rows x 1": shared_call(dict.fromkeys(range(rows), 1)),
        "split: 1 row x 1, the rest idle": shared_call({0: 1}),
        f"split: 1 row x {n}, the rest idle": shared_call({0: n}),
        f"split: 1 row x {n} + {rows - 1} rows x 1": shared_call({r: n if r == 0 else 1 for r in range(rows)}),
    }
    for m in sorted({2, 3, 4, 8, 12, 2 * n, rows * n} - {n}):  # one row's call of m positions: their marginal cost
        extra = ids(1, m)
        cases[f"today: 1 row x {m}, batch 1"] = lambda extra=extra: today(plain, ours, extra, [lengths[0]])
    costs = timed(cases, args.repeats, time.process_time if args.clock == "cpu" else time.perf_counter)
    print(f"\ncontext {ctx}, {args.threads} threads, {args.clock} ms, medians of {args.repeats}; load {load_average()}")
    for name, cost in costs.items():
        print(f"{name:<42}{cost:>9.2f} ms {cost / costs['today: step of 1 row']:>6.2f} x t(1)")


def attention_costs(args: argparse.Namespace) -> None:
    """One layer's attention, 4 rows x 5 new positions over 200 cached, SmolLM2's heads (9 q, 3 kv, 64)."""
    rows, new, q_heads, kv_heads, dim, past, length = 4, 5, 9, 3, 64, 200, 264
    vi = helper.make_tensor_value_info
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]

    def session(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str]):
        graph = helper.make_graph(nodes, "attention", inputs, [vi(o, f32, None) for o in outputs])
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        return ort.InferenceSession(model.SerializeToString(), session_options(args.threads))

    standard = session(  # the buffer's first `past` positions (a Slice: a copy), present = concat(past, new)
        [
            *(int64(n, [v]) for n, v in (("zero", 0), ("past", past), ("axis2", 2))),
            *(helper.make_node("Slice", [f"buffer.{x}", "zero", "past", "axis2"], [f"past.{x}"]) for x in "kv"),
            helper.make_node(
                "Attention",
                ["q", "k", "v", "mask", "past.k", "past.v"],
                ["out", "present.k", "present.v"],
                q_num_heads=q_heads,
                kv_num_heads=kv_heads,
            ),
        ],
        [
            vi("q", f32, [rows, new, q_heads * dim]),
            *(vi(x, f32, [rows, new, kv_heads * dim]) for x in "kv"),
            vi("mask", f32, [rows, 1, new, past + new]),
            *(vi(f"buffer.{x}", f32, [rows, kv_heads, length, dim]) for x in "kv"),
        ],
        ["out", "present.k", "present.v"],
    )
    split_nodes: list[onnx.NodeProto] = [int64("axis1", [1])]
    split_inputs = [vi("qkv", f32, [1, rows * new, (q_heads + 2 * kv_heads) * dim]), vi("seqlens", i32, [1])]
    split_inputs += [vi("total", i32, [1]), *(vi(x, f32, [length, dim // 2]) for x in ("cos", "sin"))]
    for r in range(rows):
        split_nodes += [int64(f"lo{r}", [r * new]), int64(f"hi{r}", [(r + 1) * new])]
        split_nodes.append(helper.make_node("Slice", ["qkv", f"lo{r}", f"hi{r}", "axis1"], [f"qkv{r}"]))
        split_nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [f"qkv{r}", "", "", f"past.k{r}", f"past.v{r}", "seqlens", "total", "cos", "sin"],
                [f"out{r}", f"present.k{r}", f"present.v{r}"],
                domain="com.microsoft",
                num_heads=q_heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
            )
        )
        split_inputs += [vi(f"past.{x}{r}", f32, [1, kv_heads, length, dim]) for x in "kv"]
    split_nodes.append(helper.make_node("Concat", [f"out{r}" for r in range(rows)], ["out"], axis=1))
    presents = [f"present.{x}{r}" for r in range(rows) for x in "kv"]
    per_row_session = session(split_nodes, split_inputs, ["out", *presents])
    rng = np.random.default_rng(0)
    data = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feed = {"q": data(rows, new, q_heads * dim), **{x: data(rows, new, kv_heads * dim) for x in "kv"}}
    feed |= {"mask": np.zeros((rows, 1, new, past + new), np.float32)}
    feed |= {"buffer.k": data(rows, kv_heads, length, dim), "buffer.v": data(rows, kv_heads, length, dim)}
    buffers = {x: data(rows, kv_heads, length, dim) for x in "kv"}
    binding = per_row_session.io_binding()
    for r in range(rows):
        for x in "kv":
            row = buffers[x][r : r + 1]
            binding.bind_input(f"past.{x}{r}", "cpu", 0, np.float32, list(row.shape), row.ctypes.data)
            binding.bind_output(f"present.{x}{r}", "cpu", 0, np.float32, list(row.shape), row.ctypes.data)
    binding.bind_cpu_input("qkv", data(1, rows * new, (q_heads + 2 * kv_heads) * dim))
    binding.bind_cpu_input("seqlens", np.array([past + new - 1], np.int32))
    binding.bind_cpu_input("total", np.array([past + new], np.int32))
    for x in ("cos", "sin"):
        binding.bind_cpu_input(x, data(length, dim // 2))
    binding.bind_output("out", "cpu")
    cases: dict[str, Callable[[], object]] = {
        "ONNX Attention, batch 4, over a slice of the buffer": lambda: standard.run(None, feed),
        "4 GroupQueryAttention, batch 1, in place": lambda: per_row_session.run_with_iobinding(binding),
    }
    costs = timed(cases, args.repeats * 10, time.perf_counter)
    print(f"one layer, {rows} rows x {new} new over {past}, {args.threads} threads, load {load_average()}")
    for name, cost in costs.items():
        print(f"{name:<55}{cost * 1e3:>8.0f} µs")


def tiny(args: argparse.Namespace) -> None:
    from ortspec.export import export_pair
    from ortspec.models.random import make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="ortspec-batched-verify-"))
    checkpoint = make_checkpoint(work / "target", "llama", hidden=64, layers=2, heads=4, kv_heads=2, std=0.3)
    export_pair(checkpoint, work / "pkg", quantize="none", exporter="builder", force=True, report=lambda *a: None)
    study(work / "pkg" / "target" / "model.onnx", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, nargs="?")
    parser.add_argument("--tiny", action="store_true", help="a random fp32 builder graph instead of a package")
    parser.add_argument("--attention", action="store_true", help="one layer: ONNX Attention vs batch-1 GQAs")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--positions", type=int, default=5, help="positions per verify: γ + 1")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu", help="cpu: this process's CPU time")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ortspec-batched-verify")
    args = parser.parse_args()
    if args.attention:
        attention_costs(args)
    elif args.tiny:
        tiny(args)
    elif args.package is None:
        parser.error("give a PACKAGE, --tiny or --attention")
    else:  # the graph beside a copy of its weights (ONNX Runtime reads external data from the graph's folder)
        args.work.mkdir(parents=True, exist_ok=True)
        for source in (args.package / "target").iterdir():
            copy = args.work / source.name
            if not copy.exists():
                copy.write_bytes(source.read_bytes())
        study(args.work / "model.onnx", args)


if __name__ == "__main__":
    main()
