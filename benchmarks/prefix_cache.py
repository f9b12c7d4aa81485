"""The prefix cache: time to first token of a request sharing a ~300-token prefix with an earlier one,
and what each turn of a 5-turn chat feeds the target.

    python benchmarks/prefix_cache.py [PACKAGE] [--threads 2] [--repeats 5] [--new 16]

PACKAGE: a package (e.g. `ortspec export SmolLM2-135M-Instruct.Q4_1.gguf --draft <its head> --out
smollm2-int4`); default: the embedded default pair, exported int4 into --work. One process, one pipeline,
the package's default drafter with a fixed γ (no calibration). Each repeat uses a system prompt of its
own (~300 tokens) and two user questions:
- "first": the first question, nothing cached; "second": the other question, the system prompt cached;
  "second, cache off": the same request with the prefix cache turned off (`StatePool.reuse`).
  Medians of the time to first token, and second / first.
- "chat": 5 turns, each sending the whole conversation (the model's own answers included, as chat clients
  do): per turn its prompt tokens, those reused from the cache, those fed, and the new message's own
  (its user turn and the assistant's opening as the template renders them, counted as the growth of
  the rendered conversation). Needs a chat template.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import ortspec

SYSTEM = (
    "You are the support assistant of a company that sells garden tools. Answer in two short sentences, "
    "politely and without speculation. The catalogue: spades with ash handles and carbon steel blades; "
    "hand trowels in three sizes; pruning shears with bypass and anvil blades, replaceable springs; "
    "hedge trimmers, electric and manual; watering cans of five and ten litres; hoses of fifteen, twenty "
    "five and fifty metres with brass fittings; wheelbarrows with pneumatic or solid tyres; compost bins "
    "of two hundred and four hundred litres; seed trays, plant labels and twine. Delivery takes three "
    "working days in the country and seven abroad; orders over fifty euros ship free. Returns are "
    "accepted within thirty days if the tool is unused and in its packaging; refunds are made to the "
    "original payment method within five working days of receipt. Every wooden handle carries a ten "
    "year guarantee and every blade a five year guarantee against manufacturing defects, not wear. "
    "Customers may call the workshop on weekdays between nine and five for sharpening appointments; "
    "sharpening costs eight euros per blade. Never promise discounts; never give out staff names; when "
    "unsure, ask the customer to write to the support address with their order number."
)
QUESTIONS = [
    "How long does delivery to Spain take?",
    "Can I return shears I already used once?",
    "What does sharpening a spade cost?",
    "Is the handle of the hand trowel guaranteed?",
    "Do you sell hoses longer than fifty metres?",
]


def default_package(work: Path) -> Path:
    from ortspec.export import export_pair
    from ortspec.models.default_pair import shipped_pair

    out = work / "default-int4"
    if not (out / "manifest.json").exists():
        target, draft = shipped_pair()
        export_pair(target, out, draft=draft, quantize="int4", force=True, report=lambda _: None)
    return out


def prompt_ids(pipe: ortspec.Pipeline, system: str, question: str) -> list[int]:
    if pipe.manifest.tokenizer.chat_template:
        return pipe.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": question}])
    return pipe.tokenizer.encode(f"{system}\n\nQuestion: {question}\nAnswer:")


def shared_prefix_ttft(pipe: ortspec.Pipeline, repeats: int, options: dict) -> None:
    first, second, off, cached, lengths = [], [], [], [], []
    for i in range(repeats):
        system = f"Session {i}. {SYSTEM}"  # a prefix of its own: nothing cached from earlier repeats
        a, b = prompt_ids(pipe, system, QUESTIONS[0]), prompt_ids(pipe, system, QUESTIONS[1])
        pipe.target_states.reuse = True
        first.append(pipe.generate(a, **options).stats.time_to_first_token)
        result = pipe.generate(b, **options)
        second.append(result.stats.time_to_first_token)
        cached.append(result.stats.cached_tokens)
        lengths.append(len(b))
        pipe.target_states.reuse = False
        off.append(pipe.generate(b, **options).stats.time_to_first_token)
    pipe.target_states.reuse = True
    ms = [statistics.median(values) * 1000 for values in (first, second, off)]
    print(f"prompts of {statistics.median(lengths):.0f} tokens, {statistics.median(cached):.0f} shared (cached)")
    print("| request | TTFT ms (median) |\n|---|---|")
    print(f"| first | {ms[0]:.1f} |\n| second | {ms[1]:.1f} |\n| second, cache off | {ms[2]:.1f} |")
    print(f"second / first: {ms[1] / ms[0]:.3f}; second / second with the cache off: {ms[1] / ms[2]:.3f}")


def chat_turns(pipe: ortspec.Pipeline, options: dict) -> None:
    if not pipe.manifest.tokenizer.chat_template:
        print("chat: the package has no chat template, skipped")
        return
    messages = [{"role": "system", "content": f"Chat. {SYSTEM}"}]
    print("| turn | prompt tokens | cached | fed | new message's tokens | TTFT ms |\n|---|---|---|---|---|---|")
    for turn, question in enumerate(QUESTIONS, 1):
        before = len(pipe.chat_prompt(messages, add_generation_prompt=False))
        messages.append({"role": "user", "content": question})
        new = len(pipe.chat_prompt(messages)) - before  # the new user turn and the assistant's opening
        result = pipe.chat(messages, **options)
        stats = result.stats
        fed = stats.prompt_tokens - stats.cached_tokens
        ttft = stats.time_to_first_token * 1000
        print(f"| {turn} | {stats.prompt_tokens} | {stats.cached_tokens} | {fed} | {new} | {ttft:.1f} |")
        messages.append({"role": "assistant", "content": result.text})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, nargs="?")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortspec-prefix-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=16, help="new tokens per request")
    args = parser.parse_args()
    package = args.package or default_package(args.work)
    pipe = ortspec.load(package, threads=args.threads)
    options = dict(max_new_tokens=args.new, draft_tokens=3)
    print(f"package {package}, drafter {pipe.drafter(ortspec.GenerationConfig())}, threads {args.threads}")
    pipe.generate("Warm up the sessions.", **options)
    shared_prefix_ttft(pipe, args.repeats, options)
    chat_turns(pipe, options)


if __name__ == "__main__":
    main()
