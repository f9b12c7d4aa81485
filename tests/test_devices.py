"""What the CPU allows of the GPU path: fp16 export, per-model providers, provider errors.

The CUDA execution provider itself is checked on a GPU by benchmarks/gpu_check.py (README: "GPUs").
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.export import export_pair
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.speculation.calibration import calibration_key

PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def fp16_pair(checkpoint, tmp_path_factory):
    """The tiny llama target in fp32 and in fp16, both with an fp32 draft (the CPU-draft/GPU-target layout)."""
    root = tmp_path_factory.mktemp("fp16")
    made = {}
    for dtype in ("fp32", "fp16"):
        made[dtype] = root / dtype
        export_pair(
            checkpoint(),
            made[dtype],
            draft=checkpoint(kind="close"),
            quantize="none",
            dtype=dtype,
            draft_dtype="fp32",
            report=lambda _: None,
        )
    return made


def test_fp16_export_matches_fp32_within_fp16_rounding(fp16_pair):
    logits = {}
    for dtype, path in fp16_pair.items():
        pipe = ortspec.load(path)
        assert pipe.manifest.target.dtype == {"fp32": "float32", "fp16": "float16"}[dtype]
        assert pipe.manifest.draft.dtype == "float32"
        assert (
            DecoderState(pipe.target).cache.buffers[0].data_type()
            == f"tensor({'float16' if dtype == 'fp16' else 'float'})"
        )
        logits[dtype] = DecoderState(pipe.target).forward(PROMPT)
    gap = np.abs(logits["fp32"] - logits["fp16"])
    assert logits["fp16"].dtype == np.float32  # the runtime hands out float32 logits whatever the graph's type
    assert gap.max() <= 0.05 * logits["fp32"].std()  # measured: 0.028 of the spread
    assert (logits["fp32"].argmax(-1) == logits["fp16"].argmax(-1)).mean() >= 0.95


def test_fp16_export_of_the_optimum_path(package, checkpoint, tmp_path):
    """The generic exporter's graphs convert too (no GroupQueryAttention there: fp16 attention in plain ops)."""
    fp16 = tmp_path / "optimum-fp16"
    export_pair(checkpoint(), fp16, quantize="none", exporter="optimum", dtype="fp16", report=lambda _: None)
    want = DecoderState(ortspec.load(package("llama", draft=None, exporter="optimum")).target).forward(PROMPT)
    pipe = ortspec.load(fp16)
    assert pipe.manifest.target.dtype == "float16" and pipe.target.cache_dtype == np.float16
    got = DecoderState(pipe.target).forward(PROMPT)
    assert np.abs(want - got).max() <= 0.05 * want.std()
    prompt = PROMPT[:9] * 3  # repeats, so prompt lookup drafts and rolls the fp16 concat cache back
    plain = pipe.generate(prompt, max_new_tokens=24, use_draft=False)
    spec = pipe.generate(prompt, max_new_tokens=24, draft="ngram", draft_tokens=3)
    assert spec.token_ids == plain.token_ids and spec.stats.drafted_tokens > 0


def test_greedy_speculation_is_exact_on_an_fp16_target_with_an_fp32_draft(fp16_pair):
    pipe = ortspec.load(fp16_pair["fp16"])
    for start in (0, 7, 19):
        prompt = PROMPT[start : start + 9]
        plain = pipe.generate(prompt, max_new_tokens=32, use_draft=False)
        spec = pipe.generate(prompt, max_new_tokens=32, draft="model", draft_tokens=3)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.accepted_tokens > 0  # the draft did take part


def test_draft_dtype_defaults_to_the_targets_and_bad_dtypes_are_refused(checkpoint, tmp_path):
    manifest = export_pair(
        checkpoint(), tmp_path / "both", draft=checkpoint(kind="close"), dtype="fp16", report=lambda _: None
    )
    assert (manifest.target.dtype, manifest.draft.dtype) == ("float16", "float16")
    with pytest.raises(ValueError, match="draft_dtype must be one of fp32, fp16"):
        export_pair(checkpoint(), tmp_path / "bad", draft_dtype="bf16", report=lambda _: None)
    result = CliRunner().invoke(main, ["export", str(checkpoint()), "--dtype", "fp8", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'fp8' is not one of 'fp32', 'fp16'" in result.output


def test_per_model_providers_and_their_calibration_key(package):
    pipe = ortspec.load(package(), providers=["CPUExecutionProvider"], draft_providers=["CPUExecutionProvider"])
    assert pipe.target.providers == pipe.draft.providers == ["CPUExecutionProvider"]
    cpu = ["CPUExecutionProvider"]
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert calibration_key(cuda, None, 1, cpu) != calibration_key(cuda, None, 1, cuda) == calibration_key(cuda, None, 1)


@pytest.mark.parametrize("option", ["providers", "draft_providers"])
def test_a_provider_this_build_lacks_is_a_clear_error(package, option):
    if "CUDAExecutionProvider" in ortspec.runtime.model.session.ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(
        ValueError, match=r"CUDAExecutionProvider not available in this onnxruntime build.*onnxruntime-gpu"
    ):
        ortspec.load(package(), **{option: ["CUDAExecutionProvider"]})


def test_cli_takes_a_draft_provider(package):
    result = CliRunner().invoke(
        main, ["generate", str(package()), "hello", "--max-new-tokens", "4", "--draft-provider", "NoSuchProvider"]
    )
    assert result.exit_code == 1 and "NoSuchProvider not available" in result.output


def test_cuda_graph_calls_give_the_same_logits_as_plain_calls(package):
    """The graphed path's fixed buffers, updated in place, on the CPU (where nothing is captured): every call
    size, after rollbacks too, gives the logits the ordinary binding gives; and greedy speculation stays exact."""
    pipe = ortspec.load(package("llama", draft="close"))
    plain_state = DecoderState(pipe.target)
    pipe.target.cuda_graphs = True  # what a CUDA session gets; new states then take the graphed path
    graphed_state = DecoderState(pipe.target)
    assert graphed_state._graphs is not None and plain_state._graphs is None
    for state in (plain_state, graphed_state):
        state.forward(PROMPT[:12])
    for tokens, keep in [([50], 13), ([51, 52, 53], 14), ([54], 15), ([55, 56, 57, 58, 59], 17), ([60, 61], 19)]:
        want, got = plain_state.forward(tokens), graphed_state.forward(tokens)
        np.testing.assert_array_equal(got, want)
        for state in (plain_state, graphed_state):
            state.truncate(keep)
    assert sorted(graphed_state._graphs._slots) == [1, 2, 3, 5]
    plain = pipe.generate(PROMPT[:9], max_new_tokens=24, use_draft=False)
    spec = pipe.generate(PROMPT[:9], max_new_tokens=24, draft="model", draft_tokens=3)
    assert spec.token_ids == plain.token_ids and spec.stats.accepted_tokens > 0
