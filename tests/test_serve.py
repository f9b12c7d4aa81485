"""`ortspec serve`: the OpenAI-compatible server, driven with the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import get_args

import httpx
import openai
import pytest
from click.testing import CliRunner

from ortspec.cli import main
from ortspec.runtime.options import DRAFTERS, DrafterKind
from ortspec.serve import load_pipelines
from ortspec.serve.schema import RequestDrafter

from helpers.serving import Slowed, client_for, running
from helpers.waiting import wait_until

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]


@pytest.fixture(scope="module")
def pipes(chat_package):
    return load_pipelines(chat_package, 2)


@pytest.fixture(scope="module")
def server(pipes):
    with running(pipes) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


def test_completion_is_the_pipelines_greedy_output_with_speculative_usage(client, pipes):
    expected = pipes[0].generate("def f(x):", max_new_tokens=12, use_draft=False)
    reply = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.stats.prompt_tokens, 12)
    assert usage.total_tokens == usage.prompt_tokens + 12
    spec = usage.model_extra["speculative"]
    assert spec["drafter"] == "hybrid" and spec["target_calls"] >= 1  # the default with a draft model
    assert spec["accepted_tokens"] <= spec["drafted_tokens"]
    # token ids as the prompt, and the batch form with one prompt
    ids = pipes[0].tokenizer.encode("def f(x):")
    for prompt in (ids, [ids], ["def f(x):"]):
        assert client.completions.create(model="tiny", prompt=prompt, max_tokens=12).choices[0].text == expected.text


def test_streaming_equals_non_streaming(client):
    for chat in (False, True):
        create = client.chat.completions.create if chat else client.completions.create
        request = dict(messages=MESSAGES) if chat else dict(prompt="import os")
        whole = create(model="tiny", max_tokens=20, **request)
        usage = {"include_usage": True}
        chunks = list(create(model="tiny", max_tokens=20, stream=True, stream_options=usage, **request))
        *pieces, last = chunks
        assert last.choices == [] and last.usage.completion_tokens == 20
        if chat:
            assert whole.choices[0].message.role == "assistant"
            assert pieces[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in pieces)
            assert text == whole.choices[0].message.content
        else:
            text = "".join(c.choices[0].text for c in pieces)
            assert text == whole.choices[0].text
        assert pieces[-1].choices[0].finish_reason == "length"
        assert all(c.id == pieces[0].id for c in chunks)
    plain = list(client.completions.create(model="tiny", prompt="import os", max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain)  # usage only when asked for, as OpenAI


def test_chat_uses_the_chat_template(client, pipes):
    expected = pipes[0].chat(MESSAGES, max_new_tokens=16, use_draft=False)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(pipes[0].chat_prompt(MESSAGES))
    # OpenAI's content parts and its newer names (developer, max_completion_tokens) mean the same
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        MESSAGES[1],
    ]
    again = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=16)
    assert again.choices[0].message.content == expected.text


def test_stop_strings(client):
    full = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=40).choices[0].text
    assert len(full) > 20
    stop = full[10:13]
    cut = full[: full.find(stop)]
    reply = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=40, stop=["never-there", stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="def f(x):", max_tokens=40, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        options = dict(model="tiny", prompt="class A:", max_tokens=24, temperature=0.9, top_p=0.95, seed=seed)
        return client.completions.create(**options).choices[0].text

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["slots"] == 2 and health["busy"] == 0


def test_bad_requests_are_openai_errors(client, server):
    def error(call, status):
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert caught.value.status_code == status
        return caught.value.body

    body = error(lambda: client.completions.create(model="tiny", prompt="x", temperature=3), 400)
    assert body["type"] == "invalid_request_error" and body["param"] == "temperature"
    body = error(lambda: client.completions.create(model="gpt-4", prompt="x"), 404)
    assert body["code"] == "model_not_found" and "tiny" in body["message"]
    body = error(lambda: client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=4), 400)
    assert body["code"] == "context_length_exceeded"
    body = error(lambda: client.completions.create(model="tiny", prompt="x " * 600_000), 413)
    assert "larger than" in body["message"]
    body = error(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, n=2), 400)
    assert body["param"] == "n"
    error(lambda: client.completions.create(model="tiny", prompt="x", top_p=0), 400)
    error(lambda: client.completions.create(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"]), 400)
    error(lambda: client.completions.create(model="tiny", prompt=[999_999]), 400)  # outside the vocabulary
    error(lambda: client.chat.completions.create(model="tiny", messages=[]), 400)
    # past the client: other content types, methods and paths
    sent = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert sent.status_code == 415 and sent.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/v1/completions").status_code == 405
    assert httpx.get(f"{server}/v2/anything").json()["error"]["message"] == "Not Found"


def test_requests_name_the_drafters_the_cli_names(client):
    """A request's draft is one of the CLI's --draft choices, or "none": the runtime's DrafterKind names."""
    assert {str(kind) for kind in get_args(RequestDrafter)} == {*DRAFTERS, str(DrafterKind.NONE)}
    reply = client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"draft": "suffix"})
    assert reply.usage.model_extra["speculative"]["drafter"] == "suffix"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"draft": "head"})
    assert caught.value.body["param"] == "draft"
    assert "should be 'model', 'hybrid', 'ngram', 'suffix' or 'none'" in caught.value.body["message"]


