"""Fixtures of the serve tests (helpers in ``helpers.py``)."""

from __future__ import annotations

import pytest

from tests.serve.helpers import ServeProcess


@pytest.fixture
def serve_process():
    """Start ``pg-tune serve`` subprocesses; each is killed (by its pid) and its log removed at the end."""
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        started.append(ServeProcess(list(args), env))
        return started[-1]

    yield start
    for process in started:
        process.stop()
        process.log_path.unlink(missing_ok=True)
