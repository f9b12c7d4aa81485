"""GGUF blocks read straight from the file's bytes (`gguf_raw`): each type decodes to what gguf dequantizes, and
a K-quant GGUF (random raw blocks written with gguf.GGUFWriter) exports with its blocks kept exactly, the
re-quantized tensors named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from onnx import helper

import ortspec
from ortspec.cli import main as cli
from ortspec.cli.output import describe
from ortspec.export import export_pair
from ortspec.export.builder.gguf_file import GGUFError, GGUFFile
from ortspec.export.quantize import count_ops, dequantized_weight, streaming
from ortspec.export.quantize.compact import Constants, compact_blocks, fold, folded_constants
from ortspec.export.quantize.gguf_raw import LAYOUTS, Layout, read_blocks
from ortspec.export.quantize.streaming import matmul_blocks
from ortspec.models.random import make_checkpoint
from ortspec.runtime.model.decoder import DecoderState

from helpers.gguf_files import projection_weights, random_blocks, write_gguf

SHAPE = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512)  # every row a multiple of 256
ROUNDING = 2.0**-24  # float32's unit roundoff


def offset_bound(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """How far scale * code + offset may lie from gguf's value: the offset is one float32 rounding of a real
    (center * scale - dmin * min), their sum another, gguf's own value a third."""
    return ROUNDING * (np.abs(offsets) + 2 * np.abs(values)) * (1 + 1e-6)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_raw_blocks_decode_to_what_gguf_dequantizes(kind):
    rng = np.random.default_rng(0)
    raw = random_blocks(kind, 6, 512, rng)
    raw[0, :] = 0  # an all-zero row: zero scales and codes
    expected = dequantize(raw, GGMLQuantizationType[kind]).reshape(6, 512)
    blocks = read_blocks(raw, kind)
    assert blocks.block == LAYOUTS[kind].block and blocks.codes.dtype == np.int8
    bits = LAYOUTS[kind].bits
    assert -(1 << (bits - 1)) <= blocks.codes.min() and blocks.codes.max() < 1 << (bits - 1)
    if blocks.offsets is None:
        assert np.array_equal(blocks.values(), expected)  # exactly (a zero's sign aside)
    else:
        offsets = np.repeat(blocks.offsets, blocks.block, axis=1)
        assert np.all(np.abs(blocks.values() - expected) <= offset_bound(expected, offsets))
    # MatMulNBits' layout: B [N, K/block, block * bits / 8] with zero point 2^(bits-1), as a [K, N] weight
    for block in sorted({blocks.block, 16}):
        packed, scales, *rest = matmul_blocks(blocks, Layout(bits, block, blocks.offsets is not None))
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], K=512, N=6, bits=bits, block_size=block)
        weight = dequantized_weight(node, {"b": onnx.numpy_helper.from_array(packed, "b"),
                                           "s": onnx.numpy_helper.from_array(scales, "s")})  # fmt: skip
        if rest:
            weight = weight + np.repeat(rest[0], block, axis=0)
        assert np.array_equal(weight.T, blocks.values())


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    """kquant_gguf(weights, tied) -> a GGUF of a 2-layer llama with rows of 256, its 2-D tensors random raw
    blocks of `weights` (a type or mix of helpers.gguf_files.MIXES)."""
    made: dict[tuple, Path] = {}

    def get(weights: str, tied: bool = False) -> Path:
        if (weights, tied) not in made:
            root = tmp_path_factory.mktemp(f"kquant-{weights}")
            source = make_checkpoint(root / "ckpt", "llama", seed=0, tie_word_embeddings=tied, **SHAPE)
            made[weights, tied] = write_gguf(source, root / f"{weights}.gguf", weights=weights)
        return made[weights, tied]

    return get


def export(gguf: Path, out: Path, **options) -> ortspec.Pipeline:
    export_pair(gguf, out, quantize=options.pop("quantize", "none"), report=lambda _: None, **options)
    return ortspec.load(out)


def matmul_layouts(pipe: ortspec.Pipeline) -> dict[str, tuple[int, int]]:
    """(bits, block) of each MatMulNBits node, by its name."""
    graph = onnx.load(pipe.manifest.root / "target" / "model.onnx", load_external_data=False).graph
    return {
        node.name: tuple(helper.get_attribute_value(a) for a in node.attribute if a.name in ("bits", "block_size"))
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }


