"""Bad generation inputs get one-line errors naming the field, the same from the API and the CLI; the
CLI's generation options come from GenerationConfig's fields; chat templates render within limits."""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner

import ortspec
from ortspec.cli import main
from ortspec.cli.bench import BENCH_OPTIONS
from ortspec.runtime.errors import ChatTemplateError
from ortspec.runtime.options import GenerationConfig
from ortspec.runtime.speculation.sampling import SamplingConfig
from ortspec.runtime.text.chat import render_chat
from ortspec.runtime.text.sandbox import Budget


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def api_error(**options) -> str:
    with pytest.raises(ValueError) as caught:
        GenerationConfig(**options)
    return str(caught.value)


@pytest.fixture(scope="module")
def pipe(package):
    return ortspec.load(package("llama", draft="close"))


@pytest.fixture
def templated(package, tmp_path):
    """templated(chat_template) -> a copy of a small package that brings this chat template."""

    def make(template: str):
        root = tmp_path / "templated"
        shutil.copytree(package("llama", draft=None), root)
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["tokenizer"]["chat_template"] = template
        (root / "manifest.json").write_text(json.dumps(manifest))
        return root

    return make


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty", "top_p", "min_p", "draft_min_prob"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(pipe, package, name, value):
    message = f"{name} must be a finite number, got {value}"
    with pytest.raises(ValueError, match=message):
        pipe.generate([5, 6], max_new_tokens=2, **{name: value})
    if name in ("temperature", "repetition_penalty", "top_p", "min_p"):
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**{name: value})
    flag = "--" + name.replace("_", "-")
    result = run("generate", package("llama", draft="close"), "x", "--max-new-tokens", "2", flag, str(value))
    assert result.exit_code == 2 and message in result.output


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    """1e-320 is finite and allowed: it must behave as the limit (greedy), not overflow to inf - inf."""
    from ortspec.runtime.speculation.sampling import probabilities

    logits = np.array([1.0, 3.0, 2.0, -5.0])
    for temperature in (1e-320, 1e-30):
        probs = probabilities(logits, SamplingConfig(temperature=temperature))
        assert np.array_equal(probs, [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(
        probabilities(logits, SamplingConfig(temperature=0.7)), np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_new_tokens=1.5), "max_new_tokens must be an integer, got 1.5"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),
        (dict(draft_tokens=2.5), "draft_tokens must be a positive integer, 'adaptive' or 'auto', got 2.5"),
        (dict(draft_tokens="lots"), "draft_tokens must be a positive integer, 'adaptive' or 'auto', got 'lots'"),
        (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
        (dict(temperature="0.7"), "temperature must be a number, got '0.7'"),
        (dict(use_draft="no"), "use_draft must be True or False, got 'no'"),
        (dict(draft="big"), "draft must be one of model, hybrid, ngram, suffix, got 'big'"),
        (dict(seed=-1), "seed must be at least 0, got -1"),
        (dict(seed=1.5), "seed must be an integer, got 1.5"),
        (dict(stop=None), "stop must be a string or a list of strings, got None"),
        (dict(stop=[1]), "stop must be a string or a list of strings, got 1 in it"),
        (dict(stop=b"\n"), "stop must be a string or a list of strings, got b'\\n'"),
        (dict(stop="a\ud800"), "stop is not valid Unicode text"),
        (dict(temprature=0.7), "unknown generation option 'temprature'"),
    ],
)
def test_wrong_option_types_are_refused_naming_the_field(pipe, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pipe.generate([5, 6], **{"max_new_tokens": 2, **options})


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([5.0, 6], "prompt token ids must be integers, got 5.0 at position 0"),
        ([5, "6"], "prompt token ids must be integers, got '6' at position 1"),
        ([True], "prompt token ids must be integers, got True at position 0"),
        (b"\x05\x06", "the prompt must be text or a sequence of token ids, got bytes"),
        (None, "the prompt must be text or a sequence of token ids, got NoneType"),
        ("caf\udce9", "the prompt is not valid Unicode text: it holds the lone surrogate '\\udce9' at character 3"),
    ],
)
def test_wrong_prompts_are_refused(pipe, prompt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pipe.generate(prompt, max_new_tokens=2)


def test_cli_bad_stop_escape_and_undecodable_prompt_are_errors_not_tracebacks(package):
    root = package("llama", draft="close")
    bad_escape = run("generate", root, "x", "--stop", "\\x")
    assert bad_escape.exit_code == 2
    assert "Invalid value for '--stop': '\\\\x' holds an invalid escape" in bad_escape.output
    # bytes that are not UTF-8 in argv reach Python as lone surrogates
    surrogate = run("generate", root, "caf\udce9", "--max-new-tokens", "2")
    assert surrogate.exit_code == 1 and "Error: the prompt is not valid Unicode text" in surrogate.output
    assert run("generate", root, "x", "--stop", "\\n\\t", "--max-new-tokens", "2").exit_code == 0


def test_stream_checks_everything_before_returning(pipe):
    for options in (dict(seed=-1), dict(seed="1"), dict(temperature=math.nan), dict(stop=[None])):
        with pytest.raises(ValueError):
            pipe.stream([5, 6], max_new_tokens=2, **options)  # not at the first iteration


def test_chat_messages_must_be_dicts_of_strings(templated):
    pipe = ortspec.load(templated("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}"))
    hi = [{"role": "user", "content": "hi"}]
    assert pipe.chat_prompt(hi) == pipe.tokenizer.encode("user: hi\n", add_special_tokens=False)
    for messages, message in [
        ([{"role": "user", "content": 5}], "message 0's content must be a string, got 5"),
        ([{"role": "user", "content": "a"}, {"role": None, "content": "b"}], "message 1's role must be a string"),
        ([{"role": "user", "content": "caf\udce9"}], "message 0's content is not valid Unicode text"),
        ([("user", "hi")], "message 0 needs a 'role' and a 'content'"),
        ("hi", "messages must be a list of"),
    ]:
        with pytest.raises(ChatTemplateError, match=message):
            pipe.chat(messages, max_new_tokens=2)


HOSTILE_TEMPLATES = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a list": "{% set xs = range(100000)|list %}{% for a in xs %}{% for b in xs %}{% endfor %}"
    "{% endfor %}",
    "10 GB output": "{% for a in range(100000) %}{% for b in range(100000) %}{{ 'x' ~ 'y' * 1000 }}{% endfor %}"
    "{% endfor %}",
    "10 GB in a macro": "{% macro m() %}{% for a in range(100000) %}{% for b in range(100000) %}0123456789"
    "{% endfor %}{% endfor %}{% endmacro %}{{ m()|length }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "repetition": "{{ 'x' * 10000000000 }}",
    "width": "{{ ''|center(10000000000) }}",
    "format width": "{{ '%9999999999d' % 1 }}",
    "replacement": "{{ ('x' * 100000)|replace('x', 'x' * 100000) }}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_hostile_chat_templates_are_stopped(template):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="the chat template"):
        render_chat(template, [{"role": "user", "content": "hi"}], {}, budget=Budget(max_seconds=0.3))
    assert time.perf_counter() - start < 3


def test_a_packages_hostile_chat_template_is_a_one_line_error(templated):
    root = templated(HOSTILE_TEMPLATES["10 GB output"])
    with pytest.raises(ChatTemplateError, match="the chat template built an output of over 4000000 characters"):
        ortspec.load(root).chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    result = run("chat", root, input="hi\n")
    assert result.exit_code == 1 and "Error: the chat template built an output" in result.output


def test_bounded_rendering_renders_what_jinja_renders():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = (
        "{%- set ns = namespace(n=0) -%}{%- for m in messages if m.role != 'tool' %}"
        "{%- if loop.first %}[{{ loop.length }}]{% endif %}{{ '<' + m['role'] + '>' ~ m.content|replace('\\n', ' ') }}"
        "{%- set ns.n = ns.n + 1 %}{% if loop.last %}({{ loop.index }}/{{ ns.n }}){% endif %}{% else %}none"
        "{%- endfor %}{{ messages|map(attribute='content')|join(' | ') }}{{ '%s-%d' % ('x', 3) }}"
        "{{ '{}:{}'.format('a', 1) }}{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ 'x'|center(5) }}{{ range(3)|list }}"
        "{%- for item in [{'name': 'a', 'children': [{'name': 'b', 'children': []}]}] recursive %}"
        "{{ item.name }}{{ loop(item.children) }}{% endfor %}{% set block %}{% for c in 'ab' %}{{ c|upper }}"
        "{% endfor %}{% endset %}{{ block }}{% filter upper %}done{% endfilter %}{% if add_generation_prompt %}"
        "{{ bos_token }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "def f():\n  pass"},
        {"role": "tool", "content": "x"},
        {"role": "assistant", "content": "Ünï 日本"},
    ]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    expected = plain.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>")
    assert render_chat(template, messages, {"bos_token": "<s>"}) == expected


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("max_new_tokens", "0", 0),
        ("max_new_tokens", "1.5", 1.5),
        ("draft_tokens", "0", 0),
        ("draft_tokens_max", "x", "x"),
        ("draft_min_prob", "1", 1),
        ("draft_min_prob", "nan", math.nan),
        ("max_ngram_size", "0", 0),
        ("temperature", "-1", -1),
        ("top_k", "-1", -1),
        ("top_p", "0", 0),
        ("min_p", "1", 1),
        ("repetition_penalty", "0", 0),
        ("seed", "-1", -1),
        ("draft", "big", "big"),
    ],
)
def test_every_command_checks_generation_options_like_the_api(package, tmp_path, name, text, value):
    """One table, one check: each command that takes an option refuses what the API refuses, in its words."""
    message = api_error(**{name: value})
    flag = "--" + name.replace("_", "-")
    root = package("llama", draft="close")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\n")
    commands = {"generate": [root, "x"], "chat": [root]}
    if name in BENCH_OPTIONS:
        commands["bench"] = [root, "--prompts", prompts]
    if name in ("max_new_tokens", "draft_tokens"):
        commands["demo"] = []
    for command, args in commands.items():
        result = run(command, *args, flag, text)
        assert result.exit_code == 2 and f"Invalid value for '{flag}': {message}" in result.output, (command, result)
