"""`ortspec export`: target (+ draft) checkpoints -> one quantized, checksummed deployment package."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ortspec.runtime.errors import PackageError
from ortspec.runtime.options import check_paths
from ortspec.runtime.package.json_file import read_json
from ortspec.runtime.package.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEAD_KIND,
    MANIFEST_FILE,
    Manifest,
    ModelSpec,
    TokenizerSpec,
    load_manifest,
)

from .. import __version__
from .builder import GraphBuilder, build_head_onnx, build_onnx, can_build
from .builder.config import decoder_config
from .builder.external import ExternalData, save_graph
from .builder.head import check_head, is_head_dir, read_head_config
from .checkpoint import Checkpoint, prepare_tokenizer, resolve_checkpoint
from .compat import PairCompatibility, check_pair
from .families import family_of, max_positions
from .onnx_export import export_with_optimum
from .package import copy_tokenizer, describe_model, save_onnx
from .precision import KV_DTYPES, check_dtype, to_float16
from .publish import staging_directory
from .quantize import BITS, quantize_weights
from .quantize.streaming import INT8_KERNELS, StreamingQuantizer, describe_gguf_blocks

Reporter = Callable[[str], None]
EXPORTERS = ("auto", "builder", "optimum")


@dataclass(frozen=True)
class Quantization:
    """How one model's weights are quantized: "none", "int8" or "int4", block size, accuracy level."""

    kind: str
    block_size: int = 32
    accuracy_level: int = 4
    dtype: str = "fp32"  # activations, KV cache and logits: "fp32" or "fp16" (GPUs)
    keep_gguf_blocks: bool = True  # GGUF Q4_1 (with a correction) and, at int4, Q8_0 blocks kept exactly
    int8_kernel: str = "nbits"  # "gemm": int8 projections through MatMulInteger (streamed builder graphs only)
    lm_head_kernel: str = "nbits"  # "gemm": the lm_head int8 per column through MatMulInteger (the same)
    kv_dtype: str = "fp32"  # the KV cache: "fp32", or "fp16" (half the bytes; streamed builder graphs only)


class Progress:
    """Numbered stages with their durations: `[2/6] quantizing target (int4) ... 3.1 s`."""

    def __init__(self, total: int, report: Reporter) -> None:
        self.total, self.done, self.report = total, 0, report

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        self.done += 1
        self.report(f"[{self.done}/{self.total}] {what} ...")
        start = time.perf_counter()
        yield
        self.report(f"      done in {time.perf_counter() - start:.1f} s")


def choose_exporter(checkpoint: Checkpoint, exporter: str) -> str:
    """`auto` -> the builder for the families it builds exactly, optimum for the rest; GGUF: the builder."""
    if checkpoint.is_gguf:
        if exporter == "optimum":
            raise ValueError(
                f"{checkpoint.name} is a GGUF file, which only the builder exports; use --exporter builder (or auto)"
            )
        decoder_config(checkpoint.config)  # raises UnsupportedModelError with the reason
        return "builder"
    if exporter == "auto":
        return "builder" if can_build(checkpoint.config) else "optimum"
    if exporter == "builder":
        decoder_config(checkpoint.config)  # raises UnsupportedModelError with the reason
    return exporter


def _export_model(
    checkpoint: Checkpoint,
    role: str,
    exporter: str,
    quantize: Quantization,
    work: Path,
    root: Path,
    progress: Progress,
    feature_layers: Sequence[int] = (),
) -> ModelSpec:
    positions = max_positions(checkpoint.config)
    long_rope_after = None
    streamed = exporter == "builder" and quantize.dtype == "fp32"
    for option, kernel in (("--int8-kernel", quantize.int8_kernel), ("--lm-head-kernel", quantize.lm_head_kernel)):
        if kernel != "nbits" and not streamed:
            raise ValueError(f"{option} {kernel} needs the builder's fp32 graph for the {role}")
    if quantize.kv_dtype != quantize.dtype and not (exporter == "builder" and quantize.dtype == "fp32"):
        raise ValueError(
            f"--kv-dtype {quantize.kv_dtype} needs the builder's fp32 graph for the {role} (an fp16 graph's "
            f"cache is fp16, optimum's is its activations' type)"
        )
    if exporter == "builder" and quantize.dtype == "fp32":
        return _build_streaming(checkpoint, role, quantize, root, progress, feature_layers)
    if exporter == "builder":
        source = f"{checkpoint.model_type}, GGUF dequantized to fp32" if checkpoint.is_gguf else checkpoint.model_type
        with progress.stage(f"building {role} {checkpoint.name} ({source}) as ONNX with the builder"):
            model, cfg, positions = build_onnx(checkpoint.path, checkpoint.config, feature_layers)
        long_rope_after = cfg.long_rope_after
    elif feature_layers:
        raise ValueError(f"feature layers need the target built by the builder; {checkpoint.name} exports with optimum")
    else:
        with progress.stage(f"exporting {role} {checkpoint.name} ({checkpoint.model_type}) to ONNX with optimum"):
            model = onnx.load(export_with_optimum(checkpoint, work / role))
    spec = _save_model(model, role, quantize, root, progress, checkpoint, checkpoint.name, positions, exporter)
    return dataclasses.replace(spec, long_rope_after=long_rope_after)