# (weights, tied, GGML types kept exactly per weight, width and block of a layer's qkv)
KQUANT_CASES = [
    ("Q4_K", False, {"Q4_K": 2 * 4 + 2}, (4, 32)),
    ("Q5_K", True, {"Q5_K": 2 * 4 + 1}, (8, 32)),
    ("Q6_K", False, {"Q6_K": 2 * 4 + 2}, (8, 16)),
    ("Q3_K", True, {"Q3_K": 2 * 4 + 1}, (4, 16)),
    # Q4_K_M: q, k Q4_K and v Q6_K make one qkv weight of 8-bit blocks of 16 (with offsets); the tied table is Q4_K
    ("Q4_K_M", True, {"Q4_K": 2 * 2 + 1, "Q6_K": 2, "Q4_K+Q6_K": 2}, (8, 16)),
    ("Q4_K_M", False, {"Q4_K": 2 * 2 + 1, "Q6_K": 2 + 1, "Q4_K+Q6_K": 2}, (8, 16)),
]


@pytest.mark.parametrize(("weights", "tied", "kept", "qkv"), KQUANT_CASES)
def test_k_quant_gguf_exports_its_blocks_exactly(weights, tied, kept, qkv, kquant_gguf, tmp_path):
    gguf = kquant_gguf(weights, tied)
    reference = export(gguf, tmp_path / "fp32")  # gguf's dequantization, float32 weights
    pipe = export(gguf, tmp_path / "pkg", quantize="int4", accuracy_level=0)
    expected, got = projection_weights(reference), projection_weights(pipe)
    assert got.keys() == expected.keys()
    for name, want in expected.items():  # within the offsets' rounding (exact where a weight has none)
        assert np.abs(got[name] - want).max() <= 4 * ROUNDING * np.abs(want).max(), name
    quantization = pipe.manifest.target.quantization
    assert quantization["gguf_blocks"]["kept_exactly"] == kept
    assert quantization["gguf_blocks"]["requantized"] == 0
    assert quantization["embedding"].startswith("int")
    assert matmul_layouts(pipe)["layers.0.attn.qkv.weight_Q" + str(qkv[0])] == qkv
    ids = [int(i) for i in np.random.default_rng(0).integers(2, pipe.target.vocab_size, size=16)]
    logits = [DecoderState(package.target).forward(ids) for package in (pipe, reference)]
    # float32 sums in another order (the offsets meet x's block means, not x), logits ~10
    np.testing.assert_allclose(*logits, atol=1e-3, rtol=1e-4)
    assert np.array_equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_a_type_not_read_directly_is_requantized_and_named(kquant_gguf, tmp_path):
    """Q2_K is dequantized and quantized again: the summary, the export's output and `describe` name it."""
    lines: list[str] = []
    out = tmp_path / "pkg"
    export_pair(kquant_gguf("Q4_K_M+Q2_K"), out, quantize="int4", report=lines.append)
    pipe = ortspec.load(out)  # accuracy level 4: ONNX Runtime's int8 kernels over 8-bit blocks of 16 and offsets
    assert 0 < len(pipe.generate([3, 50, 7], max_new_tokens=4, use_draft=False).token_ids) <= 4
    record = pipe.manifest.target.quantization["gguf_blocks"]
    assert record["requantized"] == 1 and record["requantized_tensors"] == ["blk.1.attn_output.weight (Q2_K)"]
    assert record["kept_exactly"] == {"Q4_K": 2 + 1 + 1, "Q6_K": 2 + 1, "Q4_K+Q6_K": 2}
    line = "GGUF weights: 9 kept exactly (4 Q4_K, 2 Q4_K+Q6_K, 3 Q6_K); 1 re-quantized: blk.1.attn_output.weight (Q2_K)"
    assert any(entry.strip() == line for entry in lines), lines
    assert line in describe(pipe.manifest)


