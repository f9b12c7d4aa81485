"""`ortspec eval`: perplexity, top-1 agreement and KL against a reference, checked against PyTorch."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.runtime.evaluate import CHUNK, evaluate, windows
from ortspec.runtime.model.decoder import DecoderState

from helpers.reference import hf_model


def random_windows(vocab: int, count: int = 3, length: int = CHUNK + 72, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return windows(rng.integers(0, vocab, count * length).tolist(), length)


def whole_window_logprobs(model, piece: list[int]) -> torch.Tensor:
    decoder = DecoderState(model)
    return torch.log_softmax(torch.from_numpy(decoder.forward(piece[:-1])).double(), -1)


def test_windows_cut_the_text_and_lead_with_the_prefix():
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(7)), 4, prefix=[99]) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6]]
    assert windows([5], 4) == []  # nothing to predict
    with pytest.raises(ValueError, match="window"):
        windows(list(range(10)), 2, prefix=[1])


def test_perplexity_equals_pytorch(checkpoint, package):
    pipe = ortspec.load(package("llama", None, "none"))
    pieces = random_windows(pipe.target.vocab_size)
    report = evaluate(pipe.target, pieces)
    model = hf_model(checkpoint("llama"))
    nll = count = 0.0
    with torch.no_grad():
        for piece in pieces:
            logits = model(torch.tensor([piece])).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(piece[1:]), reduction="sum"))
            count += len(piece) - 1
    assert report.tokens == count
    assert report.perplexity == pytest.approx(np.exp(nll / count), rel=1e-4)
    assert report.top1_agreement is None and report.mean_kl is None


def test_reference_agreement_and_kl_match_a_whole_window_computation(package):
    fp32 = ortspec.load(package("llama", None, "none"))
    int4 = ortspec.load(package("llama", None, "int4"))
    pieces = random_windows(fp32.target.vocab_size, seed=1)

    same = evaluate(fp32.target, pieces, reference=fp32.target)
    assert same.top1_agreement == 1.0 and same.mean_kl == pytest.approx(0.0, abs=1e-9)
    assert same.reference_perplexity == pytest.approx(same.perplexity)

    report = evaluate(int4.target, pieces, reference=fp32.target)
    agree = kl = 0.0
    for piece in pieces:  # one call per window, torch's log_softmax: independent of the chunking
        logp, ref_logp = (whole_window_logprobs(d, piece) for d in (int4.target, fp32.target))
        agree += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        kl += float(torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
    assert report.top1_agreement == pytest.approx(agree / report.tokens)
    assert report.mean_kl == pytest.approx(kl / report.tokens, rel=1e-3)
    assert report.mean_kl > 0  # int4 weights do change the distribution
    assert report.reference_perplexity == pytest.approx(evaluate(fp32.target, pieces).perplexity)


def test_eval_command_on_the_default_pair(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTSPEC_CACHE", str(tmp_path / "cache"))
    from ortspec.models.default_pair import default_package

    int4 = default_package("int4", report=lambda _: None)
    fp32 = default_package("none", report=lambda _: None)
    text = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    result = CliRunner().invoke(
        main, ["eval", str(int4), "--text", str(text), "--reference", str(fp32), "--max-tokens", "600"]
    )
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "598 positions scored in 2 windows" in lines["text"]  # 600 tokens: 511 + 87 predictions
    pipe, ref = ortspec.load(int4), ortspec.load(fp32)
    tokens = pipe.tokenizer.encode(text.read_text(), add_special_tokens=False)[:600]
    api = evaluate(pipe.target, windows(tokens, 512), reference=ref.target)  # what the command must print
    assert f"perplexity  {api.perplexity:.3f} (reference {api.reference_perplexity:.3f}" in result.output
    assert f"{api.top1_agreement:.1%}" in lines["top-1"] and f"{api.mean_kl:.4f}" in lines["mean"]
    assert 0.5 < api.top1_agreement < 1 and api.mean_kl > 0  # int4 changes a few top-1 tokens, not most

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    result = CliRunner().invoke(main, ["eval", str(int4), "--text", str(bad)])
    assert result.exit_code != 0 and "is not UTF-8 text" in result.output
