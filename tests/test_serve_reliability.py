"""The server under load, hostile input and misbehaving clients (127.0.0.1 only, a few seconds each).
The figures are in docs/benchmarks.md ("Serving: reliability"); benchmarks/serve_soak.py is the long run."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from ortspec.serve import ServeSettings, create_app, load_pipelines

from helpers.serving import PROMPTS, Slowed, client_for, running
from helpers.waiting import wait_until

IDLE = {"status": "ok", "slots": 1, "busy": 0, "waiting": 0}
HEADERS = (
    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
)


@pytest.fixture(scope="module")
def pipes(chat_package):
    return load_pipelines(chat_package, 2)


def ask(client: Any, prompt: str, mode: int) -> str:
    """One greedy request, in one of four modes: completion or chat, streamed or not."""
    chat, stream = divmod(mode, 2)
    if chat:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8, stream=bool(stream)
        )
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in reply)
        return reply.choices[0].message.content
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=bool(stream))
    return "".join(chunk.choices[0].text for chunk in reply) if stream else reply.choices[0].text


def test_load_16_clients_x_20_requests(pipes):
    """All succeed, and each greedy output is the one the same request gets alone. γ is fixed: auto γ
    chooses from timings, which vary from run to run, and a near-tie could then flip a token legitimately."""
    cases = [(prompt, mode) for prompt in PROMPTS for mode in range(4)]
    with running(pipes, defaults={"draft_tokens": 2}) as url:
        client = client_for(url)
        alone = {case: ask(client, *case) for case in cases}

        def one_client(number: int) -> list[tuple[tuple[str, int], str]]:
            own = client_for(url)
            picks = [cases[(number * 7 + i) % len(cases)] for i in range(20)]
            return [(case, ask(own, *case)) for case in picks]

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = [answer for batch in pool.map(one_client, range(16)) for answer in batch]
        seconds = time.monotonic() - started
        assert len(answers) == 320
        assert [text for case, text in answers] == [alone[case] for case, _ in answers]
        assert httpx.get(f"{url}/health").json() == {**IDLE, "slots": 2}
    print(f"load: 320 requests from 16 clients in {seconds:.1f} s")


def hostile_requests(rng: random.Random, count: int) -> list[tuple[str, str, dict[str, str], bytes]]:
    """`count` (method, path, headers, body) requests that must each be refused with a 4xx."""
    json_type = {"content-type": "application/json"}
    bad_values = {
        "temperature": [-1, 2.5, "0.5", "NaN", True, [], {}, 1e308, -1e-320],
        "top_p": [0, -0.1, 1.5, "1", [0.5]],
        "max_tokens": [0, -5, 1.5, "10", 10**30, True, [8]],
        "stop": [5, [1, 2], ["a"] * 5, {"a": 1}, [None]],
        "seed": [-1, 2**64, 1.5, "1", [1]],
        "n": [2, 0, "1", 1.5],
        "stream": ["yes", 1, {}],
        "model": [5, "other-model", [], {"id": "tiny"}],
        "top_k": [-1, 1.5, "3"],
        "min_p": [1, -0.1, "0"],
        "repetition_penalty": [0, -1, "1"],
        "draft": ["magic", 3, True],
        "draft_tokens": [0, "lots", -2, 2.5],
        "logprobs": [True, 5],
        "tools": [[{"type": "function"}]],
        "presence_penalty": [1, -2],
        "stream_options": ["x", {"include_usage": "yes"}],
    }
    bad_prompts = [None, 5, {}, [], [[]], [-1], [10**9], [1.5], ["a", "b"], [True], [[1], [2]], "", [""]]
    bad_messages = [
        None,
        "hi",
        [],
        [{}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"content": "no role"}],
        [["user", "hi"]],
    ]
    requests = []
    for _ in range(count):
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        valid: dict[str, Any] = {"model": "tiny", "max_tokens": 4}
        valid.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "def f(x):"})
        kind = rng.randrange(8)
        if kind <= 2:  # one to three fields with bad values
            body = dict(valid)
            for field in rng.sample(sorted(bad_values), rng.randint(1, 3)):
                body[field] = rng.choice(bad_values[field])
            raw = json.dumps(body).encode()
        elif kind == 3:  # a bad prompt or messages, or none at all
            body = dict(valid)
            key = "messages" if chat else "prompt"
            if rng.random() < 0.2:
                del body[key]
            else:
                body[key] = rng.choice(bad_messages if chat else bad_prompts)
            raw = json.dumps(body).encode()
        elif kind == 4:  # not JSON, or JSON that is not an object
            raw = rng.choice(
                [
                    bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
                    b'{"prompt": "\xff\xfe\xfd"}',  # invalid UTF-8
                    b'{"prompt": "x", "max_tokens": 4',  # truncated
                    b'{"prompt": "x", "temperature": NaN}',
                    b'{"prompt": "x", "temperature": Infinity}',
                    b'{"prompt": "x", "top_p": 1e999}',
                    b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}",  # past Python's int digit limit
                    b'{"prompt": "\\ud800 lone surrogate"}',
                    b"[" * 100_000 + b"]" * 100_000,
                    b"[1, 2, 3]",
                    b'"just a string"',
                    b"null",
                    b"",
                ]
            )
        elif kind == 5:  # a wrong content type
            raw = json.dumps(valid).encode()
            content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
            requests.append(("POST", path, {"content-type": content_type} if content_type else {}, raw))
            continue
        elif kind == 6:  # a body over the limit
            raw = json.dumps({**valid, "prompt": "x" * 70_000}).encode()
        else:  # a wrong method or path
            method, path = rng.choice([("GET", path), ("PUT", path), ("POST", "/v1/nothing"), ("DELETE", "/v1/models")])
            requests.append((method, path, json_type, json.dumps(valid).encode()))
            continue
        requests.append(("POST", path, json_type, raw))
    return requests


def test_fuzz_500_hostile_requests_are_all_4xx(pipes):
    requests = hostile_requests(random.Random(0), 500)
    statuses: dict[int, int] = {}
    with running(pipes[:1], max_body_bytes=64 * 1024) as url, httpx.Client(base_url=url, timeout=30) as http:
        for method, path, headers, body in requests:
            response = http.request(method, path, headers=headers, content=body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert 400 <= response.status_code < 500, (method, path, body[:200], response.text[:300])
            assert response.json()["error"]["message"], response.text[:300]
        assert http.get("/health").json() == IDLE
        reply = client_for(url).completions.create(model="tiny", prompt="def f(x):", max_tokens=4)
        assert reply.usage.completion_tokens == 4
    print(f"fuzz: 500 requests, statuses {dict(sorted(statuses.items()))}")
    assert len(statuses) >= 5  # 400, 404, 405, 413, 415 at least: the cases are varied


def test_extreme_but_valid_values_are_never_5xx(pipes):
    """Values at the edges of their ranges are served (or refused with a 4xx), never a server error."""
    extremes = [
        {"temperature": 2, "top_k": 10**30, "seed": 2**64 - 1},
        {"temperature": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e300},
        {"temperature": 1.0, "min_p": 0.999999, "top_p": 1e-300},
        {"stop": ["", "\x00", "\U0010ffff"]},
        {"max_tokens": 10**30},
    ]
    with running(pipes[:1]) as url, httpx.Client(base_url=url, timeout=30) as http:
        for extreme in extremes:
            body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 8, **extreme}
            response = http.post("/v1/completions", json=body)
            assert response.status_code in (200, 400), (extreme, response.text[:300])
        assert http.get("/health").json() == IDLE


def test_disconnects_free_their_slot(pipes):
    """Clients that leave mid-stream, while waiting for a non-streamed answer, or while queued: each
    generation stops early and its slot serves the next request at once."""
    slowed = Slowed(pipes[0], delay=0.05)  # a full answer would take ~5 s
    hold = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 100, "draft": "none"}
    freed_after = []  # seconds from a client's leaving to its slot being free

    def until_idle() -> None:
        left = time.monotonic()
        assert wait_until(lambda: http.get("/health").json() == IDLE, timeout=10)
        freed_after.append(time.monotonic() - left)

    with running([slowed]) as url, httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(5):
            with (
                httpx.Client(base_url=url) as leaving,
                leaving.stream("POST", "/v1/completions", json={**hold, "stream": True}) as stream,
            ):
                next(stream.iter_bytes())  # the first chunk, then gone
            until_idle()
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=hold, timeout=0.3)
            until_idle()
        assert (slowed.closed_early, slowed.finished) == (8, 0)
        print(f"faults: 8 clients left mid-generation, slots free after {max(freed_after) * 1000:.0f} ms at most")
        with (
            httpx.Client(base_url=url) as holder,
            holder.stream("POST", "/v1/completions", json={**hold, "stream": True}),
        ):
            for _ in range(3):  # queued behind the holder, then gone
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/v1/completions", json=hold, timeout=0.3)
            assert wait_until(lambda: http.get("/health").json()["waiting"] == 0, timeout=10)
        assert wait_until(lambda: http.get("/health").json() == IDLE, timeout=10)
        assert (slowed.closed_early, slowed.finished) == (9, 0)  # the queued ones never started
        started = time.monotonic()
        reply = client_for(url).completions.create(model="tiny", prompt="x", max_tokens=3)
        assert reply.usage.completion_tokens == 3 and time.monotonic() - started < 2
        # a client that leaves halfway through sending its body takes no slot either
        with socket.create_connection(("127.0.0.1", httpx.URL(url).port)) as half:
            half.sendall(HEADERS.format(length=1000).encode() + b'{"model": "tiny", "prompt": "de')
        assert wait_until(lambda: http.get("/health").json() == IDLE, timeout=10)
        assert client_for(url).completions.create(model="tiny", prompt="x", max_tokens=3).usage.completion_tokens == 3


def test_slow_readers_hold_no_slot(pipes):
    """Readers that do not read (over real sockets): their generations end and free the slot, other clients
    are served meanwhile, and the readers get their whole answers when they read at last. (These answers
    fit the socket buffers; the next test makes the backpressure real.)"""
    with running(pipes[:1]) as url, httpx.Client(base_url=url, timeout=30) as http:
        expected = client_for(url).completions.create(model="tiny", prompt="import os", max_tokens=150)
        body = json.dumps({"model": "tiny", "prompt": "import os", "max_tokens": 150, "stream": True}).encode()
        host, port = "127.0.0.1", httpx.URL(url).port
        readers = []
        for _ in range(4):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            reader.connect((host, port))
            reader.sendall(HEADERS.format(length=len(body)).encode() + body)
            readers.append(reader)
        assert wait_until(lambda: http.get("/health").json() == IDLE, timeout=10)  # nothing read yet
        started = time.monotonic()
        for prompt in PROMPTS:
            assert client_for(url).completions.create(model="tiny", prompt=prompt, max_tokens=8).choices[0].text
        assert time.monotonic() - started < 5
        for reader in readers:
            raw = b""
            while not raw.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
                raw += reader.recv(65536)
            reader.close()
            events = [event[6:] for event in _dechunk(raw.split(b"\r\n\r\n", 1)[1]).split(b"\n\n") if event]
            assert events[-1] == b"[DONE]"
            text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
            assert text == expected.choices[0].text


def _dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    payload = b""
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return payload
        payload, body = payload + body[:size], body[size + 2 :]


def test_a_stalled_reader_frees_its_slot_once_generated(pipes):
    """Under real backpressure (the ASGI send never returns until the reader reads), the generation still
    runs to its end and frees the slot: deltas queue up for the reader, they do not hold the slot."""
    app = create_app(pipes[:1], ServeSettings(model="tiny"))
    slots = app.state.slots
    body = json.dumps({"model": "tiny", "prompt": "import os", "max_tokens": 60, "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def scenario() -> list[bytes]:
        reads = asyncio.Event()
        chunks: list[bytes] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays connected and silent
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message["body"])
                await reads.wait()  # the reader reads nothing until told

        served = asyncio.ensure_future(app(scope, receive, send))
        deadline = time.monotonic() + 10
        while slots.busy or len(chunks) == 0:
            assert not served.done() and time.monotonic() < deadline, "the slot stayed busy"
            await asyncio.sleep(0.01)
        assert len(chunks) == 1  # one chunk sent and stuck, the slot already free
        reads.set()
        await asyncio.wait_for(served, 10)
        return chunks

    chunks = asyncio.run(scenario())
    assert chunks[-2:] == [b"data: [DONE]\n\n", b""]
