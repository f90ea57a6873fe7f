"""``pg-tune serve`` under load: requests/s and p50 / p95 latency, dynamic batching on vs off.

    python -m pg_tune.measure.serve_bench --models tiny-paligemma2,bench-mini --clients 1,4,16

For each model two servers run side by side as ``pg-tune serve`` subprocesses on 127.0.0.1: one
batching (``--max-batch 16``), one not (``--max-batch 1``). At each number of concurrent clients,
every client sends ``--requests`` chat completions one after another (a shapes image, ``caption en``,
greedy, ``max_tokens`` fixed; random weights never write their end token, so every request costs the
same number of decoding steps); the two servers take turns, the order alternating between
repetitions, so background load hits both alike. Latency is measured at the client, from sending the
request to reading the whole answer. The load average of the machine is printed beside each
measurement: on a shared machine read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = {"on": ["--max-batch", "16", "--max-wait-ms", "5"], "off": ["--max-batch", "1"]}


@dataclass
class Measurement:
    model: str
    mode: str
    clients: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_s: float
    p95_s: float
    batches: dict[str, int]
    load_before: float
    load_after: float


class Server:
    """``pg-tune serve MODEL --port 0`` in a subprocess; its URL read from what it prints."""

    def __init__(self, model: str, extra: list[str], start_timeout_s: float = 600.0):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve_bench_", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "pg_tune", "serve", model, "--host", "127.0.0.1", "--port", "0",
                   "--max-queue", "256", "--max-tokens", "64", "--log-level", "warning", *extra]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + start_timeout_s
        self.url = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"at (http://127\.0\.0\.1:\d+)\n", Path(self.log.name).read_text())
            if found and self._healthy(found.group(1)):
                self.url = found.group(1)
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"pg-tune serve {model} did not start:\n{Path(self.log.name).read_text()[-2000:]}")

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            return _get(f"{url}/health", timeout=5) is not None
        except OSError:
            return False

    def batches(self) -> dict[str, int]:
        return _get(f"{self.url}/health", timeout=30)["batches"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def _get(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our own loopback server)
        return json.loads(response.read())


def _post(url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _body(max_tokens: int, size: int = 112) -> dict:
    import random

    from pg_tune.data.formats.shapes import draw_shape

    image = draw_shape(random.Random(0), size)[0]
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "caption en"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def measure(server: Server, model: str, mode: str, clients: int, per_client: int, body: dict) -> Measurement:
    """``clients`` threads, each sending ``per_client`` requests in turn; every latency kept."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    payload = json.dumps(body).encode()

    def client() -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            status, answer = _post(f"{server.url}/v1/chat/completions", payload, timeout=600)
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"{status}: {answer[:200]!r}")

    before = server.batches()
    load_before = os.getloadavg()[0]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    after = server.batches()
    batches = {
        size: count - before.get(size, 0) for size, count in after.items() if count - before.get(size, 0)
    }
    latencies.sort()
    return Measurement(
        model, mode, clients, len(latencies), seconds, len(latencies) / seconds,
        statistics.median(latencies), latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        batches, load_before, os.getloadavg()[0],
    )  # fmt: skip


def run(
    models: list[str], clients: list[int], per_client: int, reps: int, max_tokens: int
) -> list[Measurement]:
    body = _body(max_tokens)
    results = []
    for model in models:
        servers = {mode: Server(model, extra) for mode, extra in MODES.items()}
        try:
            for server in servers.values():  # warm-up: first request builds caches, pages in weights
                measure(server, model, "warm-up", 1, 1, body)
            for count in clients:
                for rep in range(reps):
                    order = list(MODES) if rep % 2 == 0 else list(reversed(MODES))
                    for mode in order:
                        result = measure(servers[mode], model, mode, count, per_client, body)
                        print(_line(result), flush=True)
                        results.append(result)
        finally:
            for server in servers.values():
                server.stop()
    return results


def _line(m: Measurement) -> str:
    return (f"{m.model} batching {m.mode:>3} clients {m.clients:>2}: {m.requests_per_s:6.2f} req/s, "
            f"p50 {m.p50_s:6.2f} s, p95 {m.p95_s:6.2f} s, batches {m.batches}, load {m.load_before:.1f}->{m.load_after:.1f}")  # fmt: skip


def table(results: list[Measurement]) -> str:
    """Markdown: per model and client count, the medians over repetitions and the on/off ratios."""
    rows = ["| model | clients | req/s on / off | ratio | p50 on / off | ratio | p95 on / off | ratio | load |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(m.model, m.clients) for m in results}, key=lambda k: (k[0], k[1]))
    for model, clients in keys:
        got = {
            mode: [m for m in results if (m.model, m.clients, m.mode) == (model, clients, mode)]
            for mode in MODES
        }
        med = {mode: {f: statistics.median(getattr(m, f) for m in ms) for f in ("requests_per_s", "p50_s", "p95_s")}
               for mode, ms in got.items()}  # fmt: skip
        loads = [m.load_before for ms in got.values() for m in ms]
        cells = []
        for field, unit in (("requests_per_s", ""), ("p50_s", " s"), ("p95_s", " s")):
            on, off = med["on"][field], med["off"][field]
            cells += [f"{on:.2f} / {off:.2f}{unit}", f"**{on / off:.2f}x**"]
        rows.append(
            f"| {model} | {clients} | " + " | ".join(cells) + f" | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="tiny-paligemma2,bench-mini",
        help="comma-separated: tiny presets, folders, hub ids",
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument(
        "--requests", type=int, default=2, help="requests each client sends, one after another"
    )
    parser.add_argument("--reps", type=int, default=2, help="repetitions (the on/off order alternates)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens each answer generates")
    parser.add_argument("--out", help="also write the measurements as JSON here")
    args = parser.parse_args(argv)
    results = run(args.models.split(","), [int(c) for c in args.clients.split(",")], args.requests, args.reps,
                  args.max_tokens)  # fmt: skip
    print()
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
