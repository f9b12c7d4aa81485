"""ONNX fp32 logits from our runtime match PyTorch's: prefill, single steps, chunks on a past, rollback."""

from __future__ import annotations

import numpy as np
import pytest

import ortspec
from ortspec.export.families import FAMILIES
from ortspec.runtime.model.decoder import DecoderState

from helpers.cases import CASE_IDS, CASES
from helpers.reference import hf_logits, hf_model

BUILDER_VARIANTS = [
    *[("llama", variant) for variant in ("head-dim-40", "llama3-rope", "bf16", "sharded", "tied")],
    ("qwen3", "head-dim-40"),
    pytest.param("gemma3_text", "vocab-262k", marks=pytest.mark.slow),
]


def check_against_pytorch(pipe, checkpoint_dir) -> None:
    ids = [int(i) for i in np.random.default_rng(0).integers(2, pipe.target.vocab_size, size=40)]
    expected = hf_logits(checkpoint_dir, ids)
    decoder = DecoderState(pipe.target)
    steps = [
        ("prefill", slice(0, 8)),
        ("single step", slice(8, 9)),
        ("single step", slice(9, 10)),
        ("chunk on a past", slice(10, 13)),
    ]
    for what, span in steps:
        got = decoder.forward(ids[span])
        np.testing.assert_allclose(got, expected[span], atol=1e-4, rtol=0, err_msg=what)
    assert decoder.length == 13
    decoder.truncate(10)  # a prompt's chunk scored at its last position alone (builder graphs: one row)
    got = decoder.forward(ids[10:13], last_only=True)
    assert len(got) in ((1, 2) if pipe.target.scores_tail else (3,))  # a longrope switch may split it in two
    np.testing.assert_allclose(got[-1], expected[12], atol=1e-4, rtol=0, err_msg="last only")
    assert pipe.target.scores_tail == (pipe.manifest.target.exporter == "builder")
    decoder.truncate(9)  # roll back 4 positions, then overwrite them with a longer chunk
    got = decoder.forward(ids[9:30])
    np.testing.assert_allclose(got, expected[9:30], atol=1e-4, rtol=0, err_msg="after truncate")
    for position in range(30, 40):  # single steps well past any sliding window
        np.testing.assert_allclose(
            decoder.forward(ids[position : position + 1])[0], expected[position], atol=1e-4, rtol=0
        )
    assert decoder.length == 40
    decoder.truncate(20)  # a long rollback (past sliding windows, below phi3's longrope switch), then regrow
    np.testing.assert_allclose(decoder.forward(ids[20:36]), expected[20:36], atol=1e-4, rtol=0, err_msg="regrown")


@pytest.mark.parametrize(("family", "exporter"), CASES, ids=CASE_IDS)
def test_logits_match_pytorch(family, exporter, checkpoint, package):
    pipe = ortspec.load(package(family, draft=None, exporter=exporter))
    assert pipe.manifest.target.exporter == exporter
    assert pipe.manifest.target.kv_layout == ("shared-buffer" if exporter == "builder" else "concat")
    check_against_pytorch(pipe, checkpoint(family))


def test_families_marked_tested_are_the_tested_ones():
    assert {f.name for f in FAMILIES.values() if f.tested} == {family for family, _ in CASES}
    assert {f.name for f in FAMILIES.values() if f.builder} == {family for family, e in CASES if e == "builder"}


@pytest.mark.parametrize(("family", "variant"), BUILDER_VARIANTS)
def test_builder_variants_match_pytorch(family, variant, checkpoint, package):
    pipe = ortspec.load(package(family, draft=None, exporter="builder", variant=variant))
    check_against_pytorch(pipe, checkpoint(family, variant=variant))
    if variant == "head-dim-40":
        assert pipe.manifest.target.head_dim == 48  # zero-padded to a multiple of 16 for GroupQueryAttention


def test_sliding_window_matters_in_the_reference(checkpoint):
    """The sliding-window cases above can only fail if the window changes the logits: check it does."""
    import torch
    import transformers

    directory = checkpoint("mistral")
    windowed = hf_model(directory)
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(directory, sliding_window=None).eval()
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        assert not torch.allclose(windowed(ids).logits[0, -1], unwindowed(ids).logits[0, -1], atol=1e-3)
