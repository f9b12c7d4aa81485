"""`distill`'s training data: chats keep the target's features as it writes them (equal to a re-read),
chats and features stay consistent across interruptions, writer processes share out the seeds, and
the user's own requests (--prompts) are answered once each, some set aside to measure the head."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import ortspec
from ortspec.export import export_pair
from ortspec.export.builder.head import HEAD_CONFIG
from ortspec.export.distill import DistillConfig, distill, held_out_indices
from ortspec.export.distill.data import REQUEST_STARTS, request_seeds, request_start, self_instructed_chats
from ortspec.export.distill.features import SequenceStore, greedy_answer, open_target, sequence_features
from ortspec.export.distill.writers import default_batch, write_chats
from ortspec.runtime.model.decoder import DecoderState
from ortspec.runtime.text.prompt_files import read_requests

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|endoftext|>' + message['role'] + '\n' + message['content'] + '<|pad|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant\n' }}{% endif %}"
)
# data_share 5: chat writing ends at max_chats, the clock (60 s at 0.2 minutes) only backstops it, so that a
# loaded machine writes as many chats as a quiet one
QUICK = dict(quantize="none", vocab=64, held_out=2, threads=1, max_answer_tokens=24, data_share=5.0)


@pytest.fixture(scope="module")
def chat_target(checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with a chat template (its sampled requests end with EOS often enough)."""
    target = tmp_path_factory.mktemp("chat-target") / "ckpt"
    shutil.copytree(checkpoint("llama"), target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def chat_package(chat_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-pkg") / "pkg"
    export_pair(chat_target, out, quantize="none", exporter="builder", report=lambda _: None)
    return out


def feature_width(target: Path, out: Path) -> int:
    """Feature columns per token in a distill run's stores: the final features, then each feature layer's."""
    layers = json.loads((out / "data" / "layout.json").read_text())["feature_layers"]
    return json.loads((target / "config.json").read_text())["hidden_size"] * (1 + len(layers))


def assert_consistent(store_dir: Path, hidden: int) -> list[dict]:
    """Items and feature rows of a store match one to one (as reopened from disk)."""
    store = SequenceStore(store_dir, hidden)
    index = json.loads((store_dir / "features.json").read_text())
    lines = (store_dir / "items.jsonl").read_text().splitlines()
    assert len(lines) == len(index) == len(store)
    assert [rows for _, rows in index] == [len(item["tokens"]) for item in store.items]
    assert (store_dir / "features.bin").stat().st_size == sum(rows for _, rows in index) * hidden * 2
    return store.items


def test_answer_and_features_equal_generate_and_a_reread(chat_package: Path) -> None:
    """The greedy answer is `generate`'s (EOS and length stops); its features equal a re-read's."""
    pipe = open_target(chat_package, 1, 256)
    plain = ortspec.load(chat_package)
    prompt = pipe.chat_prompt([{"role": "user", "content": "def fibonacci(n):"}])
    full = plain.generate(prompt, max_new_tokens=20, use_draft=False)
    assert full.stats.finish_reason == "length"
    eos = full.token_ids[6]
    state = DecoderState(pipe.target)
    for eos_ids in (pipe.eos_token_ids, frozenset({eos})):
        plain.eos_token_ids = eos_ids
        want = plain.generate(prompt, max_new_tokens=20, use_draft=False).token_ids
        answer, features = greedy_answer(state, prompt, 20, eos_ids)
        assert answer == want
        assert features.dtype == np.float16 and len(features) == len(prompt) + len(answer)
        reread = sequence_features(state, prompt + answer)
        scale = np.abs(reread).max()
        np.testing.assert_allclose(features.astype(np.float32) / scale, reread / scale, atol=1e-3)
    assert len(answer) == full.token_ids.index(eos) + 1  # stopped after the EOS id, included


def test_sequence_store_drops_what_a_crash_left_unpaired(tmp_path: Path) -> None:
    hidden = 4
    store = SequenceStore(tmp_path, hidden)
    for n in (3, 5, 2):
        store.append({"tokens": list(range(n))}, np.full((n, hidden), n, np.float32))
    with pytest.raises(ValueError, match="2 feature rows for 3 tokens"):
        store.append({"tokens": [1, 2, 3]}, np.zeros((2, hidden)))
    store.features.append(np.ones((4, hidden)))  # a crash after the features, before the item's line
    with open(tmp_path / "features.bin", "ab") as f:
        f.write(b"\0" * 10)  # and rows written after the index was last updated
    assert [len(item["tokens"]) for item in assert_consistent(tmp_path, hidden)] == [3, 5, 2]

    store = SequenceStore(tmp_path, hidden)
    store.features.append(np.ones((4, hidden)))
    with open(tmp_path / "items.jsonl", "a") as f:
        f.write('{"tokens": [1, 2')  # the item's line cut short
    store = SequenceStore(tmp_path, hidden)
    store.append({"tokens": [7, 8]}, np.full((2, hidden), 7, np.float32))
    assert [len(item["tokens"]) for item in assert_consistent(tmp_path, hidden)] == [3, 5, 2, 2]
    assert [float(f[0, 0]) for _, f in SequenceStore(tmp_path, hidden).load()] == [3, 5, 2, 7]


def test_interrupted_distill_resumes_consistently(
    chat_target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed between a chat's features and its line resumes with matching chats and features."""
    out = tmp_path / "head"
    config = DistillConfig(minutes=0.2, max_chats=6, **QUICK)
    appended = SequenceStore.append
    calls = []

    def crash_on_the_fourth(self: SequenceStore, item: dict, features: np.ndarray) -> None:
        calls.append(item)
        if len(calls) == 4:
            self.features.append(features)
            raise KeyboardInterrupt
        appended(self, item, features)

    monkeypatch.setattr(SequenceStore, "append", crash_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        distill(str(chat_target), out, config, report=lambda _: None)
    monkeypatch.undo()
    chats_dir = out / "data" / "chats"  # 2 chats held out, then 1 chat kept and 1 with features only
    assert len(json.loads((chats_dir / "features.json").read_text())) == 2
    assert len((chats_dir / "items.jsonl").read_text().splitlines()) == 1

    distill(str(chat_target), out, config, report=lambda _: None)
    hidden = feature_width(chat_target, out)
    held = assert_consistent(out / "data" / "held-out", hidden)
    chats = assert_consistent(chats_dir, hidden)
    assert len(held) == 2 and len(chats) == 6
    seeds = [item["seed"] for item in held + chats]
    assert len(set(seeds)) == len(seeds)
    assert all(item["request"].startswith(request_start(item["seed"])) for item in held + chats)
    training = json.loads((out / HEAD_CONFIG).read_text())["training"]
    assert training["sequences"] == 6 and training["held_out_agreement"] is not None


def test_writers_share_out_the_seeds_and_make_a_loadable_head(chat_target: Path, tmp_path: Path) -> None:
    """Two writer processes: distinct seeds, each chat as this process would write it, a head that drafts."""
    config = DistillConfig(minutes=0.2, max_chats=6, writers=2, **{**QUICK, "threads": 2})
    out = distill(str(chat_target), tmp_path / "head", config, report=lambda _: None)
    package = out / "target-package"
    pipe = open_target(package, 1, 1024)
    chats = SequenceStore(out / "data" / "chats", feature_width(chat_target, out))
    seeds = [item["seed"] for item in chats.items]
    assert len(chats) == 6 and len(set(seeds)) == 6
    for (_, features), item in list(zip(chats.load(), chats.items, strict=True))[:2]:
        [(again, again_features)] = self_instructed_chats(pipe, [item["seed"]], max_answer_tokens=24)
        assert again == item
        np.testing.assert_array_equal(again_features, features)

    pair = tmp_path / "pair"
    export_pair(chat_target, pair, draft=out, quantize="none", report=lambda _: None)
    res = ortspec.load(pair).generate([5, 6, 7, 8], max_new_tokens=8, draft="model", draft_tokens=2)
    assert res.stats.drafter == "head" and len(res.token_ids) == 8


def test_sigterm_stops_the_writers(chat_package: Path) -> None:
    """SIGTERM to a parent reading chats from writer processes: the writers are gone too."""
    script = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from ortspec.export.distill.features import open_target\n"
        "from ortspec.export.distill.writers import write_chats\n"
        "import multiprocessing\n"
        "pkg = Path(sys.argv[1])\n"
        "for chat in write_chats(open_target(pkg, 1, 256), pkg, 0, 2, 2, 16):\n"
        "    print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(ortspec.__file__).parents[1])}
    command = [sys.executable, "-c", script, str(chat_package)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as parent:
        writers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(writers) == 2
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.5)
    for pid in writers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_request_seeds_are_disjoint_across_writers() -> None:
    import itertools

    shares = [set(itertools.islice(request_seeds(3, k, 4), 50)) for k in range(4)]
    assert sum(map(len, shares)) == len(set().union(*shares)) == 200
    assert set(itertools.islice(request_seeds(3), 200)) == set().union(*shares)


def test_default_batch_shares_out_a_bounded_number_of_rows() -> None:
    # every row holds a KV cache of its own: 32 in all, but 4 to 16 per writer process
    assert [default_batch(writers) for writers in (1, 2, 3, 4, 8, 16)] == [16, 16, 10, 8, 4, 4]


def test_most_requests_are_begun_with_a_common_request_word() -> None:
    starts = [request_start(seed) for seed in range(10 * len(REQUEST_STARTS))]
    assert 0.05 < starts.count("") / len(starts) < 0.2  # some left wholly to the model
    assert len(set(starts)) == len(set(REQUEST_STARTS))


def test_held_out_requests_are_one_in_ten_spread_over_the_file() -> None:
    assert held_out_indices(9, 12) == []
    assert held_out_indices(12, 12) == [0]
    assert held_out_indices(100, 12) == list(range(0, 100, 10))
    assert held_out_indices(1000, 12) == [i * 1000 // 12 for i in range(12)]


def test_given_requests_are_answered_once_each_and_some_set_aside(chat_target: Path, tmp_path: Path) -> None:
    """--prompts: each request gets the target's greedy answer to its chat, one in ten is held out and
    measured, the rest are trained on beside the sampled chats; a resumed run answers none of them again
    and refuses other requests."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    lines = [json.dumps(f"Tell me about item {i}.") for i in range(11)]
    lines.append(json.dumps({"messages": [*chat, {"role": "user", "content": "More?"}]}))
    prompts = tmp_path / "requests.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    config = DistillConfig(minutes=0.2, max_chats=2, prompts=(str(prompts),), **{**QUICK, "batch": 2})
    reports: list[str] = []
    out = distill(str(chat_target), tmp_path / "head", config, report=reports.append)
    hidden = feature_width(chat_target, out)
    held = assert_consistent(out / "data" / "prompts-held-out", hidden)
    given = assert_consistent(out / "data" / "prompts", hidden)
    assert [item["request_index"] for item in held] == [0]
    assert sorted(item["request_index"] for item in given) == list(range(1, 12))

    requests, pipe = read_requests(prompts), open_target(out / "target-package", 1, 1024)
    state = DecoderState(pipe.target)
    for item in [*held, *given]:
        prompt = pipe.chat_prompt(requests[item["request_index"]])
        assert item["tokens"][: item["prompt_tokens"]] == prompt
        answer, _ = greedy_answer(state, prompt, 24, pipe.eos_token_ids)
        assert item["tokens"][item["prompt_tokens"] :] == answer
    training = json.loads((out / HEAD_CONFIG).read_text())["training"]
    assert training["sequences"] == 11 + 2
    assert training["prompts"]["trained"] == 11 and training["prompts"]["held_out"] == 1
    assert training["prompts"]["held_out_agreement"] is not None
    assert any("of your requests set aside" in line for line in reports)

    distill(str(chat_target), out, config, report=lambda _: None)
    assert len(SequenceStore(out / "data" / "prompts", hidden)) == 11
    prompts.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="differ from the requests the run"):
        distill(str(chat_target), out, config, report=lambda _: None)


def test_writer_processes_answer_the_given_requests_and_stop(chat_package: Path) -> None:
    requests = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
    pipe = open_target(chat_package, 1, 256)
    chats = list(write_chats(pipe, chat_package, 0, 2, 2, 8, rows=2, requests=requests, todo=[0, 2, 3, 4]))
    assert sorted(item["request_index"] for item, _ in chats) == [0, 2, 3, 4]
