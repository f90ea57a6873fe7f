"""An export's ``OUT.partial``: one writer, only pg_tune's folder removed, one-line errors (issue 22.2, 22.6, 22.7).

The live export holding ``OUT.partial`` is another process (``StagedExport``, as ``pg-tune export``
claims it); the second export runs the real command in the test process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pg_tune.cli import main
from pg_tune.export.staging import MARKER, StagedExport


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fake_run(folder: Path) -> Path:
    """A run folder as far as ``read_run`` looks before any weights are read."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "tiny-paligemma2"})
    )
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    recipe = {
        "output_dir": str(folder),
        "model": {"name_or_path": "tiny-paligemma2"},
        "data": {"train": [{"format": "shapes", "num_samples": 4}]},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def _live_export(out: Path) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        import time
        from pg_tune.export.staging import StagedExport
        staging = StagedExport({str(out)!r})
        (staging.path / "model-00001-of-00002.safetensors").write_bytes(b"half written")
        print("held", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pg-tune")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_pointing_at_a_file_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    (tmp_path / "model.bin").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path / "model.bin")]) == 2
    assert "--out " + str(tmp_path / "model.bin") + ": is a file, not a folder" in _error_line(capsys)
    assert main(["export", str(run), "--out", str(tmp_path / "model.bin" / "merged")]) == 2
    assert "is a file, not a folder" in _error_line(capsys)
    assert (tmp_path / "model.bin").read_text() == "mine"


def test_a_users_folder_named_out_partial_is_never_removed(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    mine = tmp_path / "merged.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 2
    line = _error_line(capsys)
    assert f"{mine} exists and pg_tune did not make it (no {MARKER} inside), so it is not removed" in line
    assert (mine / "notes.txt").read_text() == "my notes"
    empty = tmp_path / "other.partial"
    empty.mkdir()  # even an empty one is the user's
    with pytest.raises(Exception, match="pg_tune did not make it"):
        StagedExport(tmp_path / "other")
    assert empty.is_dir()


def test_a_second_export_to_one_out_is_refused_then_takes_over_after_sigkill(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "merged"
    live = _live_export(out)
    try:
        assert main(["export", str(run), "--out", str(out)]) == 2
        line = _error_line(capsys)
        assert f"--out {out} is being written by another export (pid {live.pid}, pg-tune export)" in line
        assert (
            tmp_path / "merged.partial" / "model-00001-of-00002.safetensors"
        ).read_bytes() == b"half written"
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
    # The killed export's folder carries pg_tune's marker and no live lock: it is removed and claimed.
    staging = StagedExport(out)
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in staging.path.iterdir()) == [MARKER]
    (staging.path / "config.json").write_text("{}")
    staging.finish()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and not staging.path.exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_disk_full_during_export_is_one_line_and_leaves_nothing(
    tmp_path, tiny_checkpoint, capsys, monkeypatch, where
):
    from transformers import ProcessorMixin

    import pg_tune.export.stream as stream
    from tests.export.test_export import make_run

    run = make_run(tmp_path / "run", tiny_checkpoint)
    capsys.readouterr()
    if where == "weights":  # a plain write: OSError(ENOSPC)

        def full(self, key, tensor):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(stream.ShardWriter, "write", full)
    else:  # tokenizers' Rust writer: a plain Exception carrying the OS error

        def full(self, *args, **kwargs):
            raise Exception("No space left on device (os error 28)")

        monkeypatch.setattr(ProcessorMixin, "save_pretrained", full)
    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"pg-tune export: error: no space left while writing {out}.partial (")
    assert "MB free); nothing was exported" in line
    assert not out.exists() and not Path(f"{out}.partial").exists()
