"""The guards a public server needs: the API key, the deadline for sending a request, the connection cap,
and /metrics (real uvicorn servers on 127.0.0.1; bounds are generous, never tight timings)."""

from __future__ import annotations

import contextlib
import http.client
import math
import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner

from ortspec.cli import main
from ortspec.serve import ServeSettings, load_pipelines, slots

from helpers.serving import Slowed, client_for, running
from helpers.waiting import wait_until

SLOW_HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
SLOW_BODY = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    b'{"model": "tiny", "prompt": "'
)


@pytest.fixture(scope="module")
def pipes(chat_package):
    return load_pipelines(chat_package, 2)


def test_api_key_guards_every_route_but_health(pipes):
    with running(pipes, api_key="s3cret") as url:
        assert httpx.get(f"{url}/health").status_code == 200  # load balancers' probes carry no key
        for path in ("/v1/models", "/metrics", "/v1/models/tiny", "/nowhere"):
            reply = httpx.get(f"{url}{path}")
            assert reply.status_code == 401, path
            assert reply.json()["error"]["code"] == "invalid_api_key" and reply.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": header}).status_code == 401, header
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            client_for(url).completions.create(model="tiny", prompt="x", max_tokens=2)
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert "s3cret" not in repr(ServeSettings(api_key="s3cret"))
    with pytest.raises(ValueError, match="must not be empty"):
        ServeSettings(api_key=" ")


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (it sends nothing to a client whose request is incomplete)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionError:
        return True


def test_slow_headers_and_bodies_are_closed_while_others_are_served(pipes):
    """12 clients sending headers or a body a byte at a time are cut off past the read deadline (1 s here),
    while a normal client is served: its generation, longer than the deadline, is not cut off."""
    slowed = Slowed(pipes[0], 0.2)  # 10 tokens: ~2 s, twice the deadline
    ask = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 10}
    with running([slowed], read_timeout=1.0) as url, ThreadPoolExecutor(1) as pool:
        port = httpx.URL(url).port
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        for i, sock in enumerate(socks):
            sock.sendall(SLOW_HEADERS if i % 2 else SLOW_BODY)
        with httpx.Client(base_url=url, timeout=30) as http:  # two requests on one keep-alive connection
            served = pool.submit(lambda: [http.post("/v1/completions", json=ask).json() for _ in range(2)])
            started = time.monotonic()
            open_socks = list(socks)
            while open_socks and time.monotonic() - started < 20:
                for sock in open_socks:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")  # one more byte of a header or of the body: the deadline stays
                open_socks = [sock for sock in open_socks if not _closed(sock)]
                time.sleep(0.25)
            for sock in socks:
                sock.close()
            assert not open_socks, f"{len(open_socks)} slow connections still open after 20 s"
            assert [reply["usage"]["completion_tokens"] for reply in served.result(timeout=30)] == [10, 10]
    assert (slowed.finished, slowed.closed_early) == (2, 0)


def test_connections_beyond_the_cap_are_refused_with_a_503(pipes):
    with running(pipes, max_connections=3) as url:
        port = httpx.URL(url).port
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(3)]
        for conn in held:  # each is open (and known to the server) once its request is answered
            conn.request("GET", "/health")
            assert conn.getresponse().read()
        extra = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        extra.request("GET", "/health")
        refused = extra.getresponse()
        assert refused.status == 503 and b"too many open connections" in refused.read()
        held.pop().close()
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=10)
        for conn in held:
            conn.close()


METRIC_LINE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+-]+|NaN)$')


