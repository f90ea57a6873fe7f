"""The official ``openai`` client against ``pg-tune serve`` on a tiny model of every family: plain,
streamed, 8 concurrent clients, an oversized image, a bad key, then SIGTERM with a stream in flight."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from tests.serve.helpers import FAMILY_PRESETS, data_url, save_engine_model, shape_images

KEY = "sk-pg-tune-test-6f1d2c9a"
PROMPTS = ("caption en", "detect circle")


def _messages(image: Image.Image, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": prompt},
    ]}]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_openai_client_plain_streamed_concurrent_and_refused(preset, serve_process, tmp_path):
    # A model folder whose answers depend on the image (helpers.engine_for), served as an export is.
    folder = save_engine_model(preset, tmp_path / preset)
    # Each lone request waits out --max-wait-ms (11 of them here); one second still lets the 8
    # concurrent clients below meet in a batch on a loaded machine.
    server = serve_process(
        str(folder), "--served-model-name", preset, "--max-tokens", "12", "--max-image-mb", "0.02",
        "--max-batch", "8", "--max-wait-ms", "1000", env={"PG_TUNE_API_KEY": KEY},
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    images = shape_images(8, seed=9)

    assert [m.id for m in client.models.list().data] == [preset]

    # Plain: the answer, its finish reason, usage and pg_tune's structured field.
    plain = client.chat.completions.create(
        model=preset, messages=_messages(images[0], "detect circle"), max_tokens=10
    )
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 10 and plain.usage.total_tokens > plain.usage.completion_tokens
    extra = plain.model_extra["pg_tune"]
    assert (
        extra["task"] == "detect" and extra["image_size"] == [112, 112] and isinstance(extra["objects"], list)
    )

    # Streamed: the deltas add up to the plain answer; the last chunks carry pg_tune's field and usage.
    stream = client.chat.completions.create(
        model=preset, messages=_messages(images[0], "detect circle"), max_tokens=10, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].model_extra["pg_tune"]["objects"] == extra["objects"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # 8 concurrent clients: each gets what it gets alone, and the server batched them.
    def ask(k: int) -> tuple[str, list]:
        answer = client.chat.completions.create(
            model=preset, messages=_messages(images[k], PROMPTS[k % 2]), max_tokens=8
        )
        return answer.choices[0].message.content, answer.model_extra["pg_tune"]["objects"]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    batches = httpx.get(f"{server.url}/health", timeout=30).json()["batches"]
    alone = [ask(k) for k in range(8)]
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert [[(o["label"], o["box"]) for o in objs] for _, objs in together] == [
        [(o["label"], o["box"]) for o in objs] for _, objs in alone
    ]
    assert max(int(size) for size in batches) > 1, f"no batch held more than one request: {batches}"

    # An image over --max-image-mb: 413, named.
    noise = Image.effect_noise((160, 160), 80).convert("RGB")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=preset, messages=_messages(noise, "caption en"))
    assert err.value.status_code == 413 and "--max-image-mb" in str(err.value)

    # A bad key: 401, and nothing answered.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
            model=preset, messages=_messages(images[0], "caption en")
        )

    # SIGTERM while a stream is in flight: the stream completes, then the process exits by the signal.
    stream = client.chat.completions.create(
        model=preset, messages=_messages(images[1], "caption en"), max_tokens=12, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert server.proc.wait(120) == -signal.SIGTERM
    log = server.output()
    assert "stopping: finishing 1 request(s) in flight" in log and "batcher stopped" in log
    assert KEY not in log, "the API key was logged"
