"""Feature-level draft heads: the ONNX graph equals the PyTorch head, drafting with one is exact, the
head's cache only ever holds the target's own features, and `distill` makes a loadable head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import ortspec
from ortspec.export import export_pair
from ortspec.export.builder import UnsupportedModelError, weight_reader
from ortspec.export.builder.head import HEAD_CONFIG, HEAD_KIND, head_decoder_config
from ortspec.export.checkpoint import resolve_checkpoint
from ortspec.export.distill import DistillConfig, distill, vocabulary_subset
from ortspec.export.distill.head_model import FeatureHead
from ortspec.runtime import pipeline as pipeline_module
from ortspec.runtime.drafters.model import FeatureHeadProposer
from ortspec.runtime.model.decoder import DecoderState

from helpers.heads import make_head

PROMPT = list(range(5, 29))


@pytest.fixture(scope="module", params=[(), (1,)], ids=["final-features", "fused-features"])
def head_package(
    checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Path:
    root = tmp_path_factory.mktemp("head")
    head = make_head(checkpoint("llama"), root / "head", feature_layers=request.param)
    out = root / "pkg"
    export_pair(checkpoint("llama"), out, draft=head, quantize="none", report=lambda _: None)
    return out


@pytest.mark.parametrize("feature_layers", [(), (1,)])
def test_head_graph_matches_pytorch(
    checkpoint: Callable[..., Path], tmp_path: Path, feature_layers: tuple[int, ...]
) -> None:
    """The ONNX head (prefill of several pairs, then single steps on its cache) == the PyTorch head, also
    one reading fused features (its input scale folded into the saved fc)."""
    from safetensors.numpy import load_file

    from ortspec.export.distill.head_model import LAYER_PARTS

    target = checkpoint("llama")
    head_dir = make_head(target, tmp_path / "head", subset_size=64, seed=3, feature_layers=feature_layers)
    out = tmp_path / "pkg"
    export_pair(target, out, draft=head_dir, quantize="none", report=lambda _: None)
    pipe = ortspec.load(out)
    assert pipe.manifest.draft.kind == HEAD_KIND and pipe.manifest.format_version == 2

    ckpt = resolve_checkpoint(target)
    reader = weight_reader(ckpt.path, ckpt.config)
    weights = {
        k: v.astype(np.float32) if v.dtype == np.float16 else v
        for k, v in load_file(str(head_dir / "head.safetensors")).items()
    }
    subset, parts = weights["vocab_subset"], 1 + len(feature_layers)
    head = FeatureHead(head_decoder_config(reader.cfg), reader.embedding(), reader.lm_head()[:, subset].T, parts)
    head.layer.load_state_dict({n: torch.from_numpy(weights[f"model.layers.0.{n}"]) for n in LAYER_PARTS})
    head.fc.weight.data = torch.from_numpy(weights["fc.weight"])
    head.norm.weight.data = torch.from_numpy(weights["model.norm.weight"])

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, reader.cfg.vocab_size, 12)
    features = rng.normal(size=(12, parts * reader.cfg.hidden)).astype(np.float32)
    with torch.no_grad():
        want_hidden, want_scores = head(torch.from_numpy(tokens)[None], torch.from_numpy(features)[None])
    draft = DecoderState(pipe.draft)
    logits = [draft.forward(tokens[:8], features[:8])]
    hidden = [draft.hidden]
    for i in range(8, 12):
        logits.append(draft.forward(tokens[i : i + 1], features[i : i + 1]))
        hidden.append(draft.hidden)
    logits, hidden = np.concatenate(logits), np.concatenate(hidden)
    np.testing.assert_allclose(hidden, want_hidden[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(logits[:, subset], want_scores[0].numpy(), atol=1e-3)
    outside = np.setdiff1d(np.arange(reader.cfg.vocab_size), subset)
    assert np.all(np.isneginf(logits[:, outside]))  # it never proposes a token outside its subset
    catch_up = DecoderState(pipe.draft).forward(tokens[:8], features[:8], last_only=True)  # scores the last alone
    assert catch_up.shape == (1, reader.cfg.vocab_size)
    np.testing.assert_allclose(catch_up, logits[7:8], atol=1e-4)


@pytest.mark.parametrize("draft_tokens", [1, 3, "auto"])
def test_head_speculation_equals_plain(head_package: Path, draft_tokens: int | str) -> None:
    pipe = ortspec.load(head_package)
    plain = pipe.generate(PROMPT, max_new_tokens=40, use_draft=False)
    spec = pipe.generate(PROMPT, max_new_tokens=40, draft="model", draft_tokens=draft_tokens)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.drafter == "head"
    if draft_tokens != "auto":
        assert spec.stats.drafted_tokens > 0 and spec.stats.draft_calls > 0


def test_head_sampling_runs_from_the_full_vocabulary(head_package: Path) -> None:
    """Sampled drafts come from the head's subset, the target still samples its own distribution."""
    pipe = ortspec.load(head_package)
    res = pipe.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=4, draft_tokens=2)
    again = pipe.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=4, draft_tokens=2)
    assert res.token_ids == again.token_ids and res.stats.drafted_tokens > 0
    assert all(0 <= t < pipe.target.vocab_size for t in res.token_ids)


