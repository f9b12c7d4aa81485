"""Greedy speculative decoding is exactly the target's greedy decoding, token for token."""

from __future__ import annotations

import numpy as np
import pytest

import ortspec
from ortspec.runtime.drafters.model import DraftModelProposer
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.speculation.chooser import TokenChooser
from ortspec.runtime.speculation.loop import LoopStats, speculative_decode
from ortspec.runtime.speculation.sampling import SamplingConfig

from helpers.cases import CASE_IDS, CASES
from helpers.reference import greedy_margin, hf_greedy

MAX_NEW = 24
EOS = 0  # the test checkpoints' eos id


def prompt_of(length: int, vocab: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed + length).integers(2, vocab, size=length)]


@pytest.mark.parametrize(("family", "exporter"), CASES, ids=CASE_IDS)
def test_speculative_equals_plain_equals_transformers(family, exporter, checkpoint, package):
    pipe = ortspec.load(package(family, draft="close", exporter=exporter))
    for prompt_length in (1, 6, 20):
        prompt = prompt_of(prompt_length, pipe.target.vocab_size)
        reference = hf_greedy(checkpoint(family), tuple(prompt), MAX_NEW, EOS)
        assert greedy_margin(checkpoint(family), prompt, reference) > 1e-3, "near-tied logits: comparison meaningless"
        plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
        assert plain.token_ids == reference
        assert plain.stats.drafted_tokens == 0
        for gamma in (1, 3, 5):
            spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=gamma)
            assert spec.token_ids == plain.token_ids, f"prompt length {prompt_length}, γ={gamma}"
            assert spec.stats.drafted_tokens > 0 or len(reference) == 1  # an eos first token leaves nothing to draft
            assert spec.stats.target_calls <= plain.stats.target_calls
            if len(reference) == MAX_NEW:
                assert spec.stats.finish_reason == "length"


@pytest.mark.parametrize(("exporter", "draft_exporter"), [("builder", "optimum"), ("optimum", "builder")])
def test_mixed_pairs(exporter, draft_exporter, package):
    pipe = ortspec.load(package("llama", draft="close", exporter=exporter, draft_exporter=draft_exporter))
    assert (pipe.manifest.target.exporter, pipe.manifest.draft.exporter) == (exporter, draft_exporter)
    for length, gamma in ((1, 2), (6, 4), (20, 5)):
        prompt = prompt_of(length, pipe.target.vocab_size)
        spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=gamma)
        assert spec.token_ids == pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False).token_ids
        assert spec.stats.accepted_tokens > 0


@pytest.mark.parametrize("exporter", ["builder", "optimum"])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_every_draft_accepted_when_the_draft_is_the_target(gamma, exporter, package):
    pipe = ortspec.load(package("llama", draft="same", exporter=exporter))
    prompt = prompt_of(6, pipe.target.vocab_size)
    spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=gamma)
    plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.acceptance_rate == 1.0
    rounds = spec.stats.accepted_per_round
    assert all(k == gamma for k in rounds[:-1])  # the last round may be cut short by max_new_tokens
    assert spec.stats.target_calls == 1 + -(-(MAX_NEW - 1) // (gamma + 1))  # prefill + ceil(rest / (γ+1))


@pytest.mark.parametrize("exporter", ["builder", "optimum"])
def test_no_draft_accepted_with_an_unrelated_draft(exporter, package):
    pipe = ortspec.load(package("llama", draft="other", exporter=exporter))
    prompt = prompt_of(6, pipe.target.vocab_size)
    spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=3)
    plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
    assert spec.token_ids == plain.token_ids
    assert 0 in spec.stats.accepted_per_round


@pytest.mark.parametrize("exporter", ["builder", "optimum"])
def test_close_draft_has_full_and_partial_rounds(exporter, package):
    pipe = ortspec.load(package("llama", draft="close", exporter=exporter))
    rounds = []
    for length in (3, 9, 15):
        prompt = prompt_of(length, pipe.target.vocab_size, seed=3)
        spec = pipe.generate(prompt, max_new_tokens=48, draft_tokens=3)
        assert spec.token_ids == pipe.generate(prompt, max_new_tokens=48, use_draft=False).token_ids
        rounds += spec.stats.accepted_per_round
    assert 3 in rounds and any(k < 3 for k in rounds)


