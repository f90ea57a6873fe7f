"""The HTTP server on 127.0.0.1: keys, limits, the bounded queue, timeouts, streaming and a graceful
stop. Where a test needs a request to stay in flight, the batch waits on an event the test sets
(the model still generates it): no test depends on how fast anything runs."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from PIL import Image

from pg_tune.cli import main
from pg_tune.serve.engine import Engine
from pg_tune.serve.requests import Limits
from pg_tune.serve.server import api_key_from, check_exposure, is_loopback
from tests.serve.helpers import chat_body, engine_for, make_app, running, shape_images

KEY = "sk-test-0123456789abcdef"
IMAGE = shape_images(1)[0]
WAIT_S = 120  # every bounded wait below


class Gate:
    """A ``run_batch`` that holds each batch until ``release()``, then generates it for real."""

    def __init__(self, engine):
        self.engine = engine
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, jobs):
        self.entered.set()
        assert self.released.wait(WAIT_S), "the test never released the batch"
        self.engine.run(jobs)

    def release(self):
        self.released.set()


def _post(url, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=WAIT_S, **kwargs)


def _in_thread(fn, *args, **kwargs):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def _wait_until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_health_models_and_the_api_key():
    app = make_app(engine_for("tiny-paligemma2"), api_key=KEY)
    with running(app) as (url, _):
        health = httpx.get(f"{url}/health", timeout=WAIT_S).json()  # no key needed
        assert (
            health["status"] == "ok" and health["auth_required"] is True and health["family"] == "paligemma"
        )
        missing = httpx.get(f"{url}/v1/models", timeout=WAIT_S)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=WAIT_S)
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
        assert "sk-wrong" not in wrong.text and KEY not in wrong.text
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT_S)
        assert [m["id"] for m in models.json()["data"]] == ["test-model"]
        assert _post(url, chat_body(IMAGE, "caption en"), key="sk-wrong").status_code == 401
        other = _post(url, chat_body(IMAGE, "caption en", model="gpt-4o"))
        assert other.status_code == 404 and "'test-model'" in other.json()["error"]["message"]
        ok = _post(url, chat_body(IMAGE, "caption en", model="test-model", max_tokens=4))
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["pg_tune"]["task"] == "caption" and body["pg_tune"]["image_size"] == list(IMAGE.size)
        assert body["usage"]["completion_tokens"] <= 4 < body["usage"]["prompt_tokens"]


def test_prompts_the_family_cannot_take_are_refused_before_queueing():
    engine = engine_for("tiny-paligemma2")
    short = Engine(engine.model, engine.processor, engine.family, max_prompt_tokens=8)
    with running(make_app(short)) as (url, _):
        reserved = _post(url, chat_body(IMAGE, "caption <image> en"), key=None)
        assert reserved.status_code == 400 and "<image>" in reserved.json()["error"]["message"]
        long = _post(url, chat_body(IMAGE, "answer en " + "what " * 20), key=None)
        assert (
            long.status_code == 400
            and "the server's --max-prompt-tokens=8" in long.json()["error"]["message"]
        )
        task = _post(url, chat_body(IMAGE, "caption en", task="count"), key=None)
        assert task.status_code == 400 and "task 'count'" in task.json()["error"]["message"]
    with running(make_app(engine_for("tiny-gemma3"))) as (url, _):
        segment = _post(url, chat_body(IMAGE, "segment the red circle"), key=None)
        assert segment.status_code == 400
        assert "cannot do task refer_segment" in segment.json()["error"]["message"]


def test_body_limit_is_enforced_while_reading():
    app = make_app(engine_for("tiny-paligemma2"), limits=Limits(max_body_bytes=2000, max_tokens=8))
    noise = Image.effect_noise((64, 64), 80).convert("RGB")  # a PNG of ~12 kB
    with running(app) as (url, _):
        declared = _post(url, chat_body(noise, "caption en"), key=None)
        assert declared.status_code == 413 and "2,000-byte limit" in declared.json()["error"]["message"]
        payload = json.dumps(chat_body(noise, "caption en")).encode()
        chunks = (payload[i : i + 500] for i in range(0, len(payload), 500))  # no Content-Length: chunked
        chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks, timeout=WAIT_S)
        assert chunked.status_code == 413


def test_a_full_queue_answers_429_and_the_held_requests_still_finish():
    engine = engine_for("tiny-paligemma2")
    gate = Gate(engine)
    app = make_app(engine, run_batch=gate, max_batch=1, max_queue=1)
    with running(app) as (url, _):
        body = chat_body(IMAGE, "caption en", max_tokens=4)
        first, first_result = _in_thread(_post, url, body, None)
        assert gate.entered.wait(WAIT_S)  # the first request is generating (held)
        second, second_result = _in_thread(_post, url, body, None)
        _wait_until(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1, "the second request to queue")
        busy = _post(url, body, key=None)
        assert busy.status_code == 429 and "1 request(s) already waiting" in busy.json()["error"]["message"]
        gate.release()
        first.join(WAIT_S)
        second.join(WAIT_S)
        assert first_result["value"].status_code == second_result["value"].status_code == 200
        assert first_result["value"].json()["choices"] == second_result["value"].json()["choices"]


def test_a_request_past_its_timeout_gets_504_and_is_not_generated():
    engine = engine_for("tiny-paligemma2")
    gate = Gate(engine)
    app = make_app(engine, run_batch=gate, max_batch=1, timeout=0.5)
    with running(app) as (url, _):
        body = chat_body(IMAGE, "caption en", max_tokens=4)
        held, held_result = _in_thread(_post, url, body, None)
        assert gate.entered.wait(WAIT_S)
        queued = _post(url, body, key=None)  # waits behind the held batch past its timeout
        assert queued.status_code == 504 and "--request-timeout of 0.5 s" in queued.json()["error"]["message"]
        held.join(WAIT_S)
        assert held_result["value"].status_code == 504
        gate.release()
        batcher = app.state.serve.batcher
        _wait_until(lambda: batcher.running == 0 and batcher.waiting == 0, "the batcher to drain")
        assert dict(batcher.batch_sizes) == {1: 1}  # the queued, timed-out request was never generated


def test_streaming_sends_chunks_then_the_objects_and_done():
    with running(make_app(engine_for("tiny-paligemma2"))) as (url, _):
        body = chat_body(
            IMAGE, "detect circle", max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=WAIT_S) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
        assert final["pg_tune"]["task"] == "detect" and chunks[-1]["usage"]["completion_tokens"] <= 10
        plain = _post(url, chat_body(IMAGE, "detect circle", max_tokens=10), key=None).json()
        assert text == plain["choices"][0]["message"]["content"]
        assert final["pg_tune"]["objects"] == plain["pg_tune"]["objects"]


def test_sigterm_finishes_the_request_in_flight_then_stops_listening():
    engine = engine_for("tiny-paligemma2")
    gate = Gate(engine)
    app = make_app(engine, run_batch=gate)
    with running(app) as (url, server):
        body = chat_body(IMAGE, "caption en", max_tokens=4)
        held, held_result = _in_thread(_post, url, body, None)
        assert gate.entered.wait(WAIT_S)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert app.state.serve.draining

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health", timeout=5)
            except httpx.ConnectError:
                return True
            return False

        _wait_until(refused, "the listening socket to close")
        assert held.is_alive(), "the request in flight was answered before the batch was released"
        gate.release()
        held.join(WAIT_S)
        answer = held_result["value"]
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )


def test_nothing_listens_beyond_loopback_without_a_key(monkeypatch, capsys):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
    for host in ("0.0.0.0", "::", "10.0.0.3", "my-host"):
        with pytest.raises(ValueError, match=f"--host {host} is reachable from other machines"):
            check_exposure(host, None)
        check_exposure(host, KEY)
    check_exposure("127.0.0.1", None)
    monkeypatch.delenv("PG_TUNE_API_KEY", raising=False)
    assert api_key_from(None) is None
    monkeypatch.setenv("PG_TUNE_API_KEY", KEY)
    assert api_key_from(None) == KEY and api_key_from("other") == "other"
    monkeypatch.setenv("PG_TUNE_API_KEY", "  ")
    with pytest.raises(ValueError, match="the API key is empty"):
        api_key_from(None)
    # The command refuses before loading anything.
    monkeypatch.delenv("PG_TUNE_API_KEY")
    monkeypatch.setattr("pg_tune.models.family.load_family", lambda *a: pytest.fail("loaded a model"))
    assert main(["serve", "tiny-paligemma2", "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 is reachable from other machines: set an API key" in capsys.readouterr().err


def test_while_draining_new_requests_get_503():
    """After SIGTERM, a request arriving on a connection still open is refused, not queued."""
    import asyncio

    app = make_app(engine_for("tiny-paligemma2"))
    app.state.serve.draining = True

    async def post():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://serve"
        ) as client:
            return await client.post("/v1/chat/completions", json=chat_body(IMAGE, "caption en"))

    refused = asyncio.run(post())
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert app.state.serve.batcher.waiting == 0
