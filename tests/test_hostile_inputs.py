"""Hostile inputs: folders a command does not own, concurrent runs, hostile heads, manifests and JSON,
read-only outputs and options without bounds each end in one line naming what is wrong, and nothing a
user owns is overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ortspec.export.distill import DistillConfig, distill
from ortspec.export.publish import ExportInProgressError, PackageExistsError, claim

QUICK = DistillConfig(minutes=0.05, quantize="none", vocab=64, held_out=0, threads=1)


def _cli(*args: str, blocked: tuple[str, ...] = (), read_only: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`ortspec ARGS` in a fresh process where the modules `blocked` cannot be imported, and where the file
    system refuses writes under `read_only` as a read-only mount does (EROFS from open and mkdir)."""
    script = (
        "import errno, importlib.abc, os, sys\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'{name} is blocked in this test', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        f"ro = {str(read_only) if read_only else None!r}\n"
        "real_open, real_mkdir = os.open, os.mkdir\n"
        "def refuse(path):\n"
        "    if ro and os.fspath(path).startswith(ro):\n"
        "        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))\n"
        "def open_(path, flags, *args, **kwargs):\n"
        "    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):\n"
        "        refuse(path)\n"
        "    return real_open(path, flags, *args, **kwargs)\n"
        "def mkdir_(path, *args, **kwargs):\n"
        "    if not os.path.isdir(path):\n"
        "        refuse(path)\n"
        "    return real_mkdir(path, *args, **kwargs)\n"
        "os.open, os.mkdir = open_, mkdir_\n"
        "from ortspec.cli import main\n"
        "main(sys.argv[1:], prog_name='ortspec')\n"
    )
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# distill's --out


