"""Probes of KV cache formats `ortspec export` does not offer, on an fp32-KV package's graph, edited here.

`store16`: the cache in fp16 with attention in fp32 (q stays fp32; ONNX Runtime's CPU GroupQueryAttention
then converts the whole cache buffer every call): what fp16 storage alone costs in accuracy.
`int8`: the cache in int8 with static per-channel scales (GroupQueryAttention's k_quant_type/v_quant_type
PER_CHANNEL, kv_cache_bit_width 8, scales [kv_heads x head_dim] per layer), calibrated as the largest
|value| of each channel over --calibrate positions from the end of the text (evaluation reads its start):
accuracy, and decode-step CPU time against the fp32 cache.

`layer`: one GroupQueryAttention node alone, SmolLM2-135M's shape (9 heads, 3 KV heads, head dim 64, a
buffer of --buffer positions), one thread: CPU µs per one-token call at each context with q and the cache
in fp32, both in fp16, q fp32 over an fp16 cache, and q fp32 over an int8 cache (per-channel scales).

Accuracy is `ortspec eval`'s (perplexity, top-1 agreement, mean KL) against the unedited package, on the
first --max-tokens tokens of the text in windows of --window. The edited graph runs through the runtime's
`Model` with its cache type admitted for the probe (the package format has no int8 cache).

    python benchmarks/kv_probes.py int8 PACKAGE --text english.txt [--window 2048] [--time]
    python benchmarks/kv_probes.py store16 PACKAGE --text english.txt
    python benchmarks/kv_probes.py layer [--buffer 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from kv_dtype import step_cpu_ms
from onnx import TensorProto, helper, numpy_helper

import ortspec
from ortspec.runtime.evaluate import evaluate, special_prefix, windows
from ortspec.runtime.model import onnx_model
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.model.session import create_session

CACHE_TYPES = {"store16": TensorProto.FLOAT16, "int8": TensorProto.INT8}


def is_cache(name: str) -> bool:
    return name.startswith(("past_key_values.", "present."))


def channel_scales(pipe: ortspec.Pipeline, tokens: list[int]) -> dict[str, np.ndarray]:
    """Per past name: the largest |value| of each (kv head, channel) over `tokens`, / 127."""
    state = DecoderState(pipe.target)
    for i in range(0, len(tokens), 128):
        state.forward(tokens[i : i + 128])
    names = pipe.manifest.target.inputs
    past = [n for n in names if n.startswith("past_key_values.")]
    return {
        name: np.maximum(np.abs(buffer.numpy()[0, :, : state.length]).max(axis=1).reshape(-1) / 127, 1e-8)
        for name, buffer in zip(past, state.cache.buffers, strict=True)
    }


def edited_graph(package: Path, out: Path, kind: str, scales: dict[str, np.ndarray] | None) -> Path:
    """`package`'s target graph with its cache in the probe's type, written beside a copy of its files."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(package, out)
    model = onnx.load(package / "target" / "model.onnx", load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if is_cache(value.name):
            value.type.tensor_type.elem_type = CACHE_TYPES[kind]
    for node in model.graph.node if scales is not None else ():
        if node.op_type != "GroupQueryAttention":
            continue
        key, value = node.input[3], node.input[4]
        for name in (key, value):
            model.graph.initializer.append(numpy_helper.from_array(scales[name].astype(np.float32), f"{name}.scale"))
        padded = [*node.input, *[""] * (12 - len(node.input))]  # k_scale and v_scale are inputs 12 and 13
        inputs = [*padded[:12], f"{key}.scale", f"{value}.scale"]
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
    onnx.save(model, out / "target" / "model.onnx")
    return out / "target" / "model.onnx"


def step_ms(states: dict[str, DecoderState], contexts: list[int], rounds: int, steps: int = 16) -> dict[str, list]:
    """Median CPU ms of a one-token step at each context, the states alternating (as benchmarks/kv_dtype.py)."""
    tokens = [(7 * i) % 1000 + 10 for i in range(max(contexts) + steps)]
    for state in states.values():
        state.forward(tokens[: max(contexts)])
    results: dict[str, list] = {name: [0.0] * len(contexts) for name in states}
    for i in reversed(range(len(contexts))):
        samples: dict[str, list[float]] = {name: [] for name in states}
        for _ in range(rounds):
            for name, state in states.items():
                samples[name].append(step_cpu_ms(state, contexts[i], tokens, steps))
        for name in states:
            results[name][i] = statistics.median(samples[name])
    return results


LAYER_FORMATS = {  # name: (q's type, the cache's type, quantization attributes)
    "fp32": (TensorProto.FLOAT, TensorProto.FLOAT, {}),
    "fp16": (TensorProto.FLOAT16, TensorProto.FLOAT16, {}),
    "q fp32, cache fp16": (TensorProto.FLOAT, TensorProto.FLOAT16, {}),
    "q fp32, cache int8": (
        TensorProto.FLOAT,
        TensorProto.INT8,
        {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8},
    ),
}


def layer_us(form: str, context: int, buffer: int, calls: int = 60, batches: int = 7) -> float:
    """CPU µs of a one-token GroupQueryAttention call after `context` positions, SmolLM2-135M's shape: the
    least mean of `batches` batches of `calls` calls (on a shared machine, the cost without preemption)."""
    import onnxruntime as ort

    heads, kv_heads, dim = 9, 3, 64
    q_type, cache_type, quantized = LAYER_FORMATS[form]

    def value(name: str, kind: int, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, shape)

    cache = [1, kv_heads, buffer, dim]
    inputs = [
        value("qkv", q_type, [1, 1, (heads + 2 * kv_heads) * dim]),
        value("past_key", cache_type, cache),
        value("past_value", cache_type, cache),
        value("seqlens_k", TensorProto.INT32, [1]),
        value("total", TensorProto.INT32, []),
        value("cos", q_type, [buffer, dim // 2]),
        value("sin", q_type, [buffer, dim // 2]),
    ]
    names = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"]
    if quantized:
        inputs += [
            value("k_scale", TensorProto.FLOAT, [kv_heads * dim]),
            value("v_scale", TensorProto.FLOAT, [kv_heads * dim]),
        ]
        names += ["", "", "", "k_scale", "v_scale"]
    outputs = [
        value("out", q_type, [1, 1, heads * dim]),
        value("key", cache_type, cache),
        value("val", cache_type, cache),
    ]
    node = helper.make_node(
        "GroupQueryAttention", names, ["out", "key", "val"], domain="com.microsoft", num_heads=heads,
        kv_num_heads=kv_heads, do_rotary=1, **quantized,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs), opset_imports=opsets)
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    q_np, cache_np = helper.tensor_dtype_to_np_dtype(q_type), helper.tensor_dtype_to_np_dtype(cache_type)
    buffers = [
        ort.OrtValue.ortvalue_from_numpy((rng.standard_normal(cache) * (20 if quantized else 1)).astype(cache_np))
        for _ in range(2)
    ]
    angles = np.arange(buffer)[:, None] / 10000 ** (np.arange(dim // 2) / (dim // 2))[None]
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, (heads + 2 * kv_heads) * dim)).astype(q_np))
    for name, out, buf in (("past_key", "key", buffers[0]), ("past_value", "val", buffers[1])):
        binding.bind_ortvalue_input(name, buf)
        binding.bind_ortvalue_output(out, buf)
    binding.bind_output("out")
    binding.bind_cpu_input("seqlens_k", np.array([context - 1], np.int32))
    binding.bind_cpu_input("total", np.array(context, np.int32))
    binding.bind_cpu_input("cos", np.cos(angles).astype(q_np))
    binding.bind_cpu_input("sin", np.sin(angles).astype(q_np))
    if quantized:
        for name in ("k_scale", "v_scale"):
            binding.bind_cpu_input(name, np.full(kv_heads * dim, 0.05, np.float32))
    for _ in range(10):
        session.run_with_iobinding(binding)
    means = []
    for _ in range(batches):
        start = time.process_time()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        means.append((time.process_time() - start) / calls * 1e6)
    return min(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=[*CACHE_TYPES, "layer"])
    parser.add_argument("package", type=Path, nargs="?", help="a package exported with --kv-dtype fp32")
    parser.add_argument("--text", type=Path)
    parser.add_argument("--buffer", type=int, default=2048, help="layer: the cache buffer's positions")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-kv-probes"))
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--calibrate", type=int, default=2048, help="positions the int8 scales are taken from")
    parser.add_argument("--time", action="store_true", help="also time decode steps (int8)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if args.kind == "layer":
        contexts = [c for c in sorted(args.contexts) if c <= args.buffer]
        print(f"CPU µs per one-token call, buffer of {args.buffer} positions, at " + ", ".join(map(str, contexts)))
        for form in LAYER_FORMATS:
            print(f"{form:<20}" + "".join(f"{layer_us(form, c, args.buffer):>8.0f}" for c in contexts))
        return
    if args.package is None or args.text is None:
        parser.error(f"{args.kind} needs a PACKAGE and --text")
    onnx_model.ONNX_TO_NUMPY["tensor(int8)"] = np.int8  # type: ignore[assignment]  # the probe's cache type
    pipe = ortspec.load(args.package, threads=1, verify=False)
    text = args.text.read_text(encoding="utf-8")
    scales = None
    if args.kind == "int8":
        held_apart = pipe.tokenizer.encode(text[-len(text) // 8 :], add_special_tokens=False)[: args.calibrate]
        scales = channel_scales(pipe, held_apart)
    graph = edited_graph(args.package, args.work / args.kind, args.kind, scales)
    spec = dataclasses.replace(pipe.manifest.target, kv_dtype=None)
    length = args.window if args.kind == "store16" else None  # store16 converts the whole buffer per call
    model = onnx_model.Model(spec, create_session(graph, None, 1, True), length)
    tokens = pipe.tokenizer.encode(text, add_special_tokens=False)[: args.max_tokens]
    report = evaluate(model, windows(tokens, args.window, special_prefix(pipe.tokenizer)), pipe.target)
    print(f"{args.kind}: {report.tokens} positions in windows of {args.window}")
    print(
        f"perplexity {report.perplexity:.3f} (fp32 cache {report.reference_perplexity:.3f}), top-1 agreement "
        f"{report.top1_agreement:.1%}, mean KL {report.mean_kl:.4f}"
    )
    if args.time:
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        states = {"fp32": DecoderState(pipe.target), args.kind: DecoderState(model)}
        results = step_ms(states, sorted(args.contexts), args.rounds)
        print("CPU ms per step at " + ", ".join(map(str, sorted(args.contexts))))
        for name, values in results.items():
            print(f"{name:<8}" + "".join(f"{v:>8.2f}" for v in values) + f"   last/first {values[-1] / values[0]:.2f}")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
