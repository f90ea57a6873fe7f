"""Writing a run's files safely: the output folder, atomic folders, and a full disk named as such.

- ``check_output_dir``: a run never writes into a folder holding something else. A non-empty
  ``output_dir`` is refused unless the run continues it (``--resume``) or starts it clean
  (``--overwrite``, which removes only what pg_tune writes there and refuses if anything else is in it).
- ``atomic_folder``: a folder (checkpoint, final adapter) is written under a temporary sibling
  name, every file fsynced, then renamed into place; a crash leaves the previous folder intact.
- ``disk_full_guard``: "No space left on device" during a save becomes one ``DiskFullError`` line
  naming the path and the free space, instead of a traceback from deep inside torch or safetensors
  (``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from pg_tune.train.lock import LOCK_FILE, FolderInUse, hold
from pg_tune.train.signals import TrainingStopped

TMP_PREFIX = ".tmp-"

# What pg_tune writes into an output_dir (and ``--overwrite`` may remove). Tracker folders
# (tensorboard events under the logging project's name, ``wandb/``) are added by the caller.
RUN_ENTRIES = (
    "checkpoints",
    "adapter",
    "model",  # full / partial runs save the complete model here
    "metrics.jsonl",
    "summary.json",
    "recipe.yaml",
    "final_state.json",
    "eval",  # pg-tune eval's default output folder
    "wandb",
)
_PROBE = f"{TMP_PREFIX}write-probe-"
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def final_folder(output_dir: Path, method: str) -> Path:
    """Where a run's result goes: LoRA saves ``adapter/``; full / partial runs the complete ``model/``."""
    return output_dir / ("adapter" if method == "lora" else "model")


class OutputDirError(ValueError):
    """``output_dir`` cannot be used as asked; the message says why and what to do."""


class DiskFullError(TrainingStopped):
    """No space left while writing a run's files (exit status 1)."""


# --- the output folder ---------------------------------------------------------------------------


def run_entries(output_dir: Path, extra: tuple[str, ...] = ()) -> tuple[list[Path], list[Path]]:
    """(entries pg_tune wrote, anything else) in ``output_dir``; temporary folders count as ours."""
    names = set(RUN_ENTRIES) | set(extra)
    ours, others = [], []
    for entry in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if entry.name.startswith(_PROBE) or entry.name == LOCK_FILE:  # another rank's probe; the lock
            continue
        (ours if entry.name in names or entry.name.startswith(TMP_PREFIX) else others).append(entry)
    return ours, others


def check_output_dir(
    output_dir: Path, resume: str | None, overwrite: bool, extra: tuple[str, ...] = ()
) -> list[Path]:
    """Refuse what would mix two runs; returns what ``--overwrite`` must remove (nothing else is touched).

    Raises ``OutputDirError`` when ``output_dir`` is a file, cannot be written, or holds files and
    neither ``resume`` nor ``overwrite`` is given.
    """
    if resume and overwrite:
        raise OutputDirError(
            "--resume and --overwrite contradict each other: continue the run, or start it clean"
        )
    ensure_writable_dir(output_dir)
    ours, others = run_entries(output_dir, extra)
    if not ours and not others:
        return []
    if overwrite:
        if others:
            raise OutputDirError(
                f"output_dir {output_dir}: --overwrite removes only pg_tune's own files, and this folder also "
                f"holds {', '.join(p.name for p in others[:5])}{' ...' if len(others) > 5 else ''}; "
                "move them away or choose another output_dir"
            )
        return ours
    if resume:
        return []
    held = ", ".join(p.name for p in (ours + others)[:6]) + (" ..." if len(ours) + len(others) > 6 else "")
    raise OutputDirError(
        f"output_dir {output_dir} is not empty ({held}): another run's files would be mixed with this one's. "
        "Continue that run with --resume auto, start it clean with --overwrite, or choose another output_dir"
    )


def ensure_writable_dir(output_dir: Path) -> None:
    """Create ``output_dir`` if needed; ``OutputDirError`` if it is a file or cannot be written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir}: is a file, not a folder; choose another output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f"{_PROBE}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"output_dir {output_dir}: cannot write there ({e.strerror or e}); choose a writable output_dir"
        ) from None


def is_main_launch_process() -> bool:
    """Rank 0 of a launch, read from the launcher's environment (torchrun, accelerate, deepspeed,
    MPI) before any Accelerator exists (a ``PartialState`` made early would fix the wrong backend)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


@contextlib.contextmanager
def hold_output_dir(output_dir: Path, command: str) -> Iterator[None]:
    """The run folder's one-writer lock (``pg_tune.train.lock``), taken by the launch's rank 0 only,
    after checking that the folder can be written; ``OutputDirError`` when another process holds it."""
    if not is_main_launch_process():
        yield
        return
    ensure_writable_dir(output_dir)
    try:
        lock = hold(output_dir, command, what="output_dir")
        lock.__enter__()
    except FolderInUse as e:
        raise OutputDirError(str(e)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def remove_entries(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``.tmp-*`` leftovers of interrupted saves (they may be what filled the disk)."""
    stale = sorted(folder.glob(f"{TMP_PREFIX}*")) if folder.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


# --- atomic folders and a full disk ----------------------------------------------------------------


def free_mb(path: Path) -> float:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free / 2**20
    return float("nan")


def is_disk_full(error: BaseException) -> bool:
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if e is not None and ("No space left on device" in str(e) or "os error 28" in str(e)):
            return True
    return False


@contextlib.contextmanager
def disk_full_guard(path: Path) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one ``DiskFullError`` line."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(
            f"no space left while writing {path} ({free_mb(path):.0f} MB free); free some space "
            "(old checkpoints: train.keep_last) and resume with --resume auto",
        ) from None


class _RecordingWriter(io.RawIOBase):
    """A file wrapper that keeps the OSError of a failed write: ``torch.save`` swallows it and
    raises ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos`` instead."""

    def __init__(self, file):
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise


def torch_save(obj, path: Path) -> None:
    """``torch.save`` that reports a full disk as the ``OSError`` it is."""
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    _fsync_path(path)


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``final`` in one rename.

    On any error the temporary folder is removed and ``final`` (if it existed) is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with disk_full_guard(final):
            tmp.mkdir()
            yield tmp
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # a folder cannot be replaced by rename: move the old one aside first
        old = final.parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