def test_q4_0_with_padded_heads_keeps_its_rows_and_names_what_padding_moved(checkpoint, tmp_path):
    """Heads of 40 are padded to 48: q/k/v gain zero rows (the blocks are kept, with zero rows), while the
    output projection gains zero columns inside its blocks and is quantized from float32 again."""
    gguf = write_gguf(checkpoint("llama", variant="head-dim-40"), tmp_path / "m.gguf", weights="Q4_0")
    reference = export(gguf, tmp_path / "fp32")
    pipe = export(gguf, tmp_path / "pkg", quantize="int4", accuracy_level=0)
    expected, got = projection_weights(reference), projection_weights(pipe)
    qkv = "layers.0.attn.qkv.weight_out"
    assert np.array_equal(got[qkv], expected[qkv])
    record = pipe.manifest.target.quantization["gguf_blocks"]
    assert record["requantized_tensors"] == ["blk.0.attn_output.weight (Q4_0)", "blk.1.attn_output.weight (Q4_0)"]


@pytest.mark.parametrize("keep", [True, False])
def test_a_non_finite_block_scale_is_refused_in_one_line(keep, kquant_gguf, tmp_path):
    path = tmp_path / "nan.gguf"
    path.write_bytes(kquant_gguf("Q4_K").read_bytes())
    start = GGUFFile(path).tensors["blk.1.ffn_up.weight"].start
    with open(path, "r+b") as f:
        f.seek(start + 144 * 3)  # the 4th super-block's d
        f.write(np.float16(np.nan).tobytes())
    with pytest.raises(GGUFError, match=r"nan.gguf: tensor blk.1.ffn_up.weight holds a block scale that is not"):
        export_pair(path, tmp_path / "pkg", quantize="int4", keep_gguf_blocks=keep, report=lambda _: None)
    result = CliRunner().invoke(cli, ["export", str(path), "--out", str(tmp_path / "cli")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    ("options", "kept", "requantized"),
    [
        ({"quantize": "int4", "keep_gguf_blocks": False}, {}, 2 * 4 + 2),  # offsets: not what int4 holds as it is
        ({"quantize": "int8", "int8_kernel": "gemm"}, {"Q4_K": 1}, 2 * 4 + 1),  # int8 per column, the head too
    ],
)
def test_k_quant_blocks_are_quantized_again_where_asked_and_named(options, kept, requantized, kquant_gguf, tmp_path):
    pipe = export(kquant_gguf("Q4_K"), tmp_path / "pkg", **options)
    record = pipe.manifest.target.quantization["gguf_blocks"]
    assert record["kept_exactly"] == kept and record["requantized"] == requantized
    assert (
        len(record["requantized_tensors"]) == requantized
        and "blk.0.ffn_down.weight (Q4_K)" in record["requantized_tensors"]
    )
    assert 0 < len(pipe.generate([3, 50, 7], max_new_tokens=4, use_draft=False).token_ids) <= 4


def test_truncated_k_quant_data_is_refused_in_one_line(kquant_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(kquant_gguf("Q4_K_M").read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"cut.gguf: tensor \S+ claims \d+ bytes .* past the end"):
        export_pair(path, tmp_path / "pkg", quantize="int4", report=lambda _: None)


@pytest.mark.parametrize("family", ["phi3", "qwen3", "gemma3_text", "mistral"])
def test_other_architectures_keep_their_blocks_through_the_builders_rearrangements(family, checkpoint, tmp_path):
    """phi3's fused q/k/v and gate/up split and its partial rotary reordered, qwen3's and gemma3's wide heads:
    each a rearrangement of rows that the blocks follow (Q8_0, kept at 8 bits: every weight equal)."""
    gguf = write_gguf(checkpoint(family), tmp_path / "m.gguf", weights="Q8_0")
    reference = export(gguf, tmp_path / "fp32")
    pipe = export(gguf, tmp_path / "pkg", quantize="int4", accuracy_level=0)
    expected, got = projection_weights(reference), projection_weights(pipe)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    record = pipe.manifest.target.quantization["gguf_blocks"]
    assert set(record["kept_exactly"]) == {"Q8_0"} and record["requantized"] == 0


def float32_scales(prefix, scales, offsets, block):
    """`compact.compact_blocks` as the package stored scales before: the float32 arrays as they are."""
    constants = Constants()
    constants.arrays[f"{prefix}_scales"] = scales
    if offsets is not None:
        constants.arrays[f"{prefix}_offsets"] = offsets
    return constants


@pytest.mark.parametrize("weights", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q4_K_M"])
def test_compact_scales_fold_to_the_float32_ones_bit_for_bit(weights, kquant_gguf, tmp_path, monkeypatch):
    gguf = kquant_gguf(weights, tied=weights == "Q4_K_M")
    compact = export(gguf, tmp_path / "compact", quantize="int4")
    monkeypatch.setattr(streaming, "compact_blocks", float32_scales)
    plain = export(gguf, tmp_path / "plain", quantize="int4")
    graphs = [onnx.load(pipe.manifest.root / "target" / "model.onnx").graph for pipe in (compact, plain)]
    values = [folded_constants(graph) for graph in graphs]
    compared = 0
    for node in graphs[1].node:  # every constant input of the blocks' nodes: the same bits once folded
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized") or node.name.endswith("_offsets"):
            for name in node.input:
                if name in values[1]:
                    got, want = values[0][name], values[1][name]
                    assert (got.dtype, got.shape, got.tobytes()) == (want.dtype, want.shape, want.tobytes()), name
                    compared += 1
    assert compared >= 2 * count_ops(onnx.ModelProto(graph=graphs[1]), "MatMulNBits")
    stored = [{init.name: init.data_type for init in graph.initializer} for graph in graphs]
    floats = [name for name in stored[1] if name.endswith(("_scales", "_offsets"))]
    assert floats and not any(name in stored[0] for name in floats)  # none of them stored as float32 now
    sizes = [sum(f.stat().st_size for f in (p.manifest.root / "target").iterdir()) for p in (compact, plain)]
    assert sizes[0] < sizes[1]
    ids = [int(i) for i in np.random.default_rng(0).integers(2, plain.target.vocab_size, size=16)]
    logits = [DecoderState(pipe.target).forward(ids) for pipe in (compact, plain)]
    assert np.array_equal(*logits)


def test_compact_blocks_store_each_form_only_where_it_folds_to_the_same_bits():
    rng = np.random.default_rng(0)
    d = (rng.uniform(2e-5, 2e-3, (6, 2, 1)) * rng.choice([-1, 1], (6, 2, 1))).astype(np.float16).astype(np.float32)
    sc = rng.integers(-128, 128, (6, 2, 8)).astype(np.float32)
    k_scales = (d * sc).reshape(6, 16)  # K-quant-like: an fp16 (subnormal ones too) times an integer per block
    k_scales[0, 3] = -0.0  # a code 0 under a negative factor
    half = rng.standard_normal((6, 16)).astype(np.float16).astype(np.float32)
    mixed = k_scales.copy()
    mixed[1, :8] = np.float32(0) * np.array([1, -1] * 4, np.float32)  # +0.0 and -0.0 in one group: no factor
    for scales, stored in [(half, "w_scales_fp16"), (k_scales, "w_scales_codes"), (mixed, "w_scales")]:
        constants = compact_blocks("w", scales, None, 32)
        assert stored in constants.arrays
        folded = fold(constants.nodes, constants.arrays)["w_scales"]
        assert folded.dtype == np.float32 and folded.tobytes() == scales.tobytes()
    # Q4_K: d * sc and dmin * m with sc, m < 64
    q4_k = (np.abs(d) * rng.integers(0, 64, (6, 2, 8)).astype(np.float32)).reshape(6, 16)
    minimum = (np.abs(d) * rng.integers(0, 64, (6, 2, 8)).astype(np.float32)).reshape(6, 16)
    offsets = (8 * 32 * q4_k.astype(np.float64) - 32 * minimum.astype(np.float64)).T.astype(np.float32)
    offsets[:, 5] = 0  # a row without an offset (a Q6_K part joined with Q4_K ones)
    constants = compact_blocks("w", q4_k, np.ascontiguousarray(offsets), 32)
    assert "w_offsets" not in constants.arrays and "w_minimum_codes" in constants.arrays
    assert fold(constants.nodes, constants.arrays)["w_offsets"].tobytes() == offsets.tobytes()
