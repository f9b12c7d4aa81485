"""What the commands print besides measurements: streamed text, a generation's stats, a package's summary."""

from __future__ import annotations

import sys

import click

from ortspec.runtime.options import DrafterKind
from ortspec.runtime.package.manifest import Manifest
from ortspec.runtime.results import GenerationResult, GenerationStats, TextStream


def echo_stream(stream: TextStream) -> GenerationResult:
    """Print the text as it streams; the finished generation."""
    for delta in stream:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    if stream.result is None:  # an exhausted stream holds its result
        raise RuntimeError("the generation ended without a result")
    return stream.result


def print_stats(stats: GenerationStats) -> None:
    """Acceptance, speed and call counts of one generation (to stderr)."""
    alpha = "n/a (no drafts)" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.1%}"
    click.echo(
        f"\n--\n{stats.new_tokens} tokens in {stats.seconds:.3f} s: {stats.tokens_per_second:.1f} tokens/s "
        f"(first token after {stats.time_to_first_token * 1000:.1f} ms, finished on {stats.finish_reason})\n"
        f"acceptance {alpha} of {stats.drafted_tokens} drafts ({stats.drafter}, γ={stats.draft_tokens}"
        + (
            f", mean γ used {sum(stats.drafted_per_round) / len(stats.drafted_per_round):.2f}"
            if stats.drafted_per_round
            else ""
        )
        + "); "
        f"{stats.tokens_per_target_call:.2f} tokens per target call; "
        f"target calls {stats.target_calls}, draft calls {stats.draft_calls}",
        err=True,
    )
    if stats.undrafted_rounds and stats.draft_tokens == "auto":
        rounds = stats.undrafted_rounds + len(stats.drafted_per_round)
        why = {
            DrafterKind.SUFFIX: "no suffix match was found, or none whose tokens' chances of acceptance",
            DrafterKind.HYBRID: "neither a suffix match nor the draft model at the acceptance rate seen so far",
        }.get(DrafterKind(stats.drafter), "no γ, at the acceptance rate seen so far,")
        click.echo(
            f"auto γ decoded {stats.undrafted_rounds} of {rounds} rounds without drafts: {why} was predicted to "
            "beat plain decoding by 5% on this machine's measured step costs (`ortspec calibrate`)"
            + ("" if stats.drafter == DrafterKind.SUFFIX else " (or to repay the draft's catch-up before the end)"),
            err=True,
        )


def quantization_label(manifest: Manifest) -> str:
    """The target's weights in a few words: "int4, block 32", or its dtype when unquantized."""
    quant = manifest.target.quantization
    if quant.get("method") == "none":
        return manifest.target.dtype
    gemm = ", int8 GEMM projections" if quant.get("int8_kernel") == "gemm" else ""
    gemm += ", int8 GEMM lm_head" if quant.get("lm_head_kernel") == "gemm" else ""
    return f"int{quant['bits']}, block {quant['block_size']}{gemm}"


def _gguf_blocks(quantization: dict) -> str | None:
    from ortspec.export.quantize.streaming import describe_gguf_blocks  # export's modules: only for GGUF records

    return describe_gguf_blocks(quantization) if "gguf_blocks" in quantization else None


def describe(manifest: Manifest) -> str:
    """A readable summary of a package's manifest."""
    lines = [
        f"ortspec package {manifest.root} (format {manifest.format_version}, "
        f"written by ortspec {manifest.ortspec_version})"
    ]
    for spec in manifest.models():
        quant = spec.quantization
        q = (
            "none"
            if quant.get("method") == "none"
            else (
                f"int{quant['bits']} MatMulNBits, block {quant['block_size']}, "
                f"accuracy level {quant['accuracy_level']}, {quant['quantized_nodes']} quantized weights"
                + (
                    f", of which {quant['int8_gemm_nodes']} int8 GEMM (MatMulInteger, per-row activation scales)"
                    if quant.get("int8_gemm_nodes")
                    else ""
                )
                + (", the lm_head among them" if quant.get("lm_head_kernel") == "gemm" else "")
            )
        )
        size = sum(f.size for f in spec.files)
        gguf = _gguf_blocks(quant)
        lines += [
            f"{spec.role}: {spec.source} ({spec.family}), exported by {spec.exporter}",
            f"  {spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, vocab {spec.vocab_size}, "
            f"max positions {spec.max_positions}, {spec.dtype}, KV layout {spec.kv_layout}"
            + (f", KV cache {spec.kv_dtype}" if spec.kv_dtype and spec.kv_dtype != spec.dtype else ""),
            f"  quantization: {q}",
            *([f"  {gguf}"] if gguf else []),
            "  files: "
            + ", ".join(f"{f.path} ({f.size / 1e6:.1f} MB)" for f in spec.files)
            + f"; total {size / 1e6:.1f} MB",
        ]
    if manifest.draft is None:
        lines.append("draft: none (plain decoding only)")
    tok = manifest.tokenizer
    lines.append(
        f"tokenizer: eos {tok.eos_token_ids}, bos {tok.bos_token_id}, pad {tok.pad_token_id}, "
        f"chat template {'yes' if tok.chat_template else 'no'}"
    )
    if manifest.compatibility:
        lines.append("compatibility: " + ", ".join(f"{k} {v}" for k, v in manifest.compatibility.items()))
    if manifest.generation:
        lines.append("generation defaults: " + ", ".join(f"{k}={v}" for k, v in manifest.generation.items()))
    return "\n".join(lines)