def _build_streaming(
    checkpoint: Checkpoint,
    role: str,
    quantize: Quantization,
    root: Path,
    progress: Progress,
    feature_layers: Sequence[int],
) -> ModelSpec:
    """Build the graph with each weight read, quantized and written to the package's external data in turn:
    memory holds a layer or two of fp32 weights, never the model (fp32 graphs; fp16 ones convert whole)."""
    bits, path = BITS[quantize.kind], root / role / "model.onnx"
    quantizer = (
        StreamingQuantizer(
            bits,
            quantize.block_size,
            quantize.accuracy_level,
            quantize.keep_gguf_blocks,
            int8_kernel=quantize.int8_kernel,
            lm_head_kernel=quantize.lm_head_kernel,
        )
        if bits
        else None
    )
    source = checkpoint.model_type
    if checkpoint.is_gguf:
        source += ", GGUF blocks read from the file" if quantizer else ", GGUF dequantized to fp32"
    what = f", weights quantized to {quantize.kind} as they are read" if quantizer else ""
    what += ", fp16 KV cache" if quantize.kv_dtype == "fp16" else ""
    data = ExternalData(path)
    with progress.stage(f"building {role} {checkpoint.name} ({source}) as ONNX with the builder{what}"):
        graph = GraphBuilder(data, quantizer, KV_DTYPES[quantize.kv_dtype])
        model, cfg, positions = build_onnx(checkpoint.path, checkpoint.config, feature_layers, graph)
        files = save_graph(model, path, data)
    if quantizer and (line := describe_gguf_blocks(quantizer.summary())):
        progress.report(f"      {line}")
    spec = describe_model(
        model,
        role=role,
        root=root,
        files=files,
        family=family_of(checkpoint.config).name,
        source=checkpoint.name,
        max_positions=positions,
        quantization=quantizer.summary() if quantizer else {"method": "none"},
        exporter="builder",
        source_info=checkpoint.source_info,
    )
    return dataclasses.replace(spec, long_rope_after=cfg.long_rope_after)


def _export_head(
    head_dir: Path, target: Checkpoint, quantize: Quantization, root: Path, progress: Progress
) -> ModelSpec:
    with progress.stage(f"building the draft head {head_dir} on the target's embeddings and lm_head"):
        model, positions = build_head_onnx(head_dir, target.path, target.config)
    spec = _save_model(model, "draft", quantize, root, progress, target, str(head_dir), positions, "builder")
    return dataclasses.replace(spec, kind=HEAD_KIND, training=read_head_config(head_dir).get("training", {}))


def _save_model(
    model: onnx.ModelProto,
    role: str,
    quantize: Quantization,
    root: Path,
    progress: Progress,
    checkpoint: Checkpoint,
    source: str,
    positions: int,
    exporter: str,
) -> ModelSpec:
    """Quantize (if asked), write the graph into the package and describe it for the manifest."""
    bits, block_size, accuracy_level = BITS[quantize.kind], quantize.block_size, quantize.accuracy_level
    quantization: dict[str, Any] = {"method": "none"}
    if bits is not None:
        with progress.stage(
            f"quantizing {role} weights to {quantize.kind} (block {block_size}, accuracy level {accuracy_level})"
        ):
            model, quantization = quantize_weights(model, bits, block_size, accuracy_level, quantize.keep_gguf_blocks)
    if quantize.dtype == "fp16":
        with progress.stage(f"converting the {role} graph to fp16"):
            model = to_float16(model)
    files = save_onnx(model, root / role / "model.onnx")
    return describe_model(
        model,
        role=role,
        root=root,
        files=files,
        family=family_of(checkpoint.config).name,
        source=source,
        max_positions=positions,
        quantization=quantization,
        exporter=exporter,
        source_info=checkpoint.source_info,
    )


