"""Exactness: the target's logits through one- and many-position calls, and how a divergence of speculative
from plain greedy output is located, measured and judged (`ortspec bench`)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.runtime import bench
from ortspec.runtime.bench import (
    MAX_NEAR_TIE,
    BenchReport,
    Divergence,
    compare_modes,
    divergence,
    path_logits,
    plain_logits,
)
from ortspec.runtime.model.decoder import DecoderState

FP32_BOUND = 1e-4  # fp32 paths: ~1e-5 measured on the tiny model (attention sums rows in another order)
PROMPT = "def fibonacci(n):"


def test_fp32_verify_calls_give_the_step_logits(package):
    pipe = ortspec.load(package("llama", None, "none"), prefix_cache=False)
    prompt = pipe.tokenizer.encode(PROMPT)
    answer = pipe.generate(prompt, max_new_tokens=24, use_draft=False).token_ids
    logits = path_logits(DecoderState(pipe.target), prompt, answer)
    assert list(logits["steps"].argmax(-1)) == answer  # the replay is plain decoding
    for path in ("verify", "chunk"):
        assert np.abs(logits[path] - logits["steps"]).max() <= FP32_BOUND, path


def test_int4_calls_of_several_positions_move_logits_by_kernel_noise(package):
    """The class of problem: int8 compute (MatMulNBits accuracy level 4) turns the last-bit differences of
    one- and many-position attention into whole quantization steps, so int4 logits depend on how the
    sequence was cut into calls far beyond fp32's. Bounded all the same: more would be a broken path."""
    pipe = ortspec.load(package("llama", None, "int4"), prefix_cache=False)
    prompt = pipe.tokenizer.encode(PROMPT)
    answer = pipe.generate(prompt, max_new_tokens=24, use_draft=False).token_ids
    logits = path_logits(DecoderState(pipe.target), prompt, answer)
    assert list(logits["steps"].argmax(-1)) == answer
    moved = max(float(np.abs(logits[p] - logits["steps"]).max()) for p in ("verify", "chunk"))
    print(f"\nint4 tiny model: one- vs many-position logits differ by up to {moved:.4f}")
    assert FP32_BOUND < moved < MAX_NEAR_TIE, "if int4 paths now agree like fp32's, near-ties should vanish too"
    # the bench reads plain decoding's own logits, bit for bit, not those of another path
    for position in (0, 5, len(answer) - 1):
        assert np.array_equal(plain_logits(pipe, prompt, answer, position), logits["steps"][position])


def test_divergence_is_measured_at_the_first_differing_token_in_plain_logits(package):
    pipe = ortspec.load(package("llama", None, "int4"))
    prompt = pipe.tokenizer.encode(PROMPT)
    answer = pipe.generate(prompt, max_new_tokens=16, use_draft=False).token_ids
    steps = path_logits(DecoderState(pipe.target), prompt, answer)["steps"]
    k = 6
    second = int(np.argsort(steps[k])[-2])
    other = [*answer[:k], second, *(t + 1 for t in answer[k + 1 :])]  # differs at k and everywhere after
    found = divergence(pipe, [prompt], 0, answer, other)
    assert (found.position, found.plain_token, found.speculative_token) == (k, answer[k], second)
    assert found.gap == float(steps[k][answer[k]] - steps[k][second]) >= 0
    assert "new token 6" in found.describe(pipe.tokenizer) and f"{found.gap:.4f}" in found.describe()
    ended = divergence(pipe, [prompt], 0, answer, answer[:k])
    assert ended.position == k and ended.gap == float("inf") and "(end)" in ended.describe()


def test_bench_reports_a_real_divergence_as_a_mismatch_and_exact_outputs_as_such(package):
    pipe = ortspec.load(package("llama", "close", "none"))
    prompts = [PROMPT, "class Stack:"]
    modes = {"speculative": dict(draft_tokens=3), "penalized": dict(use_draft=False, repetition_penalty=3.0)}
    reports = compare_modes(pipe, prompts, modes, max_new_tokens=24, repeats=1, warmup=False)
    assert pipe.target_states.reuse  # the prefix cache is back on after the bench
    exact, broken = reports["speculative"], reports["penalized"]
    assert exact.divergences == [] and exact.mismatches == []
    noise = broken.path_noise
    assert noise is not None and noise <= FP32_BOUND and broken.near_tie == noise
    assert len(broken.divergences) == 2 and broken.mismatches == broken.divergences
    for found in broken.divergences:
        plain = pipe.generate(prompts[found.prompt], max_new_tokens=24, use_draft=False).token_ids
        penalized = pipe.generate(prompts[found.prompt], max_new_tokens=24, **modes["penalized"]).token_ids
        assert plain[: found.position] == penalized[: found.position]
        assert (plain[found.position], penalized[found.position]) == (found.plain_token, found.speculative_token)
        assert found.gap > 10 * noise
    with pytest.raises(ValueError, match="would excuse real mismatches"):
        compare_modes(pipe, prompts, modes, max_new_tokens=4, near_tie=MAX_NEAR_TIE * 2)


def test_cli_bench_prints_every_divergence_and_fails_beyond_a_near_tie(package, tmp_path, monkeypatch):
    out = package("llama", None, "int4")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n")

    def fake(divergences: list[Divergence]):
        def compare(pipe, prompts, **options):
            runs = len(divergences) + 1
            report = BenchReport(prompts=1, runs=runs, divergences=divergences, near_tie=0.3, path_noise=0.3)
            report.plain.new_tokens = report.speculative.new_tokens = 8
            return report

        return compare

    tie, beyond = Divergence(0, 3, 5, 6, 0.12), Divergence(0, 7, 8, 9, 0.9)
    args = ["bench", str(out), "--prompts", str(prompts), "--max-new-tokens", "8", "--repeats", "1"]
    monkeypatch.setattr(bench, "compare", fake([tie]))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "near-tie (1 run): prompt 0, new token 3:" in result.output and "logit gap 0.1200" in result.output
    assert "near-tie bound 0.3000 (the path noise measured on these prompts: 0.3000)" in result.output
    monkeypatch.setattr(bench, "compare", fake([tie, tie, beyond]))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "MISMATCH (1 run): prompt 0, new token 7:" in result.output and "logit gap 0.9000" in result.output
    assert "near-tie (2 runs): prompt 0, new token 3:" in result.output
    assert "1 of 4 speculative outputs left plain decoding beyond a near-tie" in result.output