def test_head_cache_holds_only_target_features(head_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each round's first draft equals what a fresh head computes from the target's features of the
    committed sequence: the head re-read the committed positions with the target's own features."""
    pipe = ortspec.load(head_package)
    seen: list[tuple[list[int], np.ndarray]] = []

    class Recording(FeatureHeadProposer):
        def _read(self, tokens, start, end):  # type: ignore[no-untyped-def]
            logits = super()._read(tokens, start, end)
            seen.append((list(tokens), logits[-1].copy()))
            return logits

    def recording(kind, config, target, draft, length, memory, shared_vocab=None):  # type: ignore[no-untyped-def]
        return Recording(draft, target, window=1000)

    monkeypatch.setattr(pipeline_module, "new_proposer", recording)
    pipe.generate(PROMPT, max_new_tokens=30, draft="model", draft_tokens=3)
    assert len(seen) > 3
    target, head = DecoderState(pipe.target), DecoderState(pipe.draft)
    for tokens, logits in seen[1:]:
        target.reset()
        target.forward(tokens)
        features = target.hidden
        head.reset()
        fresh = head.forward(tokens[1:], features[:-1])[-1]
        finite = np.isfinite(fresh)
        np.testing.assert_allclose(logits[finite], fresh[finite], atol=1e-3)


@pytest.mark.parametrize("window", [1000, 4])
def test_head_reads_the_target_features_of_the_positions_it_catches_up_on(
    head_package: Path, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head keeps the last `window` positions' features in a ring: whatever it catches up on (the
    prompt, a round's committed tokens, a restart on the last `window`), it reads the target's own
    features of exactly those positions, and the output stays the target's."""
    pipe = ortspec.load(head_package)
    plain = pipe.generate(PROMPT, max_new_tokens=40, use_draft=False)
    reads: list[tuple[list[int], int, int, np.ndarray]] = []

    class Recording(FeatureHeadProposer):
        def _read(self, tokens, start, end):  # type: ignore[no-untyped-def]
            reads.append((list(tokens), start, end, self._features[self._rows(start, end)].copy()))
            return super()._read(tokens, start, end)

    def recording(kind, config, target, draft, length, memory, shared_vocab=None):  # type: ignore[no-untyped-def]
        return Recording(draft, target, window=window)

    monkeypatch.setattr(pipeline_module, "new_proposer", recording)
    spec = pipe.generate(PROMPT, max_new_tokens=40, draft="model", draft_tokens=2)
    assert spec.token_ids == plain.token_ids
    assert len(reads) > 5 and max(end for _, _, end, _ in reads) > 3 * min(window, 16)
    target = DecoderState(pipe.target)
    for tokens, start, end, features in reads:
        target.reset()
        target.forward(tokens[:end])
        np.testing.assert_allclose(features, target.hidden[start:end], atol=1e-4)


def test_target_features_hold_its_inner_layers(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """hidden_states of a target built for a fused head: the final features, then the RMS-normalised
    residual stream after each feature layer, as transformers computes them."""
    from transformers import AutoModelForCausalLM

    from ortspec.runtime.model.onnx_model import Model
    from ortspec.runtime.package.manifest import load_manifest

    ckpt = checkpoint("llama", variant="deep")
    out = tmp_path / "pkg"
    export_pair(ckpt, out, quantize="none", feature_layers=(3, 1), report=lambda _: None)
    manifest = load_manifest(out)
    state = DecoderState(Model.load(manifest.target, manifest.root, max_length=64, keep_hidden=True))
    state.forward(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        states = model.model(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    eps = model.config.rms_norm_eps
    inner = [states[k][0] / (states[k][0].pow(2).mean(-1, keepdim=True) + eps).sqrt() for k in (3, 1)]
    want = torch.cat([states[-1][0], *inner], -1).numpy()
    np.testing.assert_allclose(state.hidden, want, atol=1e-4)
    with pytest.raises(ValueError, match="distinct inner layers"):
        export_pair(ckpt, tmp_path / "bad", quantize="none", feature_layers=(4,), report=lambda _: None)
    with pytest.raises(ValueError, match="feature layers need the target built by the builder"):
        export_pair(ckpt, tmp_path / "opt", exporter="optimum", feature_layers=(1,), report=lambda _: None)


def test_head_for_another_layout_is_refused(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """A fused head beside a target whose features lack its layers fails at once, saying what to do."""
    from ortspec.runtime.model.onnx_model import Model
    from ortspec.runtime.package.manifest import load_manifest

    def state(package: Path, role: str):  # type: ignore[no-untyped-def]
        manifest = load_manifest(package)
        return DecoderState(Model.load(getattr(manifest, role), manifest.root, max_length=64, keep_hidden=True))

    target = checkpoint("llama")
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    head = make_head(target, tmp_path / "head", feature_layers=(1,))
    export_pair(target, plain, quantize="none", report=lambda _: None)
    export_pair(target, fused, draft=head, quantize="none", report=lambda _: None)
    FeatureHeadProposer(state(fused, "draft"), state(fused, "target"))
    with pytest.raises(ValueError, match="export the package again with the head"):
        FeatureHeadProposer(state(fused, "draft"), state(plain, "target"))


def test_head_for_another_target_is_refused(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    head = make_head(checkpoint("llama"), tmp_path / "head")
    with pytest.raises(UnsupportedModelError, match="trained for another target"):
        export_pair(checkpoint("llama", "other"), tmp_path / "pkg", draft=head, report=lambda _: None)


def test_vocabulary_subset_takes_the_most_frequent() -> None:
    subset, coverage = vocabulary_subset([[1, 1, 1, 2, 2, 3], [1, 4]], 2, vocab_size=10)
    assert subset.tolist() == [1, 2] and coverage == pytest.approx(6 / 8)


def test_distill_makes_a_loadable_head(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """A seconds-long run on a tiny target (trained on local text: it has no chat template), resumed once."""
    text = tmp_path / "text.txt"
    text.write_text((Path(ortspec.__file__).parent / "runtime" / "pipeline.py").read_text(encoding="utf-8")[:6000])
    config = DistillConfig(minutes=0.05, text=(str(text),), quantize="none", vocab=64, held_out=0, threads=1)
    out = distill(str(checkpoint("llama")), tmp_path / "head", config, report=lambda _: None)
    head_config = json.loads((out / HEAD_CONFIG).read_text())
    first = head_config["training"]
    assert first["steps"] > 0 and first["vocab_subset"] <= 64
    assert head_config["feature_layers"] == [1]  # the default: an inner layer of the two, besides the final
    with pytest.raises(ValueError, match="--feature-layers 1"):  # its data holds layer 1's features
        distill(str(checkpoint("llama")), out, DistillConfig(**{**config.__dict__, "feature_layers": ()}))
    distill(str(checkpoint("llama")), out, DistillConfig(**{**config.__dict__, "minutes": 0.1}), report=lambda _: None)
    second = json.loads((out / HEAD_CONFIG).read_text())["training"]
    assert second["steps"] > first["steps"]  # resumed from the checkpoint, not started over
    pkg = tmp_path / "pkg"
    export_pair(checkpoint("llama"), pkg, draft=out, quantize="int4", report=lambda _: None)
    pipe = ortspec.load(pkg)
    res = pipe.generate(PROMPT, max_new_tokens=12, draft="model", draft_tokens=2)
    assert res.stats.drafter == "head" and len(res.token_ids) == 12


def test_head_and_target_features_on_the_graphed_path(head_package: Path) -> None:
    """The CUDA-graph path's fixed buffers (cuda_graphs.py) also carry the target's features out and the
    head's features in; on the CPU nothing is captured, so this checks the buffers' bookkeeping."""
    pipe = ortspec.load(head_package)
    ordinary = DecoderState(pipe.target), DecoderState(pipe.draft)
    pipe.target.cuda_graphs = pipe.draft.cuda_graphs = True  # what CUDA sessions of an fp16 package get
    graphed = DecoderState(pipe.target), DecoderState(pipe.draft)
    assert graphed[0]._graphs is not None and graphed[1]._graphs is not None
    results = []
    for target, head in (ordinary, graphed):
        target.forward(PROMPT[:10])
        head.forward(PROMPT[1:10], features=target.hidden[:-1])
        rows = []
        for token in (PROMPT[10], PROMPT[11]):
            logits = target.forward([token])
            rows.append((logits, target.hidden.copy(), head.forward([token], features=target.hidden)))
        results.append(rows)
    for want, got in zip(*results, strict=True):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    plain = pipe.generate(PROMPT, max_new_tokens=40, use_draft=False)
    assert pipe.generate(PROMPT, max_new_tokens=40, draft_tokens=3).token_ids == plain.token_ids


@pytest.mark.parametrize("bf16", [False, True])
def test_head_training_learns_in_both_precisions(checkpoint: Callable[..., Path], tmp_path: Path, bf16: bool) -> None:
    """Forty steps of `train_head` cut the loss on sequences whose next features depend on the token read
    (bfloat16 autocast keeps float32 weights, so it must learn as float32 does)."""
    from ortspec.export.distill.train import TrainConfig, head_losses, train_head

    reader = weight_reader(*(lambda c: (c.path, c.config))(resolve_checkpoint(checkpoint("llama"))))
    cfg, subset = reader.cfg, np.arange(64)
    torch.manual_seed(0)
    head = FeatureHead(head_decoder_config(cfg), reader.embedding(), reader.lm_head()[:, subset].T)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((cfg.vocab_size, cfg.hidden)).astype(np.float32)  # features follow the token read
    tokens = [rng.integers(0, 64, 48) for _ in range(24)]
    features = [table[t].astype(np.float16) for t in tokens]
    config = TrainConfig(seconds=120.0, chunk=16, batch=8, lr=3e-3, warmup_steps=5, noise=0.0, bf16=bf16, max_steps=40)
    batch = (
        torch.from_numpy(np.stack([t[1:17] for t in tokens])),
        torch.from_numpy(np.stack([f[:16] for f in features]).astype(np.float32)),
        torch.from_numpy(np.stack([f[1:17] for f in features]).astype(np.float32)),
        torch.ones(24, 16),
    )
    with torch.no_grad():
        before, _ = head_losses(head, batch, 0.0, 1.0, float(table.std()))
    progress = train_head(head, tokens, features, config, tmp_path)
    with torch.no_grad():
        after, _ = head_losses(head, batch, 0.0, 1.0, float(table.std()))
    assert progress.steps == 40
    assert float(after) < 0.5 * float(before), (float(before), float(after))


def test_distill_makes_a_loadable_draft_lm(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """The second kind: a small independent Llama on the same data, a Hugging Face checkpoint with the
    target's tokenizer that exports as an ordinary draft model and drafts exactly."""
    text = tmp_path / "text.txt"
    text.write_text((Path(ortspec.__file__).parent / "runtime" / "pipeline.py").read_text(encoding="utf-8")[:6000])
    config = DistillConfig(minutes=0.05, text=(str(text),), quantize="none", held_out=0, threads=1, kind="lm")
    out = distill(str(checkpoint("llama")), tmp_path / "lm", config, report=lambda _: None)
    training = json.loads((out / "ortspec-draft.json").read_text())["training"]
    assert training["steps"] > 0 and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="another kind"):
        distill(str(checkpoint("llama")), out, DistillConfig(**{**config.__dict__, "kind": "head"}))
    pkg = tmp_path / "pkg"
    export_pair(checkpoint("llama"), pkg, draft=out, quantize="none", report=lambda _: None)
    pipe = ortspec.load(pkg)
    spec = pipe.generate(PROMPT, max_new_tokens=12, draft="model", draft_tokens=2)
    assert spec.stats.drafter == "model"
    assert spec.token_ids == pipe.generate(PROMPT, max_new_tokens=12, use_draft=False).token_ids
