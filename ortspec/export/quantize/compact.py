"""MatMulNBits' float32 scales and offsets stored in fewer bytes, and computed back bit for bit by constant
nodes that ONNX Runtime folds when the session loads (so the running graph is the same as before).

GGUF block scales are fp16 (Q4_0, Q8_0, Q4_1's d and m) or an fp16 times a small integer per sub-block
(K-quants: d * sc), so float32 spends 2 to 4 times the bytes they need. A scale tensor is stored as fp16 +
Cast when fp16 holds it exactly, else as an fp16 factor per group of blocks (a K-quant super-block) times
an int8 code per block (Cast, Mul: the product of an fp16 and an int8 is exact in float32). Offsets
C = block * (center * scale + minimum) are stored as their minimum, compacted the same way, and the
graph's float32 Mul and Add. Every form is checked to give the float32 values bit for bit with numpy's
float32 arithmetic (the same IEEE operations as the folded nodes); a tensor that does not stays float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

GROUP_ELEMENTS = 256  # a K-quant super-block: one fp16 factor per this many weights along K
_LEVELS = sorted(set(range(-128, 128)) - {0}, key=lambda level: (-abs(level), level))  # int8 codes
CENTERS = (8, 16, 0)  # GGUF codes are centred by 8 (4-bit types) or 16 (5-bit); 0: an offset that is a minimum
# (a row without an offset takes 0, so its minimum is all zeros)


class Constants:
    """Nodes and initializers (numpy arrays) that compute a set of float32 constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: dict[str, np.ndarray] = {}

    def node(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{output}_folded", **attrs))
        return output


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a, np.float32).view(np.uint32), np.ascontiguousarray(b, np.float32).view(np.uint32)
    )


def _equal(a: np.ndarray, b: np.ndarray, zero_signs: bool) -> np.ndarray:
    """a == b bit for bit, elementwise; a zero's sign ignored unless `zero_signs`."""
    same = a.view(np.uint32) == b.view(np.uint32)
    return same if zero_signs else same | ((a == 0) & (b == 0))


def _fp16_exact(x: np.ndarray) -> np.ndarray:
    """Whether each float32 is an fp16 number, without the (slow) conversion: a normal one has its 13 low
    mantissa bits clear and its exponent in range, a subnormal one is a multiple of 2^-24."""
    magnitude = np.abs(x)
    normal = ((x.view(np.uint32) & np.uint32(0x1FFF)) == 0) & (magnitude >= np.float32(2**-14))
    units = magnitude * np.float32(2**24)  # exact: a power of two
    subnormal = (magnitude < np.float32(2**-14)) & (np.rint(units) == units)
    return (normal | subnormal) & (magnitude <= np.float32(65504))


