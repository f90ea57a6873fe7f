"""Dynamic batching: requests that arrive together are generated as one batch, on one worker thread.

The HTTP side ``submit``s a ``Job`` (refused with ``QueueFull`` when ``max_queue`` jobs already wait:
the server answers 429) and awaits its events. The worker takes the first waiting job, then every
job that arrives within ``max_wait_s`` of it, up to ``max_batch``, and hands them to ``run_batch``
(``Engine.run``) in one call; jobs that arrived while a batch was generating are taken at once.
Left-padded greedy generation gives each row exactly what it gives alone (``tests/serve``), so
batching changes only when answers come, not what they say.

A job's events flow from the worker thread to the request's event loop: ``("delta", text)`` while
streaming, then one ``("done", Completion)`` or ``("error", exception)``. A cancelled job (timed
out, client gone) is skipped if it has not started and stopped at its next token if it has.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from pg_tune.data.sample import Sample
from pg_tune.serve.requests import ChatRequest


class QueueFull(Exception):
    """``max_queue`` jobs are already waiting."""


class Job:
    """One request on its way through the batcher."""

    def __init__(self, request: ChatRequest, sample: Sample, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.sample = sample
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self.submitted = time.monotonic()

    def emit(self, kind: str, payload: Any) -> None:
        """Send an event to the request's loop (safe from the worker thread)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


_STOP = object()


class Batcher:
    """A bounded queue of jobs and the one thread that generates them in batches."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Job]], None],
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"{max_batch=} and {max_queue=} must be >= 1, {max_wait_s=} >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.batch_sizes: Counter[int] = Counter()
        """How many batches of each size ran (``/health``, the batching tests)."""
        self.running = 0
        """Jobs in the batch being generated now."""

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} request(s) already waiting") from None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="pg_tune-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the worker."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def _next_batch(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _STOP:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            live = [job for job in batch if not job.cancelled]
            if not live:
                continue
            self.batch_sizes[len(live)] += 1
            self.running = len(live)
            try:
                self.run_batch(live)
            except BaseException as e:  # the worker must outlive any batch: fail its jobs, go on
                for job in live:
                    job.emit("error", e)
            finally:
                self.running = 0
