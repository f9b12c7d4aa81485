"""What the benchmarks share: the random-weight ~130M/~15M Llama-shaped checkpoints, cached exports, and
sessions on another execution provider than the CPU's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ortspec.models.random import PRESETS, make_checkpoint
from ortspec.runtime.model.onnx_model import Model
from ortspec.runtime.model.session import session_options
from ortspec.runtime.package.manifest import load_manifest, resolve_inside

Providers = list[str | tuple[str, dict[str, str]]]
PROVIDERS = ("cpu", "openvino")  # a benchmark's `--provider` choices


def bench_checkpoints(work: Path) -> tuple[Path, Path]:
    """(target, draft) checkpoint directories of the `bench` preset, created once in `work`."""
    target_sizes, draft_sizes = PRESETS["bench"]
    target, draft = work / "target", work / "draft"
    if not (target / "config.json").exists():
        make_checkpoint(target, "llama", **target_sizes)
    if not (draft / "config.json").exists():
        make_checkpoint(draft, "llama", seed=1, **draft_sizes)
    return target, draft


def exported(out: Path, target: Path, **export_options: Any) -> Path:
    """`out`, exported with `export_options` unless it already holds a package."""
    from ortspec.export import export_pair

    if not (out / "manifest.json").exists():
        export_pair(target, out, force=True, **export_options)
    return out


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: what other jobs on the machine were doing meanwhile."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def providers_for(provider: str, threads: int | None, openvino_config: str = "") -> Providers:
    """ONNX Runtime's providers for a benchmark's `--provider`: its CPU kernels, or OpenVINO's CPU plugin through
    the OpenVINO execution provider (the `onnxruntime-openvino` package, which replaces `onnxruntime`: a venv of
    its own) on `threads` threads, with the CPU provider behind it for the nodes OpenVINO does not take. OpenVINO
    computes in fp32 unless `openvino_config` (JSON, the provider's `load_config`: `{"CPU": {"KEY": "VALUE"}}`)
    says otherwise."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    options = {"device_type": "CPU"}
    options |= {"load_config": openvino_config} if openvino_config else {"precision": "FP32"}
    if threads:
        options["num_of_threads"] = str(threads)
    return [("OpenVINOExecutionProvider", options), "CPUExecutionProvider"]


def open_session(
    path: Path, provider: str, threads: int | None, spinning: bool = True, openvino_config: str = "", **kwargs: Any
) -> ort.InferenceSession:
    """A session on `provider` (see `providers_for`; beside OpenVINO the CPU provider's pool never spins, or it
    would take the cores OpenVINO's threads need). Refuses a session where ONNX Runtime fell back to the CPU
    provider alone, which it does, with only a logged warning, when the OpenVINO provider fails to start (a
    malformed `load_config`, for one)."""
    options = session_options(threads, spinning and provider == "cpu")
    chosen = providers_for(provider, threads, openvino_config)
    session = ort.InferenceSession(str(path), options, chosen, **kwargs)
    if session.get_providers()[0] != (chosen[0] if isinstance(chosen[0], str) else chosen[0][0]):
        raise SystemExit(f"{provider}: ONNX Runtime {ort.__version__} runs {session.get_providers()} instead")
    return session


def open_target(package: Path, provider: str, threads: int | None, openvino_config: str = "") -> Model:
    """The target model of a package on `provider`: `ortspec.load` takes provider names only, and OpenVINO's
    thread count is an option of its provider."""
    manifest = load_manifest(package, verify=False)
    path = resolve_inside(manifest.root, manifest.target.onnx)
    return Model(manifest.target, open_session(path, provider, threads, openvino_config=openvino_config))
