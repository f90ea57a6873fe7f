"""One writer per run folder and per export ``--out`` (issue 22.1, 22.2), with real processes.

The holder is always another process (a real ``pg-tune train``, or a Python process holding the
lock the way the commands do); the second writer runs in the test process. ``SIGKILL`` of the
holder must free the folder at once: the kernel drops an ``fcntl.flock`` with its last descriptor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pg_tune.cli import main
from pg_tune.train.checkpoint import list_checkpoints
from pg_tune.train.lock import LOCK_FILE, FolderInUse, hold

BASE = {
    "model": {"name_or_path": "tiny-paligemma2"},
    "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "targets": "attention"},
    "data": {"train": [{"format": "shapes", "num_samples": 4, "image_size": 32}], "max_text_length": 16},
    "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1},
    "eval": {"before_training": False, "batch_size": 2, "max_new_tokens": 2},
}


def _recipe(tmp_path: Path, **train) -> str:
    data = json.loads(json.dumps(BASE))
    data["train"].update(train)
    data["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _holder(folder: Path, lock_name: str = LOCK_FILE) -> subprocess.Popen:
    """A process holding ``folder``'s lock as a command does, until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pg_tune.train.lock import hold
        with hold({str(folder)!r}, "pg-tune train", lock_name={lock_name!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _newest_step(run: Path) -> int:
    found = list_checkpoints(run / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pg-tune")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_lock_is_exclusive_across_processes_reentrant_within_one_and_freed_by_sigkill(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(
            FolderInUse, match=rf"in use by another pg-tune process \(pid {holder.pid}, pg-tune train\)"
        ):
            with hold(tmp_path / "run", "pg-tune train --resume auto"):
                pass
    finally:
        _kill(holder)
    # Killed: no clean-up ran, and the folder is free at once.
    with hold(tmp_path / "run", "pg-tune train") as lock, hold(tmp_path / "run", "push --merged"):
        assert lock.read_text() == f"{os.getpid()} pg-tune train\n"  # re-entrant in one process


@pytest.mark.parametrize("mode", [[], ["--resume", "auto"], ["--overwrite"]])
def test_every_train_mode_is_refused_while_another_process_holds_the_folder(tmp_path, capsys, mode):
    """Two plain trains into one empty folder at the same moment included (mode [])."""
    holder = _holder(tmp_path / "run")
    try:
        assert main(["train", _recipe(tmp_path), *mode]) == 2
        line = _one_line_error(capsys)
        assert f"output_dir {tmp_path / 'run'} is in use by another pg-tune process (pid {holder.pid}" in line
    finally:
        _kill(holder)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_FILE]  # nothing written, nothing removed


@pytest.mark.slow
def test_resume_and_overwrite_are_refused_while_a_run_trains_then_resume_works_after_sigkill(
    tmp_path, capsys
):
    recipe = _recipe(tmp_path, max_steps=100000, save_every=1)
    run = tmp_path / "run"
    live = subprocess.Popen(
        [sys.executable, "-m", "pg_tune", "train", recipe],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**_env(), "OMP_NUM_THREADS": "1"},
    )
    try:
        # Any complete checkpoint from step 2 on: with keep_last 2, step-0000002 itself is deleted
        # at step 4, which a poll can miss when the machine is busy.
        deadline = time.monotonic() + 300
        while _newest_step(run) < 2:
            assert live.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        for mode in (["--resume", "auto"], ["--overwrite"], []):
            assert main(["train", recipe, *mode]) == 2
            assert f"is in use by another pg-tune process (pid {live.pid}, pg-tune train)" in _one_line_error(
                capsys
            )
        assert live.poll() is None  # the live run goes on, its log intact
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps[:2] == [1, 2]
    finally:
        _kill(live)
    newest = _newest_step(run)
    assert main(["train", recipe, "--resume", "auto", f"train.max_steps={newest + 1}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints' / f'step-{newest:07d}'}" in out
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