def _chat_template(tokenizer_dir: Path) -> str | None:
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = tokenizer_dir / "tokenizer_config.json"
    data = read_json(config) if config.is_file() else None
    template = data.get("chat_template") if isinstance(data, dict) else None
    return template if isinstance(template, str) else None


def export_pair(
    target: str | Path,
    out: str | Path,
    *,
    draft: str | Path | None = None,
    quantize: str = "int4",
    draft_quantize: str | None = None,
    block_size: int = 32,
    accuracy_level: int = 4,
    exporter: str = "auto",
    draft_exporter: str | None = None,
    dtype: str = "fp32",
    draft_dtype: str | None = None,
    kv_dtype: str | None = None,
    keep_gguf_blocks: bool = True,
    int8_kernel: str = "nbits",
    lm_head_kernel: str | None = None,
    feature_layers: Sequence[int] = (),
    force: bool = False,
    report: Reporter = print,
) -> Manifest:
    """Export `target` (and `draft`) into the package directory `out`; return its manifest.

    `quantize`/`draft_quantize` are "none", "int8" or "int4" (the draft defaults to the target's).
    `exporter` is "auto" (the builder where it applies, else optimum), "builder" or "optimum";
    `draft_exporter` defaults to the same. `dtype`/`draft_dtype` are "fp32" or "fp16" (for GPUs; the draft
    defaults to the target's, and a CPU draft beside a GPU target wants "fp32"). `kv_dtype` is the KV cache's,
    "fp32" or "fp16" (default: the activations'): an fp16 cache beside fp32 activations halves the cache's bytes
    (builder graphs; a draft head's one-layer cache stays fp32; see docs/design.md "The KV cache's precision"). The
    package appears at `out` only once complete; `force` replaces the files of an ortspec package there (and nothing
    else). `keep_gguf_blocks=False` re-quantizes a GGUF's Q4_1 blocks (and, at int4, its Q8_0 ones) instead of
    keeping them exactly (faster steps, lower fidelity; see docs/design.md "Quantization choices").
    `int8_kernel="gemm"` (with quantize="int8") stores the target's layer projections as int8 per output column for
    ONNX Runtime's int8 GEMM, activations quantized per position: calls of many positions cost about one (builder,
    fp32 only; the default "nbits" keeps MatMulNBits; see docs/design.md "Many positions per call").
    `lm_head_kernel` "gemm" puts the target's lm_head on that GEMM too (int8 or int4; a tied embedding's lookup
    keeps its blocks and the lm_head gets an int8 copy of its own); the default is `int8_kernel`'s choice.
    `feature_layers`: inner layers whose output the target's hidden_states carries too, for a draft head that reads
    them (a head draft sets them itself: those it was trained on; `ortspec distill` exports its target so). SIGTERM
    stops the export like Ctrl-C: it cleans up and raises KeyboardInterrupt.
    """
    check_paths(target=target, out=out, draft=draft)
    exporters = {"target": exporter, "draft": draft_exporter or exporter}
    for value in exporters.values():
        if value not in EXPORTERS:
            raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {value!r}")
    draft_quantize = draft_quantize or quantize
    for name, value in (("quantize", quantize), ("draft_quantize", draft_quantize)):
        if value not in BITS:
            raise ValueError(f"{name} must be one of {', '.join(BITS)}, got {value!r}")
    if int8_kernel not in INT8_KERNELS:
        raise ValueError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
    if int8_kernel != "nbits" and quantize != "int8":
        raise ValueError(f"int8_kernel {int8_kernel!r} needs quantize='int8', got {quantize!r}")
    lm_head_kernel = lm_head_kernel or int8_kernel
    if lm_head_kernel not in INT8_KERNELS:
        raise ValueError(f"lm_head_kernel must be one of {', '.join(INT8_KERNELS)}, got {lm_head_kernel!r}")
    if lm_head_kernel != "nbits" and BITS[quantize] is None:
        raise ValueError(f"lm_head_kernel {lm_head_kernel!r} needs a quantized target, got quantize={quantize!r}")
    dtypes = {"target": dtype, "draft": draft_dtype or dtype}
    for role, value in dtypes.items():
        check_dtype("dtype" if role == "target" else "draft_dtype", value)
    if kv_dtype is not None:
        check_dtype("kv_dtype", kv_dtype)
    head = draft is not None and is_head_dir(draft)
    if head and exporter == "optimum":
        raise ValueError("a draft head needs the target built by the builder (it reads the target's features)")
    if draft is not None and head:
        feature_layers = check_head(draft).get("feature_layers", [])
    roles: list[tuple[str, str | Path, str]] = [("target", target, quantize)]
    if draft:
        roles.append(("draft", draft, draft_quantize))

    def separate_quantization(role: str, quantization: str) -> bool:
        """Whether quantizing is a stage of its own: not for a graph the builder streams (fp32 activations,
        not a head; `auto` is taken to pick the builder, and the count is mended if it picks optimum)."""
        streamed = dtypes[role] == "fp32" and exporters[role] != "optimum" and not (head and role == "draft")
        return BITS[quantization] is not None and not streamed

    steps = 2 + sum(1 + separate_quantization(role, q) + (dtypes[role] == "fp16") for role, _, q in roles)
    progress = Progress(steps, report)
    out = Path(out)
    with staging_directory(out, force, report) as (root, work):
        with progress.stage("reading checkpoints and checking tokenizers"):
            checkpoints = {role: resolve_checkpoint(name) for role, name, _ in roles if not (head and role == "draft")}
            tokenizers = {
                role: prepare_tokenizer(ckpt, work / f"{role}-tokenizer") for role, ckpt in checkpoints.items()
            }
            compatibility: PairCompatibility | None = None
            if draft and not head:
                compatibility = check_pair(
                    tokenizers["target"],
                    tokenizers["draft"],
                    checkpoints["target"].vocab_size,
                    checkpoints["draft"].vocab_size,
                )
        specs = {}
        for role, source, q in roles:
            kernels = (int8_kernel, lm_head_kernel) if role == "target" else ("nbits", "nbits")
            cache = kv_dtype or dtypes[role]
            quantization = Quantization(
                q, block_size, accuracy_level, dtypes[role], keep_gguf_blocks, kernels[0], kernels[1], cache
            )
            if head and role == "draft":
                specs[role] = _export_head(Path(source), checkpoints["target"], quantization, root, progress)
                continue
            chosen = choose_exporter(checkpoints[role], "builder" if head else exporters[role])
            if chosen == "optimum" and exporters[role] == "auto" and q != "none" and dtypes[role] == "fp32":
                progress.total += 1  # optimum's graph is quantized as a stage of its own
            layers = feature_layers if role == "target" else ()
            specs[role] = _export_model(checkpoints[role], role, chosen, quantization, work, root, progress, layers)
        with progress.stage(f"writing the package manifest to {out}"):
            main = checkpoints["target"]
            generation = {k: v for k, v in main.generation_config.items() if not k.startswith("transformers_")}
            manifest = Manifest(
                format=FORMAT_NAME,
                format_version=FORMAT_VERSION,
                ortspec_version=__version__,
                target=specs["target"],
                draft=specs.get("draft"),
                tokenizer=TokenizerSpec(
                    files=copy_tokenizer(tokenizers["target"], root),
                    eos_token_ids=main.eos_token_ids(),
                    bos_token_id=main.special_id("bos"),
                    pad_token_id=main.special_id("pad"),
                    chat_template=_chat_template(tokenizers["target"]),
                ),
                generation=generation,
                compatibility=(
                    {"shared_vocab_size": min(s.vocab_size for s in specs.values())}
                    | (
                        {"tokenizer_size": compatibility.tokenizer_size, "tokenizers_equal": True}
                        if compatibility
                        else {}
                    )
                ),
            )
            (root / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
            _check_loadable(root)
    return manifest


def _check_loadable(root: Path) -> None:
    """Refuse to publish a package the loader would refuse (its manifest's fields, sizes and files)."""
    try:
        load_manifest(root, verify=False)
    except PackageError as exc:
        raise ValueError(f"the exported package would not load: {exc}") from exc
