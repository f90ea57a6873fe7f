"""Helpers of the serve tests: images and request bodies, tiny engines, and servers: in this process (uvicorn on a thread) or ``pg-tune serve`` as a
subprocess, always bound to 127.0.0.1 on a free port, every wait bounded."""

from __future__ import annotations

import base64
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from pg_tune.data.formats.shapes import draw_shape
from pg_tune.models.family import load_family
from pg_tune.serve.app import ServeSettings, build_app
from pg_tune.serve.batcher import Batcher
from pg_tune.serve.engine import Engine
from pg_tune.serve.images import ImagePolicy
from pg_tune.serve.requests import Limits
from pg_tune.serve.server import bound_socket, make_server

FAMILY_PRESETS = ("tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2")
"""One tiny preset of every registered family."""
REPO = Path(__file__).resolve().parents[2]


def shape_images(count: int, size: int = 112, seed: int = 5) -> list[Image.Image]:
    rng = random.Random(seed)
    return [draw_shape(rng, size)[0] for _ in range(count)]


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(image: Image.Image, prompt: str, **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": prompt}]
    return {"messages": [{"role": "user", "content": content}], **fields}


_ENGINES: dict[str, Engine] = {}


def engine_for(preset: str) -> Engine:
    """An engine on a tiny preset whose LM head is replaced by its own random matrix (seeded).

    A random model with a tied head repeats the prompt's last token ("\\n") whatever the image, so
    batched and single answers would agree trivially; with an untied random head the answer depends
    on the image and the prompt."""
    if preset not in _ENGINES:
        family = load_family(preset)
        tiny = family.tiny_module
        model = tiny.build_base(preset)
        head = model.lm_head
        generator = torch.Generator().manual_seed(0)
        scale = head.weight.detach().std().item()
        head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator) * scale)
        processor = tiny.build_processor(tiny.PRESETS[preset])
        _ENGINES[preset] = Engine(model.eval(), processor, family, max_prompt_tokens=64)
    return _ENGINES[preset]


def save_engine_model(preset: str, out_dir: Path) -> Path:
    """``engine_for(preset)``'s model (its own head untied) saved as a model folder, as an export is."""
    from pg_tune.models.tiny import write_checkpoint

    engine = engine_for(preset)
    engine.model.config.tie_word_embeddings = False
    engine.model.config.get_text_config().tie_word_embeddings = False
    return write_checkpoint(engine.model, engine.processor, out_dir)


def make_app(
    engine: Engine, *, run_batch=None, api_key=None, limits=None, images=None, timeout=120.0, **batching
):
    """The app ``pg-tune serve`` builds, on ``engine`` (``run_batch`` may wrap ``engine.run``)."""
    batcher = Batcher(
        run_batch or engine.run, **{"max_batch": 8, "max_wait_s": 0.005, "max_queue": 64, **batching}
    )
    settings = ServeSettings(
        "test-model", limits or Limits(max_tokens=32), images or ImagePolicy(), api_key, timeout
    )
    return build_app(engine, batcher, settings)


@contextmanager
def running(app, timeout_s: float = 120.0) -> Iterator[tuple[str, object]]:
    """uvicorn serving ``app`` on a thread, on 127.0.0.1 and a free port; yields (base URL, server)."""
    sock = bound_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, request_timeout_s=app.state.serve.settings.request_timeout_s,
                         log_level="warning")  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
    assert not thread.is_alive(), "the server thread did not stop"


class ServeProcess:
    """``pg-tune serve ARGS --port 0`` in a subprocess; its URL read from what it prints."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_timeout_s: float = 300.0):
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pg_tune_serve_{os.getpid()}_{id(self)}.log"
        self.log = self.log_path.open("w+")
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pg_tune", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + start_timeout_s
        self.url = None
        while time.monotonic() < deadline:
            text = self.output()
            found = re.search(r"at (http://127\.0\.0\.1:\d+)\n", text)
            if found and "Application startup complete" in text:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if self.url is None:
            self.stop()
            raise AssertionError(f"pg-tune serve did not start:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout_s: float = 120.0) -> int:
        """SIGTERM it (by its own pid) and wait for it to exit; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
