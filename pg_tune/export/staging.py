"""Where an export writes before its ``--out`` folder exists: ``OUT.partial``, marked and locked.

An export fills ``OUT.partial`` and renames it to ``OUT`` at the end, so a failed or killed export
never leaves a folder that looks complete. pg_tune marks the partial folder as its own with a file
inside it, ``.pg_tune-export``, which is also the export's lock (``pg_tune.train.lock``: an
``fcntl.flock`` that the kernel drops when the process dies):

- a partial folder without the marker is not pg_tune's: it is refused, never removed;
- one whose marker is locked belongs to an export still running: refused, naming its pid;
- one whose marker is not locked was left by a killed export: removed, then written anew.

A full disk while writing becomes one line (``ExportError``) naming the folder and the free
space, whatever raised it (``OSError`` from a plain write, safetensors' or tokenizers' own error
carrying ``os error 28``); the partial folder is removed.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from pg_tune.export.run import ExportError
from pg_tune.train.lock import FolderInUse, hold, holder_of
from pg_tune.train.storage import free_mb, is_disk_full

MARKER = ".pg_tune-export"
"""Inside ``OUT.partial``: says pg_tune made the folder, and is the running export's lock."""


def partial_of(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


class StagedExport:
    """``OUT.partial`` claimed by this process: write into ``path``, then ``finish()`` or ``discard()``."""

    def __init__(self, out_dir: str | Path, command: str = "pg-tune export"):
        self.out_dir = Path(out_dir)
        self.path = partial_of(self.out_dir)
        _check_out(self.out_dir)
        self._lock = contextlib.ExitStack()
        try:
            self._claim(command)
        except OSError as e:
            raise ExportError(f"--out {self.out_dir}: cannot write there ({e.strerror or e})") from None

    def _claim(self, command: str) -> None:
        for _ in range(40):  # another export may be creating the same folder this very moment
            if self.path.exists() or self.path.is_symlink():
                self._remove_stale()
            try:
                self.path.mkdir(parents=True)
            except FileExistsError:
                continue
            try:
                self._lock.enter_context(hold(self.path, command, what="--out", lock_name=MARKER))
            except FolderInUse:  # lost the race to an export that removed and re-made it
                continue
            return
        raise ExportError(f"{self.path}: could not claim it (another export keeps re-creating it)")

    def _remove_stale(self) -> None:
        """Remove ``OUT.partial`` if a killed pg_tune export left it; refuse anything else."""
        marker = self.path / MARKER
        if self.path.is_dir() and not self.path.is_symlink() and not marker.is_file():
            time.sleep(0.05)  # an export that has just made the folder writes its marker next
        if self.path.is_symlink() or not self.path.is_dir() or not marker.is_file():
            raise ExportError(
                f"{self.path} exists and pg_tune did not make it (no {MARKER} inside), so it is not removed; "
                "move it away or choose another --out"
            )
        try:
            with hold(self.path, "pg-tune export (removing a stale partial folder)", lock_name=MARKER):
                shutil.rmtree(self.path)
        except FolderInUse:
            raise ExportError(
                f"--out {self.out_dir} is being written by another export ({holder_of(marker)}); wait for it to "
                "finish or choose another --out"
            ) from None
        print(f"export: removed {self.path}, left by an export that was stopped")

    def finish(self) -> None:
        """Rename ``OUT.partial`` to ``OUT`` (the marker removed first) and release the lock."""
        try:
            (self.path / MARKER).unlink(missing_ok=True)
            self.path.rename(self.out_dir)
        finally:
            self._lock.close()

    def discard(self, error: BaseException | None = None) -> None:
        """Remove ``OUT.partial`` and release the lock; a full disk becomes one ``ExportError`` line."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()
        if error is not None and not isinstance(error, ExportError) and is_disk_full(error):
            raise ExportError(
                f"no space left while writing {self.path} ({free_mb(self.path.parent):.0f} MB free); nothing "
                f"was exported and the partial folder is removed; free some space and export again"
            ) from None


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: is a file, not a folder; choose a new folder for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new --out folder")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--out {out_dir}: {parent} is a file, not a folder")
            break
