"""The generic exporter: optimum's ONNX export of a causal LM with its KV cache (fp32)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from .checkpoint import Checkpoint


def export_with_optimum(checkpoint: Checkpoint, out_dir: Path) -> Path:
    """Export `checkpoint` as `text-generation-with-past`; return the path of model.onnx."""
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(checkpoint.path),
            output=out_dir,
            task="text-generation-with-past",
            device="cpu",
            do_validation=False,
            library_name="transformers",
        )
    model = out_dir / "model.onnx"
    if not model.is_file():
        raise RuntimeError(
            f"optimum wrote no model.onnx for {checkpoint.name} (found {sorted(p.name for p in out_dir.iterdir())})"
        )
    return model