def _factor(values: np.ndarray, group: int, zero_signs: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """fp16 factors [rows, nb/group, 1] and int8 codes [rows, nb/group, group] whose float32 product is
    `values` [rows, nb] bit for bit (a zero's sign only if `zero_signs`: a code 0 takes its factor's), or
    None. The value of largest magnitude in a group is its factor times a level, so each level (largest
    first) is tried as in `gguf_blocks._fit_levels`."""
    rows, nb = values.shape
    if nb % group or not np.isfinite(values).all():
        return None
    flat = values.reshape(-1, group)
    ref = np.take_along_axis(flat, np.abs(flat).argmax(-1)[:, None], -1)[:, 0]
    factors = np.copysign(np.float16(0), ref).astype(np.float16)  # an all-zero group: factor ±0, codes 0
    codes = np.zeros(flat.shape, np.int8)
    todo = np.flatnonzero(ref != 0)
    with np.errstate(all="ignore"):
        for level in _LEVELS:
            if len(todo) == 0:
                break
            ratio = ref[todo] / np.float32(level)
            exact = _fp16_exact(ratio) & (ratio * np.float32(level) == ref[todo])
            at = np.flatnonzero(exact)
            if len(at) == 0:
                continue
            candidates, factor = todo[at], ratio[at][:, None]
            q = np.rint(flat[candidates] / factor) + np.float32(0)  # -0.0 is an integer code 0: +0.0
            product = (q * factor).astype(np.float32)  # bit for bit: a zero's sign is the factor's
            in_range = (q >= -128) & (q <= 127)
            fits = (in_range & _equal(product, flat[candidates], zero_signs)).all(-1)
            factors[candidates[fits]], codes[candidates[fits]] = factor[fits, 0], q[fits]
            keep = np.ones(len(todo), bool)
            keep[at[fits]] = False
            todo = todo[keep]
    product = factors.astype(np.float32)[:, None] * codes.astype(np.float32)  # as the folded Cast, Mul compute
    if len(todo) or not _equal(product, flat, zero_signs).all():  # (+0.0 and -0.0 in a group: no one factor)
        return None
    return factors.reshape(rows, -1, 1), codes.reshape(rows, -1, group)


def compact(out: Constants, name: str, values: np.ndarray, group: int, zero_signs: bool = True) -> str:
    """The name of a float32 tensor equal to `values` [rows, nb] bit for bit (a zero's sign only if
    `zero_signs`), computed by `out`'s nodes from fp16 (or fp16 factors per `group` blocks and int8 codes)
    where that is exact, else stored as it is."""
    half = values.astype(np.float16)
    if same_bits(half.astype(np.float32), values):
        out.arrays[f"{name}_fp16"] = half
        return out.node("Cast", [f"{name}_fp16"], name, to=onnx.TensorProto.FLOAT)
    factored = _factor(values, group, zero_signs)
    if factored is None or factored[0].nbytes + factored[1].nbytes >= values.nbytes:
        out.arrays[name] = values
        return name
    factors, codes = factored
    out.arrays[f"{name}_factors"], out.arrays[f"{name}_codes"] = factors, codes
    out.arrays[f"{name}_shape"] = np.array(values.shape, np.int64)
    f32 = onnx.TensorProto.FLOAT
    product = out.node(
        "Mul",
        [
            out.node("Cast", [f"{name}_factors"], f"{name}_factors_f32", to=f32),
            out.node("Cast", [f"{name}_codes"], f"{name}_codes_f32", to=f32),
        ],
        f"{name}_grouped",
    )
    return out.node("Reshape", [product, f"{name}_shape"], name)


def compact_blocks(prefix: str, scales: np.ndarray, offsets: np.ndarray | None, block: int) -> Constants:
    """Constants `{prefix}_scales` [N, K/block] and (if `offsets`, [K/block, N]) `{prefix}_offsets`, equal bit
    for bit to the arrays given, in as few bytes as that allows."""
    out = Constants()
    group = max(1, GROUP_ELEMENTS // block)
    scales_name = compact(out, f"{prefix}_scales", scales, group)
    if offsets is None:
        return out
    target = np.ascontiguousarray(offsets.T)
    no_offset = ~target.view(np.uint32).any(-1, keepdims=True)  # rows all +0.0 (a Q6_K part of a joined weight)
    for center in CENTERS:
        step = np.where(no_offset, np.float32(0), np.float32(center * block))  # per row [N, 1]
        with np.errstate(all="ignore"):
            minimum = target - scales * step
            if not same_bits(scales * step + minimum, target):
                continue
        attempt = Constants()  # a zero minimum's sign matters only where the sum is a zero too: checked below
        minimum_name = compact(attempt, f"{prefix}_minimum", minimum, group, zero_signs=False)
        if minimum_name in attempt.arrays:
            continue  # not smaller than the offsets themselves
        with np.errstate(all="ignore"):
            if not same_bits(scales * step + fold(attempt.nodes, attempt.arrays)[minimum_name], target):
                continue
        out.nodes += attempt.nodes
        out.arrays |= attempt.arrays
        out.arrays[f"{prefix}_center"] = step
        moved = out.node("Mul", [scales_name, f"{prefix}_center"], f"{prefix}_centred")
        summed = out.node("Add", [moved, minimum_name], f"{prefix}_offsets_t")
        out.node("Transpose", [summed], f"{prefix}_offsets", perm=[1, 0])
        return out
    out.arrays[f"{prefix}_offsets"] = offsets
    return out


_FOLDS = {
    "Cast": lambda a, node: a[0].astype(np.float32),
    "Mul": lambda a, node: a[0] * a[1],
    "Add": lambda a, node: a[0] + a[1],
    "Reshape": lambda a, node: a[0].reshape(a[1]),
    "Transpose": lambda a, node: a[0].transpose(*helper.get_attribute_value(node.attribute[0])),
}


def folded_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer of `graph`, plus the outputs of its constant nodes of `compact`'s kinds (as ONNX
    Runtime folds them at load), as numpy arrays: the values the session computes with (for checks)."""
    return fold(graph.node, {init.name: numpy_helper.to_array(init) for init in graph.initializer})


def fold(nodes: Iterable[onnx.NodeProto], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` plus the outputs of those `nodes` (in order) of `compact`'s kinds whose inputs are known."""
    values = dict(arrays)
    for node in nodes:
        if node.op_type in _FOLDS and node.input and all(name in values for name in node.input):
            with np.errstate(all="ignore"):
                values[node.output[0]] = np.asarray(_FOLDS[node.op_type]([values[i] for i in node.input], node))
    return values
