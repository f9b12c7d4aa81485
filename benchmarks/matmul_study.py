"""What one call adding n positions costs per weight format: ONNX Runtime's CPU matmul operators side by side.

Speculation checks γ+1 positions in one target call; it pays only if that call costs about what a
one-position step does. The projections dominate the call, so this times one projection-sized
weight (2048 x 5632 by default; cache-resident) and a chain of such weights (alternating
K x N and N x K, 139 MB as int4 at 24: far beyond the caches, as in a real step) at n rows, for
every weight format ONNX Runtime's CPU provider offers:

    nbits4-b{32,128}-l{0,4}  MatMulNBits, int4 blocks, accuracy_level 0 (fp32 compute) or 4 (int8 compute)
    nbits8-b32-l{0,4}        MatMulNBits with bits=8
    dqmm-int8                DynamicQuantizeMatMul: int8 weights per column, MLAS's int8 GEMM (QGEMM)
    rowq-int8                int8 activations scaled per row + MatMulInteger: the same GEMM, rows independent
    rowq2-int8               the same with each row's rounding error as a second row (the exporter's lm_head)
    mmitf-int8               DynamicQuantizeLinear + MatMulIntegerToFloat (ORT would fuse it into the above)
    dq-int8+mm               DequantizeLinear (int8, per column) + fp32 MatMul: dequantizes every call
    dq-int8-fused            the same graph as ONNX Runtime runs it by default (its QDQ pass makes it MatMulNBits)
    dq-int4+mm           DequantizeLinear (int4 blocks of 32 along K, opset 21) + MatMul: the standard ONNX
                             spelling of MatMulNBits' weights (the CPU provider's QDQ pass makes it MatMulNBits)
    fp32                     plain MatMul, fp32 weights

Timing is interleaved (every operator at one n, each repetition, then the next n) and the median of
the repetitions is reported, so load from other processes spreads over all operators alike; the load
average is printed with the results. "ran as" is the op list ONNX Runtime runs after its graph
optimisations (a fusion or constant folding would show there). Weights are random. `--provider openvino`
runs the same graphs on OpenVINO's CPU plugin through ONNX Runtime's OpenVINO execution provider (the
`onnxruntime-openvino` package, in a venv of its own) on `--threads` of OpenVINO's threads, in fp32 unless
`--openvino-config` sets OpenVINO's properties (its own default on CPUs with AMX or AVX512-BF16 is bf16).

    python benchmarks/matmul_study.py [--threads 2] [--chain 24] [--rows 1 2 4 8 16 64] [--only fp32 dqmm-int8]
    python benchmarks/matmul_study.py --provider openvino --threads 1 --clock cpu --only nbits4-b32-l4 dq-int4+mm
    python benchmarks/matmul_study.py --provider openvino \\
        --openvino-config '{"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}'
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ortspec.export.quantize.int8_gemm import RESIDUAL_CONSTANTS, ROW_CONSTANTS, row_quantized_matmul
from ortspec.runtime.model.session import session_options

from common import PROVIDERS, open_session, providers_for

MS = "com.microsoft"
# wall: elapsed time. cpu: this process's CPU time with pool threads that sleep rather than spin when idle,
# the work a call costs whatever else the machine runs (on a shared machine wall time is mostly waiting)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
Weights = list[tuple[int, int]]  # (K, N) of each matmul in the chain


@dataclass(frozen=True)
class Format:
    """One way to store the weights; `nodes` emits the graph for one matmul x [n, K] -> y [n, N]."""

    name: str
    nodes: Callable[[np.random.Generator, str, str, int, int, str], tuple[list[onnx.NodeProto], list[onnx.TensorProto]]]
    bytes_per_weight: float
    disabled: tuple[str, ...] = ()  # ONNX Runtime optimisers kept off, to time the graph as written
    in_chain: bool = True  # False: dequantizes the whole weight every call; too slow to time 24 of


def _codes(rng: np.random.Generator, shape: tuple[int, ...], bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)


def _nbits(bits: int, block: int, level: int, in_chain: bool = True) -> Format:
    """MatMulNBits with codes around its default zero point 2^(bits-1); the layout quantize.py emits."""

    def nodes(rng, x, y, k, n, tag):
        codes = _codes(rng, (n, k // block, block), bits)
        packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
        spread = (1 << bits) / np.sqrt(12)  # std of uniform codes: keeps each output at about unit scale
        scales = np.full((n, k // block), 1 / (spread * np.sqrt(k)), np.float32)
        inits = [numpy_helper.from_array(packed, f"{tag}_B"), numpy_helper.from_array(scales, f"{tag}_s")]
        node = helper.make_node(
            "MatMulNBits",
            [x, f"{tag}_B", f"{tag}_s"],
            [y],
            domain=MS,
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=level,
        )
        return [node], inits

    return Format(f"nbits{bits}-b{block}-l{level}", nodes, bits / 8 + 4 / block, in_chain=in_chain)


def _int8_weight(rng: np.random.Generator, k: int, n: int, tag: str) -> list[onnx.TensorProto]:
    """int8 [K, N] weight and one fp32 scale per output column."""
    weight = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    scale = np.full(n, 1 / (73.3 * np.sqrt(k)), np.float32)
    return [numpy_helper.from_array(weight, f"{tag}_W"), numpy_helper.from_array(scale, f"{tag}_s")]


def _dqmm(rng, x, y, k, n, tag):
    node = helper.make_node("DynamicQuantizeMatMul", [x, f"{tag}_W", f"{tag}_s"], [y], domain=MS)
    return [node], _int8_weight(rng, k, n, tag)


def _mmitf(rng, x, y, k, n, tag):
    quantized = [f"{tag}_xq", f"{tag}_xs", f"{tag}_xz"]
    return [
        helper.make_node("DynamicQuantizeLinear", [x], quantized),
        helper.make_node(
            "MatMulIntegerToFloat", [quantized[0], f"{tag}_W", quantized[1], f"{tag}_s", quantized[2]], [y], domain=MS
        ),
    ], _int8_weight(rng, k, n, tag)


def _row_quantized(residual: bool):
    """int8 activations with a scale per row (per position), so a row's result does not depend on the other
    rows of the call, unlike DynamicQuantizeMatMul's one scale for the whole input; MatMulInteger (MLAS's
    integer GEMM) and the two scales applied to its int32 output: the exporter's `--int8-kernel gemm` nodes
    (`residual`: its `--lm-head-kernel gemm` nodes, twice the rows)."""

    def nodes(rng, x, y, k, n, tag):
        constants = ROW_CONSTANTS | (RESIDUAL_CONSTANTS if residual else {})
        shared = [numpy_helper.from_array(array, name) for name, array in constants.items()]
        graph = row_quantized_matmul(tag, x, f"{tag}_W", f"{tag}_s", y, residual=residual)
        return graph, _int8_weight(rng, k, n, tag) + (shared if tag == "w0" else [])

    return nodes


def _dq_matmul(rng, x, y, k, n, tag):
    return [
        helper.make_node("DequantizeLinear", [f"{tag}_W", f"{tag}_s"], [f"{tag}_Wf"], axis=1),
        helper.make_node("MatMul", [x, f"{tag}_Wf"], [y]),
    ], _int8_weight(rng, k, n, tag)


def _dq_int4_matmul(rng, x, y, k, n, tag):
    """int4 codes [K, N] (-8..7) in blocks of 32 along K, one fp32 scale per block and column."""
    codes = rng.integers(-8, 8, size=(k, n), dtype=np.int8)
    nibbles = (codes.reshape(-1) & 0xF).astype(np.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    scales = np.full((k // 32, n), 1 / (4.6 * np.sqrt(k)), np.float32)
    weight = helper.make_tensor(f"{tag}_W", TensorProto.INT4, [k, n], packed.tobytes(), raw=True)
    return [
        helper.make_node("DequantizeLinear", [f"{tag}_W", f"{tag}_s"], [f"{tag}_Wf"], axis=0, block_size=32),
        helper.make_node("MatMul", [x, f"{tag}_Wf"], [y]),
    ], [weight, numpy_helper.from_array(scales, f"{tag}_s")]


def _fp32(rng, x, y, k, n, tag):
    weight = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    return [helper.make_node("MatMul", [x, f"{tag}_W"], [y])], [numpy_helper.from_array(weight, f"{tag}_W")]


FORMATS = [
    _nbits(4, 32, 0),
    _nbits(4, 32, 4),
    _nbits(4, 128, 0),
    _nbits(4, 128, 4),
    _nbits(8, 32, 0, in_chain=False),  # MLAS has no fp32-compute 8-bit kernel: the operator dequantizes B per call
    _nbits(8, 32, 4),
    Format("dqmm-int8", _dqmm, 1 + 4 / 2048),
    Format("rowq-int8", _row_quantized(False), 1 + 4 / 2048),
    Format("rowq2-int8", _row_quantized(True), 1 + 4 / 2048),
    Format("mmitf-int8", _mmitf, 1 + 4 / 2048, ("DynamicQuantizeMatMulFusion",)),
    Format("dq-int8+mm", _dq_matmul, 1 + 4 / 2048, ("QDQSelectorActionTransformer",), in_chain=False),
    Format("dq-int8-fused", _dq_matmul, 1 + 4 / 2048),
    Format("dq-int4+mm", _dq_int4_matmul, 0.5 + 4 / 32),
    Format("fp32", _fp32, 4),
]


def chain_model(fmt: Format, weights: Weights, seed: int = 0) -> onnx.ModelProto:
    """x [n, K0] through every weight of the chain in turn, in `fmt`."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for i, (k, n) in enumerate(weights):
        new_nodes, new_inits = fmt.nodes(rng, f"h{i}", f"h{i + 1}", k, n, f"w{i}")
        nodes += new_nodes
        inits += new_inits
    graph = helper.make_graph(
        nodes,
        fmt.name,
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["n", weights[0][0]])],
        [helper.make_tensor_value_info(f"h{len(weights)}", TensorProto.FLOAT, ["n", weights[-1][1]])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)  # 10: int4, read by older runtimes too


