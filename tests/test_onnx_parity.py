"""ONNX fp32 logits from our runtime match PyTorch's: prefill, single steps, chunks on a past, rollback."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FAMILIES


def torch_logits(checkpoint_dir, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_pytorch(family, checkpoint, package):
    import ortspec

    pipe = ortspec.load(package(family, draft=None))
    ids = [int(i) for i in np.random.default_rng(0).integers(2, pipe.target.vocab_size, size=14)]
    expected = torch_logits(checkpoint(family), ids)
    decoder = pipe.target
    decoder.reset()
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
    decoder.truncate(9)  # roll back 4 positions, then overwrite them with a different chunk length
    got = decoder.forward(ids[9:14])
    np.testing.assert_allclose(got, expected[9:14], atol=1e-4, rtol=0, err_msg="after truncate")
    assert decoder.length == 14
