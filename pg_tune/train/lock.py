"""One writer per folder: an OS file lock that dies with the process holding it.

Every command that writes into a run folder (``pg-tune train``, ``--resume``, ``--overwrite``,
``pg-tune push --merged``, which exports into ``RUN/merged-*``) holds an exclusive ``fcntl.flock``
on ``<folder>/.pg_tune.lock`` for as long as it writes; an export holds one on the lock file inside
its ``OUT.partial`` folder (``pg_tune.export.staging``). A second writer is refused at once, naming
the holder's pid. The kernel drops the lock when the holder's last file descriptor closes, which a
crash or a ``SIGKILL`` does too, so a killed run never leaves a stale lock behind (the file stays,
unlocked; the next writer takes it over). A pid file could not do that: it outlives a ``SIGKILL``.

Within one process the lock is re-entrant (``pg-tune train`` holds it around ``train()``, the
summary and the Hub push; ``train()`` takes it again for library callers). The descriptor is opened
close-on-exec, so subprocesses started by the holder (``compare``'s runs) do not inherit it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".pg_tune.lock"
"""Inside the folder it guards; never removed (removing it would race with a writer opening it)."""

_held: dict[str, list[int]] = {}
"""Lock files this process holds: real path -> [descriptor, depth]."""


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock; the message names its pid and what it runs."""


def holder_of(lock_path: Path) -> str:
    """What the lock file says about its holder (``pid 1234, pg-tune train``), or ``unknown``."""
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "pid unknown"
    pid, _, command = text.partition(" ")
    return f"pid {pid}" + (f", {command}" if command else "") if pid.isdigit() else "pid unknown"


@contextlib.contextmanager
def hold(
    folder: str | Path, command: str, what: str = "folder", lock_name: str = LOCK_FILE
) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) while the block runs.

    ``command`` is recorded for the message another writer gets (``pg-tune train --resume auto``);
    ``what`` names the folder in it (``output_dir``, ``--out``). Raises ``FolderInUse`` at once when
    another process holds it (no waiting: two writers would mix their files).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    key = os.path.realpath(path)
    if key in _held:  # this process holds it already: re-entrant
        _held[key][1] += 1
        try:
            yield path
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(
            f"{what} {folder} is in use by another pg-tune process ({holder_of(path)}): two writers would "
            "mix their files. Wait for it to finish, or stop it (a stopped or killed process frees the "
            "folder at once)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield path
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def holds(folder: str | Path, lock_name: str = LOCK_FILE) -> bool:
    """True when this process holds ``folder``'s lock."""
    return os.path.realpath(Path(folder) / lock_name) in _held