def ran_as(fmt: Format, k: int, n: int) -> str:
    """The op types ONNX Runtime runs for one matmul in `fmt` after its graph optimisations."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=1)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        model = chain_model(fmt, [(k, n)]).SerializeToString()
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(fmt.disabled))
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return "+".join(node.op_type for node in optimized.graph.node)


class Timed:
    """A session bound once to input and output buffers, so a call times the operators and little else."""

    def __init__(
        self, fmt: Format, weights: Weights, threads: int, clock: Callable[[], float], provider: str, config: str
    ) -> None:
        self.clock = clock
        with tempfile.TemporaryDirectory() as tmp:  # external data: no serialized copy of the weights in memory
            path = Path(tmp) / "model.onnx"
            onnx.save_model(chain_model(fmt, weights), path, save_as_external_data=True, location="weights")
            spinning = clock is time.perf_counter
            self.session = open_session(
                path, provider, threads, spinning, config, disabled_optimizers=list(fmt.disabled)
            )
        self.k, self.n_out = weights[0][0], weights[-1][1]
        self.binding: ort.IOBinding | None = None

    def bind(self, rows: int) -> None:
        x = np.random.default_rng(rows).standard_normal((rows, self.k), dtype=np.float32)
        self.inputs = ort.OrtValue.ortvalue_from_numpy(x)
        self.outputs = ort.OrtValue.ortvalue_from_shape_and_type([rows, self.n_out], np.float32)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, self.inputs)
        self.binding.bind_ortvalue_output(self.session.get_outputs()[0].name, self.outputs)
        self.session.run_with_iobinding(self.binding)  # warm-up: first-call allocations

    def ms(self, calls: int) -> float:
        start = self.clock()
        for _ in range(calls):
            self.session.run_with_iobinding(self.binding)
        return (self.clock() - start) * 1e3 / calls


def cpu_summary() -> str:
    """lscpu's model name and which of the int8-dot-product / matrix extensions it reports."""
    info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16"]
    found = [flag for flag in wanted if flag in flags]
    model = fields.get("Model name", "?").strip()
    return f"{model}; {os.cpu_count()} cpus; {' '.join(found) or 'none of ' + ' '.join(wanted)}"