@pytest.mark.parametrize(("family", "exporter"), [("llama", "builder"), ("llama", "optimum"), ("gpt2", "optimum")])
@pytest.mark.parametrize("gamma", [1, 4])
def test_stops_at_eos(family, exporter, gamma, checkpoint, package):
    pipe = ortspec.load(package(family, draft="close", exporter=exporter))
    prompt = prompt_of(5, pipe.target.vocab_size, seed=11)
    free = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False).token_ids
    stop_at = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    eos = free[stop_at]
    pipe.eos_token_ids = frozenset({eos})
    spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=gamma)
    plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
    assert plain.token_ids == free[: stop_at + 1] == hf_greedy(checkpoint(family), tuple(prompt), MAX_NEW, eos)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.finish_reason == plain.stats.finish_reason == "eos"


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize(("family", "exporter"), [("llama", "builder"), ("llama", "optimum"), ("gpt2", "optimum")])
def test_quantized_speculative_equals_quantized_plain(family, exporter, quantize, package):
    pipe = ortspec.load(package(family, draft="close", quantize=quantize, exporter=exporter))
    assert pipe.manifest.target.quantization["bits"] == int(quantize[-1])
    for length, gamma in ((2, 2), (7, 4), (16, 5)):
        prompt = prompt_of(length, pipe.target.vocab_size, seed=5)
        spec = pipe.generate(prompt, max_new_tokens=MAX_NEW, draft_tokens=gamma)
        plain = pipe.generate(prompt, max_new_tokens=MAX_NEW, use_draft=False)
        assert spec.token_ids == plain.token_ids


def test_text_prompt_and_streaming(package):
    pipe = ortspec.load(package("llama", draft="close"))
    result = pipe.generate("def fibonacci(n):", max_new_tokens=16, draft_tokens=3)
    assert len(result.token_ids) == 16
    assert result.text == pipe.tokenizer.decode(result.token_ids)
    assert result.stats.prompt_tokens == len(pipe.tokenizer.encode("def fibonacci(n):"))
    stream = pipe.stream("def fibonacci(n):", max_new_tokens=16, draft_tokens=3)
    assert "".join(stream) == result.text
    assert stream.result is not None and stream.result.token_ids == result.token_ids
    stats = result.stats
    assert stats.tokens_per_second > 0 and stats.target_calls >= 1 and stats.draft_calls >= 1
    assert 0.0 <= stats.acceptance_rate <= 1.0


class PlainStretches:
    """γ = 0 for `plain` rounds, then γ = `gamma` for `drafted` rounds, and so on: long draft catch-ups."""

    def __init__(self, plain: int, drafted: int, gamma: int) -> None:
        self.pattern = [0] * plain + [gamma] * drafted
        self.round = 0

    def next(self, context: int, remaining: int = 0, pending: int = 0) -> int:
        self.round += 1
        return self.pattern[(self.round - 1) % len(self.pattern)]

    def choose(self, proposal, context: int) -> int:
        return len(proposal.tokens)

    def observe(self, drafted: int, measured_ms: float, context: int) -> None:
        pass

    def update(self, drafted: int, accepted: int) -> None:
        pass


@pytest.mark.parametrize("window", [1, 4, 64])
def test_windowed_catch_up_keeps_output_exact(window, package):
    """A draft restarted on the last few tokens drafts from a shorter context: fewer acceptances, same output."""
    pipe = ortspec.load(package("llama", draft="same"))
    prompt = prompt_of(20, pipe.target.vocab_size)
    plain = pipe.generate(prompt, max_new_tokens=40, use_draft=False).token_ids
    proposer = DraftModelProposer(DecoderState(pipe.draft), window=window)
    chooser = TokenChooser(SamplingConfig(), np.random.default_rng(0))
    stats = LoopStats()
    rounds = speculative_decode(
        DecoderState(pipe.target), prompt, 40, pipe.eos_token_ids, chooser, proposer, PlainStretches(6, 2, 3), stats
    )
    assert [t for chunk in rounds for t in chunk] == plain
    assert stats.drafted > 0
    assert proposer.pending(prompt + plain) <= window
    if window < 20:
        assert proposer._offset > 0  # the draft really restarted on a window
    if window == 64:
        assert stats.accepted == stats.drafted  # full context: the draft is the target and agrees everywhere
