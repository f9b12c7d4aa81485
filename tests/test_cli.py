"""The CLI end to end: export, generate (streaming), bench, info."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from click.testing import CliRunner

from ortspec.cli import main
from ortspec.runtime.package.manifest import FORMAT_VERSION


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_export_info_generate_bench(checkpoint, tmp_path):
    out = tmp_path / "pair"
    result = run(
        "export", checkpoint("llama"), "--draft", checkpoint("llama", "close"), "--quantize", "int4", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert "[1/4]" in result.output and "[4/4]" in result.output and f"package written to {out}" in result.output

    info = run("info", out)
    assert info.exit_code == 0
    assert "int4 MatMulNBits" in info.output and "draft:" in info.output and "KV layout shared-buffer" in info.output
    assert "exported by builder" in info.output
    assert json.loads(run("info", out, "--json").output)["format_version"] == FORMAT_VERSION

    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "ortspec.cli",
            "generate",
            str(out),
            "def fibonacci(n):",
            "--max-new-tokens",
            "12",
            "--stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stderr
    assert "tokens/s" in gen.stderr and "acceptance" in gen.stderr and "target calls" in gen.stderr
    plain = run("generate", out, "def fibonacci(n):", "--max-new-tokens", "12", "--no-draft")
    assert plain.exit_code == 0
    assert plain.output == gen.stdout  # speculative text == plain text
    ids = run("generate", out, "3, 40, 7", "--token-ids", "--max-new-tokens", "5")
    assert ids.exit_code == 0

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nclass Stack:\nimport os\n")
    bench = run("bench", out, "--prompts", prompts, "--max-new-tokens", "16", "--repeats", "1")
    assert bench.exit_code == 0, bench.output
    for needle in (
        "acceptance rate",
        "tokens per target call",
        "speedup",
        "outputs identical: yes",
        "plain",
        "speculative",
    ):
        assert needle in bench.output


def test_cli_errors_are_one_line(package, tmp_path):
    root = package("llama", draft="close")
    too_long = run("generate", root, " ".join(["5"] * 300), "--token-ids")
    assert too_long.exit_code == 1 and "exceeds the context of" in too_long.output
    assert "Traceback" not in too_long.output
    not_a_package = run("info", tmp_path)
    assert not_a_package.exit_code == 1 and "no manifest.json" in not_a_package.output
    missing = run("export", tmp_path / "nope", "--out", tmp_path / "new")
    assert missing.exit_code == 1 and "does not exist" in missing.output
    exists = run("export", tmp_path / "nope", "--out", root)
    assert exists.exit_code == 1 and "already exists; pass --force" in exists.output


def test_distill_prompts_need_a_chat_template(checkpoint, tmp_path):
    """`distill --prompts` reaches the run: a target without a chat template cannot answer requests."""
    prompts = tmp_path / "requests.txt"
    prompts.write_text("Explain tides.\n")
    args = ("distill", checkpoint("llama"), "--out", tmp_path / "head", "--prompts", prompts, "--quantize", "none")
    result = run(*args, "--minutes", "0.1", "--threads", "1")
    assert result.exit_code == 1
    assert "--prompts needs a target with a chat template" in result.output


def test_distill_feature_layers_reach_the_run(checkpoint, tmp_path):
    """`--feature-layers` is checked against the target's depth (it has 2 layers: only layer 1 is inner)."""
    args = ("distill", checkpoint("llama"), "--out", tmp_path / "head", "--quantize", "none", "--minutes", "0.1")
    result = run(*args, "--feature-layers", "1,2")
    assert result.exit_code == 1 and "distinct inner layers, 1 .. 1 of 2: got [1, 2]" in result.output
    assert "layer numbers like 8,22" in run(*args, "--feature-layers", "8;22").output


def test_bench_chat_renders_the_chat_template(checkpoint, tmp_path):
    """`bench --chat` measures chats (a prompt or a logged chat per line) through the package's template."""
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama"), target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "pkg"
    assert run("export", target, "--quantize", "none", "--out", out).exit_code == 0
    log = tmp_path / "log.jsonl"
    chat = [{"role": role, "content": text} for role, text in (("user", "Hi"), ("assistant", "Hey"), ("user", "?"))]
    lines = [json.dumps({"prompt": "Name a prime."}), json.dumps({"messages": chat})]
    log.write_text("\n".join(lines) + "\n")
    args = ("bench", out, "--prompts", log, "--max-new-tokens", "8", "--repeats", "1")
    bench = run(*args, "--chat")
    assert bench.exit_code == 0, bench.output
    assert "2 prompts x 1 repeats" in bench.output and "outputs identical: yes" in bench.output
    raw = run(*args)
    assert raw.exit_code == 1 and "log.jsonl:2" in raw.output and "ortspec bench --chat" in raw.output