def study(
    formats: list[Format],
    weights: Weights,
    rows: list[int],
    threads: int,
    repeats: int,
    budget_ms: float,
    clock: str,
    provider: str = "cpu",
    openvino_config: str = "",
) -> None:
    """Print ms per call and t(n)/t(1): median and minimum of `repeats` samples, each a batch of calls lasting
    about `budget_ms`. On a shared machine the minimum is the cost without preemption, the median the typical."""
    total = sum(k * n for k, n in weights)
    shapes = " -> ".join(f"{k}x{n}" for k, n in weights[:2]) + (" ..." if len(weights) > 2 else "")
    print(
        f"\n{len(weights)} matmul(s) {shapes} ({total / 1e6:.0f}M weights), {threads} threads, {repeats} samples, "
        f"{clock} clock ms"
    )
    timer = CLOCKS[clock]
    built = {
        fmt.name: Timed(fmt, weights, threads, timer, provider, openvino_config)
        for fmt in sorted(formats, key=lambda f: -f.bytes_per_weight)
    }
    timed = {fmt.name: built[fmt.name] for fmt in formats}  # largest built first: the lowest peak memory
    samples: dict[tuple[str, int], list[float]] = {}
    for rows_now in rows:
        calls = {}
        for name, t in timed.items():
            t.bind(rows_now)
            one = min(t.ms(1) for _ in range(3))
            calls[name] = max(1, min(200, round(budget_ms / one)))
        for _ in range(repeats):
            for name, t in timed.items():
                samples.setdefault((name, rows_now), []).append(t.ms(calls[name]))
    for label, statistic in (("median", statistics.median), ("minimum", min)):
        print(
            f"{label:<14}{'MB':>7}"
            + "".join(f"{f't({r})':>9}" for r in rows)
            + "".join(f"{f'v({r})':>7}" for r in rows[1:])
        )
        for fmt in formats:
            ms = [statistic(samples[(fmt.name, r)]) for r in rows]
            print(
                f"{fmt.name:<14}{total * fmt.bytes_per_weight / 1e6:>7.0f}"
                + "".join(f"{m:>9.3f}" for m in ms)
                + "".join(f"{m / ms[0]:>7.2f}" for m in ms[1:])
            )
    print(f"peak memory of this process so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2048, help="hidden size (K of the first matmul)")
    parser.add_argument("--n", type=int, default=5632, help="intermediate size (N of the first matmul)")
    parser.add_argument("--chain", type=int, default=24, help="matmuls in the memory-bound chain (0: skip it)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what a sample measures (see CLOCKS)")
    parser.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="cpu",
        help="openvino: OpenVINO's CPU plugin through ONNX Runtime's OpenVINO provider (onnxruntime-openvino)",
    )
    parser.add_argument(
        "--openvino-config",
        default="",
        help='with --provider openvino: OpenVINO CPU properties as JSON, e.g. \'{"CPU": {"INFERENCE_PRECISION_HINT": '
        '"bf16"}}\' (default: fp32)',
    )
    parser.add_argument("--only", nargs="+", choices=[f.name for f in FORMATS], help="formats to time (default: all)")
    args = parser.parse_args()
    formats = [f for f in FORMATS if not args.only or f.name in args.only]
    print(f"onnxruntime {ort.__version__}; {cpu_summary()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.provider == "cpu":
        print("ran as (one matmul, after ONNX Runtime's graph optimisations):")
        for fmt in formats:
            print(f"  {fmt.name:<14}{ran_as(fmt, args.k, args.n)}")
    else:
        print(f"provider: {providers_for(args.provider, args.threads, args.openvino_config)[0]}")
    timing = dict(threads=args.threads, clock=args.clock, provider=args.provider, openvino_config=args.openvino_config)
    study(formats, [(args.k, args.n)], args.rows, repeats=args.repeats, budget_ms=5, **timing)
    if args.chain:
        chain = [(args.k, args.n) if i % 2 == 0 else (args.n, args.k) for i in range(args.chain)]
        chained = [f for f in formats if f.in_chain or args.only]
        study(chained, chain, args.rows, repeats=max(3, args.repeats // 2), budget_ms=60, **timing)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
