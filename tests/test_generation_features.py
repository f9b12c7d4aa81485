"""Sampling processors, prompt lookup, adaptive γ, streaming, stop strings and chat templates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.export import export_pair
from ortspec.runtime.drafters.ngram import NgramProposer
from ortspec.runtime.speculation.sampling import SamplingConfig, probabilities

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def fibonacci(n):"},
    {"role": "assistant", "content": "return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"},
    {"role": "user", "content": "Ünïcödé 日本語 ✓ too?"},
]


@pytest.mark.parametrize(
    "config",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=5),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
    ],
)
def test_processed_probabilities_match_transformers(config):
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=64).astype(np.float32)
    seen = [1, 5, 5, 9, 40]
    processors = []
    if config.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config["repetition_penalty"]))
    processors.append(TemperatureLogitsWarper(config["temperature"]))
    if config.get("top_k"):
        processors.append(TopKLogitsWarper(config["top_k"]))
    if config.get("top_p", 1.0) < 1.0:
        processors.append(TopPLogitsWarper(config["top_p"]))
    if config.get("min_p"):
        processors.append(MinPLogitsWarper(config["min_p"]))
    scores = torch.tensor(logits)[None]
    for processor in processors:
        scores = processor(torch.tensor([seen]), scores)
    expected = torch.softmax(scores.double(), -1)[0].numpy()
    got = probabilities(logits, SamplingConfig(**config), seen)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_prompt_lookup_is_exact_and_accepts_on_repeats(package):
    pipe = ortspec.load(package("llama", draft=None))
    assert pipe.draft is None
    rng = np.random.default_rng(1)
    accepted = 0
    for _ in range(4):
        phrase = [int(t) for t in rng.integers(2, pipe.target.vocab_size, size=6)]
        prompt = phrase * 3
        plain = pipe.generate(prompt, max_new_tokens=40, use_draft=False)
        for gamma in (2, "adaptive"):
            spec = pipe.generate(prompt, max_new_tokens=40, draft="ngram", draft_tokens=gamma)
            assert spec.token_ids == plain.token_ids
            assert spec.stats.drafter == "ngram" and spec.stats.draft_calls == 0
            accepted += spec.stats.accepted_tokens
    assert accepted > 0
    with pytest.raises(ValueError, match="no draft model"):
        pipe.generate([5, 6], draft="model")


def test_adaptive_draft_length_is_exact_and_adapts(package):
    pipe = ortspec.load(package("llama", draft="close"))
    for seed in range(3):
        prompt = [int(t) for t in np.random.default_rng(seed).integers(2, pipe.target.vocab_size, size=8)]
        fixed = pipe.generate(prompt, max_new_tokens=48, draft="model", draft_tokens=4)
        adaptive = pipe.generate(prompt, max_new_tokens=48, draft="model", draft_tokens="adaptive", draft_tokens_max=7)
        early = pipe.generate(prompt, max_new_tokens=48, draft="model", draft_tokens=4, draft_min_prob=0.5)
        assert adaptive.token_ids == fixed.token_ids == early.token_ids
        assert max(adaptive.stats.drafted_per_round) <= 7
    same = ortspec.load(package("llama", draft="same"))
    full = same.generate([5, 6, 7], max_new_tokens=60, draft="model", draft_tokens="adaptive", draft_tokens_max=8)
    assert full.stats.drafted_per_round[:3] == (4, 6, 8)  # every round fully accepted: γ grows by 2


def test_streaming_never_splits_a_character(package):
    pipe = ortspec.load(package("llama", draft="close"))
    text = "Ünïcödé 日本語 ✓ and 🙂"
    ids = pipe.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    decoder = pipe.tokenizer.stream()
    deltas = [decoder.push([t]) for t in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some tokens had to wait for the rest of their character
    for prompt in ("Ünïcödé", "日本語 ✓", "def f(x):"):
        stream = pipe.stream(prompt, max_new_tokens=40)
        assert "".join(stream) == stream.result.text == pipe.tokenizer.decode(stream.result.token_ids)


def test_stop_strings_end_the_text_and_are_never_streamed(package):
    pipe = ortspec.load(package("llama", draft="close"))
    prompt = "def fibonacci(n):"
    full = pipe.generate(prompt, max_new_tokens=60)
    assert len(full.text) > 20
    stop = full.text[12:15]
    cut = full.text[: full.text.find(stop)]
    for gamma in (1, 4):
        stream = pipe.stream(prompt, max_new_tokens=60, stop=["never-there", stop], draft_tokens=gamma)
        deltas = list(stream)
        result = stream.result
        assert "".join(deltas) == result.text == cut
        assert stop not in "".join(deltas)
        assert result.stats.finish_reason == "stop"
        assert result.token_ids == full.token_ids[: len(result.token_ids)]
        assert stop in pipe.tokenizer.decode(result.token_ids)  # the ids include the stop string's tokens
    assert pipe.generate(prompt, max_new_tokens=60, stop=["never-there"]).text == full.text


@pytest.mark.parametrize("template", [QWEN2_TEMPLATE, ZEPHYR_TEMPLATE], ids=["qwen2-chatml", "zephyr"])
def test_chat_template_renders_like_transformers(template, checkpoint, tmp_path):
    from transformers import AutoTokenizer

    source = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama"), source)
    config_path = source / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    export_pair(source, tmp_path / "pkg", quantize="none", report=lambda _: None)
    pipe = ortspec.load(tmp_path / "pkg")
    reference = AutoTokenizer.from_pretrained(source)
    for add in (True, False):
        expected = reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add)
        assert pipe.chat_prompt(MESSAGES, add_generation_prompt=add) == list(expected)
    reply = pipe.chat(MESSAGES, max_new_tokens=8)
    assert reply.token_ids == pipe.generate(pipe.chat_prompt(MESSAGES), max_new_tokens=8).token_ids

    result = CliRunner().invoke(main, ["chat", str(tmp_path / "pkg"), "--max-new-tokens", "5"], input="hello\n/exit\n")
    assert result.exit_code == 0, result.output


def test_chat_without_template_is_a_clear_error(package):
    pipe = ortspec.load(package("llama", draft="close"))
    with pytest.raises(ortspec.ChatTemplateError, match="no chat template"):
        pipe.chat([{"role": "user", "content": "hi"}])
    result = CliRunner().invoke(main, ["chat", str(package("llama", draft="close"))], input="hi\n")
    assert result.exit_code == 1 and "no chat template" in result.output


def test_cli_sampling_and_ngram_options(package):
    root = str(package("llama", draft="close"))
    runner = CliRunner()
    args = ["generate", root, "def f(x):", "--max-new-tokens", "10", "--temperature", "0.8", "--top-p", "0.9"]
    first = runner.invoke(main, [*args, "--seed", "3"])
    assert first.exit_code == 0 and first.output == runner.invoke(main, [*args, "--seed", "3"]).output
    ngram = runner.invoke(main, ["generate", root, "a b a b a b", "--draft", "ngram", "--draft-tokens", "adaptive"])
    assert ngram.exit_code == 0, ngram.output
    bad = runner.invoke(main, ["generate", root, "x", "--draft-tokens", "lots"])
    assert bad.exit_code == 2 and "draft_tokens must be a positive integer, 'adaptive' or 'auto'" in bad.output


def test_repetition_penalty_is_exact_under_speculation(package):
    """The penalty depends on each position's history (prompt + drafts so far): spec must match plain."""
    pipe = ortspec.load(package("llama", draft="same"))
    prompt = [5, 6, 7, 5, 6, 7]
    plain = pipe.generate(prompt, max_new_tokens=32, use_draft=False, repetition_penalty=1.8)
    assert plain.token_ids != pipe.generate(prompt, max_new_tokens=32, use_draft=False).token_ids
    for gamma in (1, 4):
        spec = pipe.generate(prompt, max_new_tokens=32, draft_tokens=gamma, repetition_penalty=1.8)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.acceptance_rate == 1.0  # the draft (a copy) applies the same penalty


def test_ngram_index_finds_the_latest_earlier_occurrence():
    """The incremental index proposes what a full scan for the latest earlier match would."""

    def scan(tokens, count, max_n):
        for n in range(min(max_n, len(tokens) - 1), 0, -1):
            suffix = tokens[-n:]
            starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
            if starts:
                return tokens[starts[-1] + n : starts[-1] + n + count]
        return []

    rng = np.random.default_rng(0)
    for max_n in (1, 2, 3, 5):
        proposer = NgramProposer(max_n)
        tokens = [int(t) for t in rng.integers(0, 6, size=3)]
        for _ in range(200):
            assert proposer.propose(tokens, 4, None).tokens == scan(tokens, 4, max_n)
            tokens += [int(t) for t in rng.integers(0, 6, size=int(rng.integers(1, 4)))]
        assert proposer.propose([3, 1, 3], 2, None).tokens == [1, 3]  # a new, shorter sequence: index rebuilt
