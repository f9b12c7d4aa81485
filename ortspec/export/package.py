"""Write a deployment package's contents: models, tokenizer, checksummed manifest (`publish.py` puts it in place)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx

from ortspec.runtime.package import graph_names as names
from ortspec.runtime.package.manifest import FileEntry, ModelSpec, file_entry

EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # protobuf cannot hold more than 2 GB in one file


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save a graph (weights in `NAME.data` beside it when large); return the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(init.raw_data) for init in model.graph.initializer)
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path)
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [path, data]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def describe_model(
    model: onnx.ModelProto,
    *,
    role: str,
    root: Path,
    files: list[Path],
    family: str,
    source: str,
    max_positions: int,
    quantization: dict[str, Any],
    exporter: str,
    source_info: dict[str, Any] | None = None,
) -> ModelSpec:
    """The manifest entry of an exported graph, read from the graph itself (its KV layout included)."""
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    layers = names.count_layers(inputs)
    if layers == 0 or names.LOGITS not in outputs or names.INPUT_IDS not in inputs:
        raise ValueError(f"the {role} graph has no input_ids/logits/past_key_values.*: not a causal LM with a cache")
    _, kv_heads, _, head_dim = _dims(inputs[names.past_name(0, "key")])
    vocab = _dims(outputs[names.LOGITS])[-1]
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int) and isinstance(vocab, int)):
        raise ValueError(f"the {role} graph has symbolic KV heads/head dim/vocab; cannot describe its cache")
    elem = outputs[names.LOGITS].type.tensor_type.elem_type
    cache = inputs[names.past_name(0, "key")].type.tensor_type.elem_type
    return ModelSpec(
        role=role,
        family=family,
        exporter=exporter,
        onnx=files[0].relative_to(root).as_posix(),
        files=[file_entry(root, f) for f in files],
        kv_layout=names.kv_layout(inputs),
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_positions=max_positions,
        dtype=onnx.helper.tensor_dtype_to_np_dtype(elem).name,
        kv_dtype=onnx.helper.tensor_dtype_to_np_dtype(cache).name,
        quantization=quantization,
        inputs=list(inputs),
        outputs=list(outputs),
        source=source,
        source_info=source_info or {},
    )


def copy_tokenizer(source: Path, root: Path) -> list[FileEntry]:
    """Copy the prepared tokenizer files into `root/tokenizer` and describe them."""
    target = root / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    entries = []
    for file in sorted(source.iterdir()):
        if file.is_file():
            shutil.copyfile(file, target / file.name)
            entries.append(file_entry(root, target / file.name))
    return entries