def test_distill_refuses_a_folder_it_did_not_make(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """A user's folder (README.md, head.json of their own) is never written into; nothing in it changes."""
    for files in ({"README.md": "mine\n", "head.json": '{"mine": 1}'}, {"notes.txt": "mine"}):
        out = tmp_path / f"d{len(files)}"
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
        with pytest.raises(PackageExistsError, match="did not write"):
            distill(str(checkpoint("llama")), out, QUICK, report=lambda _: None)
        assert sorted(p.name for p in out.iterdir()) == sorted(files)
        assert all((out / name).read_text() == text for name, text in files.items())
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(PackageExistsError, match="not a directory"):
        distill(str(checkpoint("llama")), a_file, QUICK, report=lambda _: None)
    assert a_file.read_text() == "mine"


def test_a_second_distill_into_one_folder_fails_at_once(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """Two runs into one --out would interleave their data: the second is refused, naming the first's pid."""
    out = tmp_path / "head"
    running = claim(out.resolve(), "distill")  # a run in progress (another process would hold it the same way)
    with running, pytest.raises(ExportInProgressError, match=f"another distill \\(pid {os.getpid()}\\) is writing"):
        distill(str(checkpoint("llama")), out, QUICK, report=lambda _: None)
    assert not out.exists()


def test_distill_without_the_export_extras_is_one_line(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    result = _cli("distill", str(checkpoint("llama")), "--out", str(tmp_path / "head"), blocked=("torch",))
    _one_line_error(result, "needs the export extras", "torch is missing")
    assert not (tmp_path / "head").exists()


def test_a_read_only_out_is_one_line_naming_it(checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    for command in ("export", "distill"):
        result = _cli(command, str(checkpoint("llama")), "--out", str(read_only / "out"), read_only=read_only)
        _one_line_error(result, str(read_only), "Read-only file system")
    assert list(read_only.iterdir()) == []


def test_a_nul_byte_in_a_path_is_named(checkpoint: Callable[..., Path], package: Callable[..., Path], tmp_path: Path):
    import ortspec
    from ortspec.export import export_pair
    from ortspec.runtime.text.prompt_files import read_prompts

    target, bad = str(checkpoint("llama")), str(tmp_path / "o\0ut")
    cases = {
        "out": lambda: export_pair(target, bad, report=lambda _: None),
        "draft": lambda: export_pair(target, tmp_path / "p", draft=bad, report=lambda _: None),
        "path": lambda: ortspec.load(bad),
        "prompts": lambda: distill(target, tmp_path / "d", DistillConfig(prompts=(bad,)), report=lambda _: None),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError, match=f"{name} '.*o\\\\x00ut' holds a NUL byte"):
            call()
    with pytest.raises(ValueError, match="holds a NUL byte"):
        read_prompts(Path(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# hostile draft heads given to `export --draft`


def _corrupt_heads(good: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of the head `good`, each broken one way, with what the error must say."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    config = json.loads((good / "head.json").read_text())

    def variant(name: str, head_json: object = None, raw_json: str | None = None, weights: bytes | None = None):
        head = root / name
        shutil.copytree(good, head)
        if head_json is not None or raw_json is not None:
            (head / "head.json").write_text(raw_json if raw_json is not None else json.dumps(head_json))
        if weights is not None:
            (head / "head.safetensors").write_bytes(weights)
        return head

    tensors = load_file(str(good / "head.safetensors"))
    narrow = {**tensors, "fc.weight": tensors["fc.weight"][:, : tensors["fc.weight"].shape[0] * 2].copy()}
    save_file(narrow, str(root / "narrow.safetensors"))
    no_layers = {k: v for k, v in config.items() if k != "feature_layers"}
    cases = {
        "a list": (variant("list", raw_json="[1, 2]"), "head.json is not an ortspec draft head"),
        "format as text": (variant("format", {**config, "format": "2"}), "head.json field format must be an integer"),
        "layers as text": (
            variant("layers", {**config, "feature_layers": "all"}),
            "field feature_layers must be a list",
        ),
        "no layers": (variant("nolayers", no_layers), "head.json field feature_layers is missing"),
        "not JSON": (variant("notjson", raw_json='{"kind": }'), "head.json is not valid JSON"),
        "deep JSON": (
            variant("deep", raw_json="[" * 100_000 + "]" * 100_000),
            "head.json holds JSON nested too deeply",
        ),
        "long integer": (variant("digits", raw_json='{"kind": ' + "9" * 5000 + "}"), "head.json holds an integer"),
        "random bytes": (variant("random", weights=np.random.default_rng(0).bytes(4096)), "not a safetensors file"),
        "huge header": (variant("header", weights=(1 << 40).to_bytes(8, "little") + b"{}"), "not a safetensors file"),
        "short file": (variant("short", weights=b"\x01"), "not a safetensors file"),
        "bad offsets": (
            variant(
                "offsets",
                weights=_safetensors({"fc.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}),
            ),
            "tensor 'fc.weight' has a malformed entry",
        ),
        "fc.weight misshaped": (
            variant("narrow", weights=(root / "narrow.safetensors").read_bytes()),
            "tensor fc.weight is",
        ),
    }
    missing = variant("missing")
    (missing / "head.safetensors").unlink()
    cases["no weights"] = (missing, "has no head.safetensors")
    return cases


def _safetensors(header: dict[str, object]) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(16)


def test_hostile_heads_are_refused_in_one_line_before_anything_is_built(
    checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    from ortspec.export import export_pair

    from helpers.heads import make_head

    target = checkpoint("llama")
    good = make_head(target, tmp_path / "good", feature_layers=(1,))
    stages: list[str] = []
    for case, (head, message) in _corrupt_heads(good, tmp_path).items():
        out = tmp_path / f"pkg-{head.name}"
        with pytest.raises(ValueError) as caught:
            export_pair(target, out, draft=head, quantize="none", report=stages.append)
        text = str(caught.value)
        assert message in text and "\n" not in text, (case, text)
        assert not out.exists(), case
    assert not stages  # refused before the export began any stage


# hostile manifests and JSON


def _copy(package: Callable[..., Path], tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(package(), tmp_path / "copy"))


def _edit_manifest(root: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def test_max_positions_beyond_the_graphs_rotary_tables_is_refused_at_load(
    package: Callable[..., Path], tmp_path: Path
) -> None:
    import onnx

    import ortspec
    from ortspec.runtime.errors import PackageError

    root = _copy(package, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    for role in ("target", "draft"):
        graph = onnx.load(root / manifest[role]["onnx"], load_external_data=False)
        rows = next(t.dims[0] for t in graph.graph.initializer if t.name == "cos_cache")
        for value, refused in ((2**40, True), (rows + 1, True), (rows, False)):
            _edit_manifest(root, lambda data, r=role, v=value: data[r].update(max_positions=v))
            if refused:
                with pytest.raises(PackageError, match=f"{role}.max_positions is {value}, but .* holds {rows}"):
                    ortspec.load(root)
            else:
                ortspec.load(root)
        _edit_manifest(root, lambda data, r=role: data[r].update(max_positions=manifest[r]["max_positions"]))


DEEP = "[" * 100_000 + "]" * 100_000
LONG_INTEGER = '{"format": ' + "1" * 5000 + "}"


def test_hostile_json_in_a_package_is_one_line_naming_the_file(package: Callable[..., Path], tmp_path: Path) -> None:
    import ortspec
    from ortspec.runtime.errors import PackageError
    from ortspec.runtime.package.manifest import sha256_of

    root = _copy(package, tmp_path)
    original = (root / "manifest.json").read_text()
    for text, message in ((DEEP, "nested too deeply"), (LONG_INTEGER, "an integer of more than")):
        (root / "manifest.json").write_text(text)
        with pytest.raises(PackageError, match=f"manifest.json holds (JSON|an integer).*{message}|{message}") as e:
            ortspec.load(root)
        assert "manifest.json" in str(e.value) and "\n" not in str(e.value)
    (root / "manifest.json").write_text(original)
    config = root / "tokenizer" / "tokenizer_config.json"
    for text, message in ((DEEP, "nested too deeply"), (LONG_INTEGER, "an integer of more than")):
        config.write_text(text)

        def relist(data: dict) -> None:
            entry = next(f for f in data["tokenizer"]["files"] if f["path"].endswith("tokenizer_config.json"))
            entry.update(size=config.stat().st_size, sha256=sha256_of(config))

        _edit_manifest(root, relist)
        with pytest.raises(PackageError, match=message) as e:
            ortspec.load(root)
        assert "tokenizer_config.json" in str(e.value)


def test_hostile_json_in_prompt_files_is_one_line_naming_the_line(tmp_path: Path) -> None:
    from ortspec.runtime.text.prompt_files import read_prompts, read_requests

    for text, message in ((DEEP, "nested too deeply"), (LONG_INTEGER, "an integer of more than")):
        path = tmp_path / "prompts.jsonl"
        path.write_text('"fine"\n' + text + "\n")
        for read in (read_prompts, read_requests):
            with pytest.raises(ValueError, match=message) as e:
                read(path)
            assert f"{path}:2" in str(e.value)


# options without upper bounds


def test_a_prompt_file_is_read_up_to_a_bound(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/dev/zero (or any file past the bound) is refused after reading the bound, not read until memory ends."""
    from ortspec.runtime.text import prompt_files

    monkeypatch.setattr(prompt_files, "MAX_FILE_BYTES", 1 << 20)
    with pytest.raises(ValueError, match="/dev/zero is larger than 1 MiB"):
        prompt_files.read_prompts(Path("/dev/zero"))
    big = tmp_path / "big.txt"
    big.write_text("x\n" * (1 << 20))
    with pytest.raises(ValueError, match=r"big\.txt is larger than"):
        prompt_files.read_requests(big)


def test_thread_and_slot_counts_are_bounded(
    package: Callable[..., Path], checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    import ortspec
    from ortspec.runtime.model.onnx_model import physical_memory
    from ortspec.serve import load_pipelines

    limit = 4 * (os.cpu_count() or 1)
    for name in ("threads", "draft_threads"):
        with pytest.raises(ValueError, match=f"{name} must be 1 .. {limit}"):
            ortspec.load(package(), **{name: 1_000_000})
    ortspec.load(package(), threads=limit)
    for name in ("threads", "writers"):
        with pytest.raises(ValueError, match=f"{name} must be 1 .. {limit}"):
            distill(str(checkpoint("llama")), tmp_path / "d", DistillConfig(**{name: 10**6}), report=lambda _: None)
    assert not (tmp_path / "d").exists()
    if physical_memory() is not None:
        for batch in (True, False):  # KV caches beyond this machine's memory: refused before they are allocated
            with pytest.raises(ValueError, match=r"of 100000000 needs .* GiB of KV cache"):
                load_pipelines(package(), 10**8, batch=batch)


def test_closing_a_stream_from_another_thread_stops_it() -> None:
    """close() while another thread is inside the generation (a server's worker, a UI thread): the generation
    stops after its current round and its finally runs (the pipeline's states are handed back)."""
    import threading

    from ortspec.runtime.results import TextStream

    inside, go_on, ended = threading.Event(), threading.Event(), threading.Event()

    def events():  # type: ignore[no-untyped-def]
        try:
            for _ in range(10**6):
                inside.set()
                go_on.wait()  # a round in progress
                yield "x", None
        finally:
            ended.set()

    stream = TextStream(events())
    deltas: list[str] = []
    reader = threading.Thread(target=lambda: deltas.extend(stream))
    reader.start()
    assert inside.wait(10)
    stream.close()  # the reader's thread is executing the generator right now
    go_on.set()
    reader.join(10)
    assert not reader.is_alive() and ended.is_set() and len(deltas) <= 1
    assert list(stream) == [] and stream.result is None


# the server


def test_a_slot_is_free_before_its_non_streamed_response_is_sent(chat_package: Path) -> None:
    """A client that has its answer never sees its slot busy in /health, even when the generation takes a
    moment to hand its states back (widened here: a race, before)."""
    import time

    import httpx

    from ortspec.runtime.results import TextStream
    from ortspec.serve import load_pipelines

    from helpers.serving import running

    class SlowToLetGo(TextStream):
        def close(self) -> None:
            time.sleep(0.3)
            super().close()

    class Pipe:
        def __init__(self, pipe: object) -> None:
            self.pipe = pipe

        def __getattr__(self, name: str) -> object:
            return getattr(self.pipe, name)

        def stream(self, prompt: object, **options: object) -> TextStream:
            return SlowToLetGo(self.pipe.stream(prompt, **options)._events)  # type: ignore[attr-defined]

    pipe = Pipe(load_pipelines(chat_package, 1)[0])
    with running([pipe]) as url, httpx.Client(base_url=url, timeout=30) as http:
        for path, body in (
            ("/v1/completions", {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4}),
            (
                "/v1/chat/completions",
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            ),
        ):
            assert http.post(path, json=body).status_code == 200
            assert http.get("/health").json()["busy"] == 0, path
