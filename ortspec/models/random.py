"""Random-weight Hugging Face checkpoints with a real byte-level BPE tokenizer.

For tests (tiny models, peaked logits through a large init std so greedy choices have margins),
benchmarks (realistic shapes, e.g. a ~130M target and ~15M draft) and the demo until the trained
default pair exists. Needs the export extras (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, item):\n"
    "        self.items.append(item)\n    def pop(self):\n        return self.items.pop()\n"
    "for i in range(10):\n    print(i, i * i)\nimport os\nimport sys\nwith open(path) as f:\n"
    "    data = f.read()\nThe quick brown fox jumps over the lazy dog. Ünïcödé 日本語 ✓\n"
) * 4

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def make_word_tokenizer(directory: Path, vocab_size: int) -> int:
    """A word-level tokenizer of exactly `vocab_size` tokens ("t2", "t3", ... after the specials), for
    models with a tiny vocabulary (exact distribution tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(directory)
    return len(fast)


def make_tokenizer(directory: Path, vocab_size: int = 384) -> int:
    """Train a small byte-level BPE (word-level below 300 tokens), save it as a transformers fast
    tokenizer; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        return make_word_tokenizer(directory, vocab_size)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(directory)
    return len(fast)


def make_checkpoint(
    directory: Path,
    family: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    std: float = 0.3,
    max_positions: int = 256,
    eos_token_id: int | None = None,
    tokenizer_vocab: int = 384,
    vocab_size: int | None = None,
    intermediate: int | None = None,
    dtype: str = "float32",
    shard_size: str | None = None,
    norm_std: float = 0.0,
    **config_overrides: object,
) -> Path:
    """Save a random `family` causal LM to `directory`; `vocab_size` beyond the tokenizer adds padding rows;
    `norm_std` adds noise to the norm weights (which transformers initialises to constants)."""
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = max(make_tokenizer(directory, tokenizer_vocab), vocab_size or 0)
    eos = 0 if eos_token_id is None else eos_token_id
    config: transformers.PretrainedConfig
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            initializer_range=std,
            bos_token_id=0,
            eos_token_id=eos,
        )
    else:
        config = transformers.AutoConfig.for_model(
            family,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate or hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            initializer_range=std,
            bos_token_id=0,
            eos_token_id=eos,
            pad_token_id=1,
            **{"tie_word_embeddings": False, **config_overrides},
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_std and "norm" in name:
                p.add_(torch.randn_like(p) * norm_std)
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = 0
    model.generation_config.pad_token_id = 1
    model.to(getattr(torch, dtype)).save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    return directory


def perturbed_copy(source: Path, directory: Path, noise: float, seed: int = 1, vocab_rows: int | None = None) -> Path:
    """A draft that mostly agrees with `source`: its weights plus Gaussian noise (and padding rows)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    if vocab_rows:
        model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return Path(directory)


def main() -> None:
    """`python -m ortspec.models.random OUT [--preset demo|bench]`: write OUT/target and OUT/draft."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    args = parser.parse_args()
    target_sizes, draft = PRESETS[args.preset]
    target = make_checkpoint(args.out / "target", "llama", **target_sizes)
    if isinstance(draft, float):
        perturbed_copy(target, args.out / "draft", noise=draft)
    else:
        make_checkpoint(args.out / "draft", "llama", seed=1, **draft)
    print(f"wrote {args.out}/target and {args.out}/draft ({args.preset} preset, random weights)")


# target sizes, and the draft: its own sizes, or the noise of a perturbed copy of the target
PRESETS: dict[str, tuple[dict, dict | float]] = {
    "demo": (dict(hidden=256, layers=4, heads=8, kv_heads=4, std=0.1, max_positions=1024), 0.01),
    "bench": (
        dict(
            hidden=768,
            layers=12,
            heads=12,
            kv_heads=4,
            intermediate=2048,
            vocab_size=32000,
            std=0.02,
            max_positions=4096,
        ),
        dict(
            hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab_size=32000, std=0.02, max_positions=4096
        ),
    ),
}

if __name__ == "__main__":
    main()
