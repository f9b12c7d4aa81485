"""`ortspec export`, `ortspec distill` and `ortspec info`: packages made from checkpoints, and what they hold."""

from __future__ import annotations

from pathlib import Path

import click

from ortspec.models.catalog import resolve_package
from ortspec.runtime.package.manifest import load_manifest

from .options import PACKAGE, report
from .output import describe

QUANT_CHOICES = click.Choice(["none", "int8", "int4"])


def _feature_layers(value: str) -> tuple[int, ...] | None:
    """--feature-layers: "auto" (None), "none" (()) or comma-separated layer numbers."""
    if value == "auto":
        return None
    if value == "none":
        return ()
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer numbers like 8,22, or auto, or none") from None


@click.command()
@click.argument("target")
@click.option(
    "--draft",
    help="Draft checkpoint (local directory, .gguf file or hub id) sharing the target's tokenizer, or a draft "
    "head directory written by `ortspec distill` for this target.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Package directory to write (default: ./<target name>-ortspec).",
)
@click.option(
    "--quantize",
    type=QUANT_CHOICES,
    default="int4",
    show_default=True,
    help="Weight-only quantization of the target: int4 as MatMulNBits blocks; int8 see --int8-kernel.",
)
@click.option("--draft-quantize", type=QUANT_CHOICES, help="Quantization of the draft (default: same as --quantize).")
@click.option(
    "--block-size",
    type=int,
    default=32,
    show_default=True,
    help="Quantization block size (a power of two >= 16). A GGUF's blocks stay at their own size where it is "
    "smaller (Q6_K: 16).",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="MatMulNBits compute accuracy; 4 (int8 compute) is the fast one on CPU.",
)
@click.option(
    "--int8-kernel",
    type=click.Choice(["nbits", "gemm"]),
    default="nbits",
    show_default=True,
    help="With --quantize int8: nbits keeps MatMulNBits blocks (nearly lossless); gemm stores the target's layer "
    "projections (and its lm_head, see --lm-head-kernel) as int8 per output column for ONNX Runtime's int8 GEMM "
    "(MatMulInteger), activations quantized per position with their rounding error as a second row, so a call "
    "of many positions (verifying drafts, a prefill) costs about one (SmolLM2-135M: v(4) 1.19 against 1.53) at "
    "nearly nbits' quality (top-1 96.8% against 96.9%); a GGUF's blocks are quantized again. For "
    "speculation-heavy serving; builder, fp32 only.",
)
@click.option(
    "--lm-head-kernel",
    type=click.Choice(["nbits", "gemm"]),
    help="The target's lm_head: nbits as MatMulNBits blocks (a tied one shares the embedding's); gemm as int8 per "
    "output column for the int8 GEMM of --int8-kernel gemm (activations per position, with their rounding error as "
    "a second row), so its cost stays nearly flat over the positions of a call. A tied lm_head gets a copy of its "
    "own (vocab x hidden bytes). SmolLM2-135M int4: +28 MB on 104 MB, one-position step -3%, v(4) 1.63 -> 1.58, "
    "KL 0.0038 against 0.0034. Default: gemm with --int8-kernel gemm, else nbits. Builder, fp32 only.",
)
@click.option(
    "--exporter",
    type=click.Choice(["auto", "builder", "optimum"]),
    default="auto",
    show_default=True,
    help="builder: ONNX built from safetensors or GGUF with GroupQueryAttention and a shared KV buffer "
    "(llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3; GGUF: llama, qwen2, qwen3, gemma3, phi3; no "
    "torch needed); optimum: the generic exporter (not for GGUF); auto: the builder when it applies.",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Precision of activations, KV cache and logits. fp16 is for GPUs (onnxruntime-gpu: load with "
    "--provider CUDAExecutionProvider), where attention runs in fp16 only; CPUs want fp32.",
)
@click.option(
    "--draft-dtype",
    type=click.Choice(["fp32", "fp16"]),
    help="Precision of the draft (default: --dtype); fp32 for a draft that runs on the CPU beside a GPU target.",
)
@click.option(
    "--kv-dtype",
    type=click.Choice(["fp32", "fp16"]),
    help="Precision of the KV cache (default: --dtype's). fp16 beside fp32 activations halves the cache's memory "
    "(many or long sequences); attention then computes in fp16: no faster on a CPU, and the next-token "
    "distribution moves about as much as with int4 weights (docs/benchmarks.md, 'The KV cache in fp16'). "
    "Builder graphs; a draft head's one-layer cache stays fp32.",
)
@click.option(
    "--gguf-blocks",
    "--q4-1",
    "gguf_blocks",
    type=click.Choice(["keep", "requantize"]),
    default="keep",
    show_default=True,
    help="A GGUF's block weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K): keep them exactly as the "
    "file holds them (blocks with a minimum, such as Q4_1 and Q4_K, with a small correction term per weight; "
    "8-bit types at 8 bits) or requantize what --quantize cannot hold as it is (the fastest steps, further "
    "from the file). The export names the tensors it re-quantized. See docs/design.md, 'Quantization choices'.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the ortspec package at --out: the files it wrote; other files there are kept.",
)
def export(
    target: str,
    draft: str | None,
    out: Path | None,
    quantize: str,
    draft_quantize: str | None,
    block_size: int,
    accuracy_level: int,
    int8_kernel: str,
    lm_head_kernel: str | None,
    exporter: str,
    dtype: str,
    draft_dtype: str | None,
    kv_dtype: str | None,
    gguf_blocks: str,
    force: bool,
) -> None:
    """Export TARGET (and --draft) into one quantized ONNX deployment package.

    TARGET and --draft are Hugging Face checkpoint directories, hub ids (hub ids need a network
    or a filled Hugging Face cache) or GGUF files (llama.cpp's format; llama incl. Mistral-style,
    qwen2, qwen3, gemma3 and phi3 architectures; any weight type the gguf package dequantizes:
    F32, F16, BF16, Q4_0, Q4_1, Q8_0, K-quants...; read without torch, the weights dequantized to
    fp32 before --quantize, except that Q4_0/Q4_1 blocks for int4/int8 and Q8_0/Q5_0 blocks for
    int8 are kept exactly). The package appears only once complete: an interrupted export (Ctrl-C,
    SIGTERM) leaves no half-written package behind, and one export at a time may write an --out.
    """
    try:
        from ortspec.export import export_pair
    except ImportError as exc:
        raise click.ClickException(
            f"`ortspec export` needs the export extras ({exc.name} is missing): pip install 'ortspec[export]'"
        ) from exc
    name = Path(target.rstrip("/")).name
    out = out or Path(f"{name[: -len('.gguf')] if name.lower().endswith('.gguf') else name}-ortspec")
    export_pair(
        target,
        out,
        draft=draft,
        quantize=quantize,
        draft_quantize=draft_quantize,
        block_size=block_size,
        accuracy_level=accuracy_level,
        exporter=exporter,
        dtype=dtype,
        draft_dtype=draft_dtype,
        kv_dtype=kv_dtype,
        keep_gguf_blocks=gguf_blocks == "keep",
        int8_kernel=int8_kernel,
        lm_head_kernel=lm_head_kernel,
        force=force,
        report=lambda line: click.echo(line, err=True),
    )
    click.echo(f"package written to {out}", err=True)


@click.command()
@click.argument("target")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the head, its data and checkpoints; run again with the same --out to resume.",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=0.1),
    default=120,
    show_default=True,
    help="Time budget of this run (data, features, training); a run into an existing --out resumes its data "
    "and training.",
)
@click.option(
    "--data-share",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of the budget spent letting the target write training chats (the rest trains).",
)
@click.option(
    "--text",
    multiple=True,
    type=click.Path(exists=True),
    help="Local text files or directories to train on as well (code, docs); repeatable.",
)
@click.option(
    "--prompts",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Your own requests, the traffic the draft will serve: the target answers each (before any request "
    'it samples itself). One per line, or .jsonl with a string, {"prompt": ...} or {"messages": [...]} per '
    "line (a chat log; a last assistant message is replaced by the target's own answer); repeatable. One in "
    "ten (up to 12) is set aside, never trained on, and the head's agreement on them is printed.",
)
@click.option("--quantize", type=QUANT_CHOICES, default="int4", show_default=True, help="How the target is served.")
@click.option(
    "--vocab", type=click.IntRange(min=16), default=4096, show_default=True, help="Tokens the head may propose."
)
@click.option("--threads", type=click.IntRange(min=1), help="Threads of the target while making data (default: ORT's).")
@click.option(
    "--writers",
    type=click.IntRange(min=1),
    help="Processes writing chats at once, sharing the threads (default: one per core, or per --threads; at most 8).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    help="Chats each writer writes side by side, their one-token target steps batched into one call "
    "(more chats per second; 1 writes them one after another). Default: 32 over all writers, 4 to 16 each "
    "(16 with 2 writers); each holds a KV cache of 1024 positions (47 MB on SmolLM2-135M).",
)
@click.option(
    "--kind",
    type=click.Choice(["head", "lm"]),
    default="head",
    show_default=True,
    help="head: a feature-level draft head (EAGLE-style; cheap steps, drafts from the target's own features). "
    "lm: a small independent Llama (4 layers, at most half the target's width: 16M parameters for SmolLM2-135M) "
    "sharing the target's tokenizer, a Hugging Face "
    "checkpoint that drafts anywhere a draft model does; its steps cost more.",
)
@click.option(
    "--feature-layers",
    callback=lambda ctx, param, value: _feature_layers(value),
    default="auto",
    show_default=True,
    help="Inner layers of the target the head reads besides its final features, as EAGLE-3 fuses low, middle "
    "and high layers (e.g. 8,22; 'none': the final features alone). auto: after ~27% and ~73% of the layers "
    "(8,22 of SmolLM2-135M's 30), worth about +0.07 of agreement there at equal data. A run resumes with the "
    "layers it began with.",
)
def distill(
    target: str,
    out: Path,
    minutes: float,
    data_share: float,
    text: tuple[str, ...],
    prompts: tuple[str, ...],
    quantize: str,
    vocab: int,
    threads: int | None,
    writers: int | None,
    batch: int | None,
    kind: str,
    feature_layers: tuple[int, ...] | None,
) -> None:
    """Train a draft head (EAGLE-style) for TARGET, a model that has no draft, offline.

    TARGET is a Hugging Face checkpoint directory, hub id or GGUF file. The target writes its own training
    chats (requests sampled from its chat template, answered greedily: on-policy data), keeping its
    final features as it writes, and a one-layer head learns to continue those features. Requests of
    your own (--prompts, e.g. a log of what you serve) are answered first, so the head learns from
    answers like the ones it will draft. It
    drafts from a subset of the vocabulary (--vocab most frequent tokens), which keeps a draft step
    at a few percent of a target step. Training runs in bfloat16 where the CPU has it natively
    (AVX512-BF16, AMX). The held-out agreement is printed at the end. Then:

    \b
      ortspec export TARGET --draft OUT --out ./pair
      ortspec chat ./pair --stats
    """
    try:
        from ortspec.export.distill import DistillConfig
        from ortspec.export.distill import distill as run_distill
    except ImportError as exc:
        raise click.ClickException(
            f"`ortspec distill` needs the export extras ({exc.name} is missing): pip install 'ortspec[export]'"
        ) from exc
    config = DistillConfig(
        minutes=minutes,
        data_share=data_share,
        text=text,
        prompts=prompts,
        quantize=quantize,
        vocab=vocab,
        threads=threads,
        writers=writers,
        batch=batch,
        kind=kind,
        feature_layers=feature_layers,
    )
    run_distill(target, out, config, report=lambda line: click.echo(line, err=True))
    what = "draft head" if kind == "head" else "draft LM"
    click.echo(f"{what} written to {out}; use it: ortspec export {target} --draft {out} --out PACKAGE", err=True)


@click.command()
@click.argument("package", type=PACKAGE)
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.json.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
def info(package: str, as_json: bool, verify: bool) -> None:
    """Show what PACKAGE holds: models, quantization, KV layout, tokenizer, files."""
    manifest = load_manifest(resolve_package(package, report), verify=verify)
    click.echo(manifest.to_json() if as_json else describe(manifest))
    if verify:
        click.echo("all files match their sha256")
