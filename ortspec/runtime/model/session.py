"""ONNX Runtime sessions: options, execution providers, the device their outputs live on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """The providers to use, defaulting to the CPU; a clear error for ones this ORT build lacks."""
    if not providers:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build "
            f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA"
        )
    return list(providers)


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Full graph optimisation, quiet logs, and `threads` intra-op threads (None: ORT's default).

    `spinning=False` makes idle pool threads sleep at once instead of busy-waiting for the next
    call. The draft must not spin: its calls alternate with the target's, and a draft pool spinning
    on the cores the target needs made whole rounds 2-3x slower on 2 cores (docs/design.md, "What was
    measured about ONNX Runtime and this CPU").
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(
    model_path: Path,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    spinning: bool = True,
    cuda_graphs: bool = False,
) -> ort.InferenceSession:
    """One inference session for one ONNX graph; `cuda_graphs` lets the CUDA provider capture and replay
    the calls that ask for it (see cuda_graphs.py)."""
    chosen: list[str | tuple[str, dict[str, str]]] = list(resolve_providers(providers))
    if cuda_graphs:
        chosen = [(p, {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" else p for p in chosen]
    return ort.InferenceSession(str(model_path), sess_options=session_options(threads, spinning), providers=chosen)


def output_device(session: ort.InferenceSession) -> str:
    """Where the session's first provider keeps tensors: 'cpu', 'cuda', ..."""
    return DEVICE_OF_PROVIDER.get(session.get_providers()[0], "cpu")


GRAPH_ID = "gpu_graph_id"  # the run-config key that picks a CUDA graph (-1: capture nothing)


def no_graph_run_options() -> ort.RunOptions:
    """Run options for a call that must not be captured (on a session with CUDA graphs enabled)."""
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID, "-1")
    return options