def _scrape(url: str) -> dict[str, float]:
    """/metrics parsed: sample name with its labels -> value (every line checked against the text format)."""
    reply = httpx.get(f"{url}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in reply.text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        match = METRIC_LINE.match(line)
        assert match, line
        samples[line.rsplit(" ", 1)[0]] = float(match.group(4))
    return samples


def test_metrics_count_requests_tokens_and_acceptance(pipes):
    with running(pipes) as url:
        client = client_for(url)
        before = _scrape(url)
        assert before["ortspec_generations_total"] == 0 and math.isnan(before["ortspec_acceptance_rate"])
        assert (before["ortspec_slots"], before["ortspec_slots_busy"], before["ortspec_requests_waiting"]) == (2, 0, 0)
        replies = [client.completions.create(model="tiny", prompt=p, max_tokens=9) for p in ("def f(x):", "import")]
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
        )
        assert list(chat)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", temperature=3)
        after = _scrape(url)
    assert after["ortspec_generations_total"] == 3
    assert after["ortspec_generated_tokens_total"] == 9 + 9 + 5
    assert after['ortspec_requests_total{route="/v1/completions",status="200"}'] == 2
    assert after['ortspec_requests_total{route="/v1/chat/completions",status="200"}'] == 1
    assert after['ortspec_requests_total{route="/v1/completions",status="400"}'] == 1
    assert after['ortspec_requests_total{route="/metrics",status="200"}'] == 1  # the first scrape
    spec = [reply.usage.model_extra["speculative"] for reply in replies]
    drafted = sum(s["drafted_tokens"] for s in spec)
    assert after["ortspec_drafted_tokens_total"] >= drafted  # the streamed chat's drafts come on top
    assert after["ortspec_accepted_tokens_total"] <= after["ortspec_drafted_tokens_total"]
    if after["ortspec_drafted_tokens_total"]:
        alpha = after["ortspec_accepted_tokens_total"] / after["ortspec_drafted_tokens_total"]
        assert after["ortspec_acceptance_rate"] == pytest.approx(alpha)
    seconds = after["ortspec_generation_seconds_total"]
    assert seconds > 0 and after["ortspec_tokens_per_second"] == pytest.approx(23 / seconds, rel=1e-6)
    assert (after["ortspec_slots_busy"], after["ortspec_requests_waiting"]) == (0, 0)


def test_slots_beyond_the_memory_left_are_a_one_line_error(chat_package, monkeypatch):
    """Slots whose KV caches the machine would hold, but not what is left of its memory (numpy raises
    MemoryError): a ValueError naming --parallel's count, not a traceback."""

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.22 GiB for an array")

    monkeypatch.setattr(slots, "load", out_of_memory)
    with pytest.raises(ValueError, match="parallel slots of 5000: out of memory"):
        load_pipelines(chat_package, 5000)


def test_cli_takes_catalog_names_the_key_and_the_bounds(chat_package, monkeypatch):
    """`ortspec serve smollm2` / `ortspec chat smollm2`: the catalog's package (its fetch and export stubbed:
    tests use no network), served as "smollm2"; the key from --api-key or ORTSPEC_API_KEY; bad bounds one line."""
    from ortspec import serve as serve_module
    from ortspec.models import catalog

    monkeypatch.setattr(catalog, "catalog_package", lambda name, report: chat_package)
    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda *args: calls.append(args))
    runner = CliRunner()
    assert runner.invoke(main, ["serve", "smollm2", "--api-key", "k1"]).exit_code == 0
    assert runner.invoke(main, ["serve", "smollm2"], env={"ORTSPEC_API_KEY": "k2"}).exit_code == 0
    assert runner.invoke(main, ["serve", "smollm2"], env={"ORTSPEC_API_KEY": None}).exit_code == 0
    assert [(package, settings.model, settings.api_key) for package, settings, *_ in calls] == [
        (chat_package, "smollm2", "k1"),
        (chat_package, "smollm2", "k2"),
        (chat_package, "smollm2", None),
    ]
    assert (calls[0][1].read_timeout, calls[0][1].max_connections) == (15.0, 128)
    chat = runner.invoke(main, ["chat", "smollm2", "--max-new-tokens", "3"], input="hi\n")
    assert chat.exit_code == 0, chat.output
    unknown = runner.invoke(main, ["chat", "nope"])
    assert unknown.exit_code == 2 and "'nope' is neither a package directory nor a catalog model" in unknown.output
    for bad, says in [
        (["--api-key", " "], "must not be empty"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--max-connections", "0"], "--max-connections"),
        (["--parallel", "0"], "--parallel"),
    ]:
        result = runner.invoke(main, ["serve", "smollm2", *bad])
        assert result.exit_code in (1, 2) and says in result.output and "Traceback" not in result.output, bad
    monkeypatch.undo()  # the real server: --threads is checked before it listens
    result = runner.invoke(main, ["serve", str(chat_package), "--threads", "100000"])
    assert result.exit_code == 1 and "threads must be 1 .." in result.output and len(result.output.splitlines()) == 1


def test_metrics_count_prompt_tokens_reused_from_the_prefix_cache(pipes):
    prompt = "def add(a, b):\n    return a + b\n\n" * 6
    with running(pipes) as url:
        client = client_for(url)
        first = _scrape(url)["ortspec_prompt_cached_tokens_total"]
        for _ in range(2):  # one after the other: the second finds the first's sequence in an idle state
            client.completions.create(model="tiny", prompt=prompt, max_tokens=3)
        after = _scrape(url)
    assert first == 0
    assert after["ortspec_prompt_cached_tokens_total"] >= 16
