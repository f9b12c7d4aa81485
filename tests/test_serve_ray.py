"""The server scaled out on Ray Serve: a local Ray instance, 2 replicas behind Ray's HTTP proxy (slow: Ray
takes ~30 s to start; needs the `ray` extra, which CI installs, and is skipped without it)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from helpers.serving import PROMPTS, client_for
from helpers.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # from ray's own code


@pytest.fixture(scope="module")
def ray_url(chat_package):
    """Ray's proxy on a free port; the replicas want the API key "x" (the one `client_for` sends)."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from ortspec.serve.ray_app import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ORTSPEC_API_KEY", "x")
            app = build({"package": str(chat_package), "replicas": "2", "model": "tiny", "max_queue": "4"})
        serve.run(app, name="ortspec", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_same_api(ray_url):
    from ray import serve

    deployment = serve.status().applications["ortspec"].deployments["ortspec"]
    assert deployment.replica_states.get("RUNNING") == 2
    assert httpx.get(f"{ray_url}/v1/models").status_code == 401 and httpx.get(f"{ray_url}/health").status_code == 200
    client = client_for(ray_url)
    whole = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12)
    assert whole.usage.completion_tokens == 12 and "speculative" in whole.usage.model_extra
    streamed = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=12, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    # many clients at once: every answer is the one the request gets alone (greedy)
    alone = {
        prompt: client.completions.create(model="tiny", prompt=prompt, max_tokens=8).choices[0].text
        for prompt in PROMPTS
    }
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(
                lambda p: client_for(ray_url).completions.create(model="tiny", prompt=p, max_tokens=8).choices[0].text,
                PROMPTS * 4,
            )
        )
    assert texts == [alone[p] for p in PROMPTS * 4]


def test_clients_that_leave_mid_stream_leave_the_replicas_idle(ray_url):
    """(The cancellation itself is shown in test_serve_reliability.py; here, that Ray's proxy passes the
    disconnect on without leaving a replica busy or broken.)"""
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 200, "stream": True, "draft": "none"}
    for _ in range(3):
        with httpx.Client(base_url=ray_url, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_bytes())
    # every replica idle again (the proxy spreads /health over them)
    assert wait_until(lambda: all(httpx.get(f"{ray_url}/health").json()["busy"] == 0 for _ in range(6)), timeout=10)
    assert client_for(ray_url).completions.create(model="tiny", prompt="x", max_tokens=3).usage.completion_tokens == 3