def test_chat_without_a_template_is_a_400(package):
    with running(load_pipelines(package("llama", draft=None), 1)) as url:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client_for(url).chat.completions.create(model="tiny", messages=MESSAGES)
        reply = client_for(url).completions.create(model="tiny", prompt="x", max_tokens=3)
        assert reply.usage.model_extra["speculative"]["drafter"] in ("suffix", "none")


# a long generation (one token per round, ~100 deltas): with Slowed(delay=0.05) it holds its slot ~5 s
HOLD = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 100, "draft": "none", "stream": True}
HOLD_OPTIONS = dict(model="tiny", prompt="def f(x):", max_tokens=100, extra_body={"draft": "none"})


def test_full_queue_is_a_429_with_retry_after(pipes):
    assert pipes[0].generate("def f(x):", max_new_tokens=100).stats.finish_reason == "length"
    slowed = Slowed(pipes[0], delay=0.05)
    with running([slowed], max_queue=1) as url, httpx.Client(base_url=url, timeout=30) as http:
        with ThreadPoolExecutor(1) as pool:
            with http.stream("POST", "/v1/completions", json=HOLD) as holding:
                assert holding.status_code == 200
                queued = pool.submit(client_for(url).completions.create, model="tiny", prompt="x", max_tokens=3)
                assert wait_until(lambda: http.get("/health").json()["waiting"] == 1)
                with pytest.raises(openai.RateLimitError) as full:
                    client_for(url).completions.create(model="tiny", prompt="x", max_tokens=3)
                assert int(full.value.response.headers["Retry-After"]) >= 1
                assert full.value.body["code"] == "queue_full"
            # the holder left: its generation stopped early, the queued request got the slot
            started = time.monotonic()
            assert queued.result(timeout=10).choices[0].text is not None
            assert time.monotonic() - started < 2
        assert wait_until(lambda: http.get("/health").json() == _idle(1))
        assert slowed.closed_early == 1


def test_timeouts(pipes):
    slowed = Slowed(pipes[0], delay=0.05)
    with running([slowed], timeout=0.5) as url, httpx.Client(base_url=url, timeout=30) as http:
        with pytest.raises(openai.APIStatusError) as late:  # generating for longer than the timeout
            client_for(url).completions.create(**HOLD_OPTIONS)
        assert late.value.status_code == 504 and late.value.body["code"] == "timeout"
        with http.stream("POST", "/v1/completions", json=HOLD) as streamed:
            lines = [line for line in streamed.iter_lines() if line]
        assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "timeout"
        # a slot is free only once its thread lets go: a round of 2 s holds it past its request's timeout
        assert wait_until(lambda: http.get("/health").json() == _idle(1))  # the generations above have let go
        slowed.delay = 2.0
        with ThreadPoolExecutor(1) as pool:
            holder = pool.submit(http.post, "/v1/completions", json={**HOLD, "stream": False})
            assert wait_until(lambda: http.get("/health").json()["busy"] == 1)
            waited = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
            assert holder.result().status_code == 504
        assert waited.status_code == 503 and int(waited.headers["Retry-After"]) >= 1
        assert waited.json()["error"]["code"] == "timeout"
        assert wait_until(lambda: http.get("/health").json() == _idle(1))
        assert slowed.closed_early == 3 and slowed.finished == 0  # the one that waited never started


def _idle(slots: int) -> dict:
    return {"status": "ok", "slots": slots, "busy": 0, "waiting": 0}


def test_cli_serve_refuses_bad_settings_before_loading(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--draft-tokens", "lots"])
    assert result.exit_code == 1 and "draft_tokens" in result.output


SERVE_SCRIPT = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "optimum"):
            raise ImportError(f"{name} must not be imported by the server")

sys.meta_path.insert(0, Blocker())
from ortspec.cli import main
main(sys.argv[1:])
"""


def test_cli_serve_end_to_end_without_torch(chat_package):
    """`ortspec serve` as a user runs it: a process that never imports torch, transformers or optimum."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", str(chat_package), "--port", str(port), "--parallel", "2", "--model-name", "m", "--max-queue", "3"]
    env = {**os.environ, "ORTSPEC_API_KEY": "x"}  # the key `client_for` sends
    server = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, *args], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(up, timeout=60)
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "slots": 2, "busy": 0, "waiting": 0}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        reply = client_for(url).completions.create(model="m", prompt="def f(x):", max_tokens=5)
        assert reply.usage.completion_tokens == 5
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert "must not be imported" not in errors
    served = f"serving 'm' from {chat_package} on http://127.0.0.1:{port}/v1"
    assert f"{served} (2 slot(s), continuous batching on)" in errors
