"""A run that trained nothing, or skipped more than ``data.max_bad_row_share`` of its rows, fails
saying how many rows were bad and why, and writes no adapter (issue 22.3)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from pg_tune.cli import main
from pg_tune.data.formats.shapes import write_jsonl

BASE = {
    "model": {"name_or_path": "tiny-paligemma2"},
    "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "targets": "attention"},
    "data": {"max_text_length": 16, "on_bad_row": "skip"},
    "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1},
    "eval": {"before_training": False, "batch_size": 2, "max_new_tokens": 2},
}


def _recipe(tmp_path: Path, jsonl: Path, **data) -> str:
    recipe = json.loads(json.dumps(BASE))
    recipe["data"].update({"train": [{"format": "jsonl", "path": str(jsonl)}], **data})
    recipe["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _dataset(tmp_path: Path, rows: int, corrupt: int = 0, missing: int = 0) -> Path:
    jsonl = write_jsonl(tmp_path / "data", num_samples=rows)
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    for image in images[:corrupt]:
        image.write_bytes(b"not a png")  # found at build time, unreadable when the collator opens it
    for image in images[corrupt : corrupt + missing]:
        image.unlink()  # refused at build time
    return jsonl


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pg-tune:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_every_training_row_unreadable_fails_and_writes_no_adapter(tmp_path, capsys):
    recipe = _recipe(tmp_path, _dataset(tmp_path, rows=4, corrupt=4))
    assert main(["train", recipe]) == 2
    line = _error(capsys)
    assert "trained nothing: all 4 training rows read were bad" in line
    assert "corrupt_image: 4 (e.g. " in line and "cannot read image" in line
    assert "no adapter was written" in line
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert not (run / "final_state.json").exists()


@pytest.mark.slow
def test_more_bad_rows_than_the_stated_share_fails_and_the_share_can_be_raised(tmp_path, capsys):
    recipe = _recipe(tmp_path, _dataset(tmp_path, rows=8, corrupt=6))
    assert main(["train", recipe]) == 2
    line = _error(capsys)
    assert "of the training rows read were bad (over data.max_bad_row_share=0.5)" in line
    assert "corrupt_image: " in line and not (tmp_path / "run" / "adapter").exists()
    # Said on purpose: the run goes on, and its summary is strict JSON (no NaN).
    assert main(["train", recipe, "data.max_bad_row_share=0.9", "--overwrite"]) == 0
    text = (tmp_path / "run" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["bad_rows"]["training"]["corrupt_image"] >= 1 and summary["steps"] == 2


def test_more_bad_rows_at_build_than_the_share_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import pg_tune.train.loop as loop

    monkeypatch.setattr(loop, "_build_run", lambda *a, **k: pytest.fail("must stop before loading the model"))
    recipe = _recipe(tmp_path, _dataset(tmp_path, rows=4, missing=3))
    assert main(["train", recipe]) == 2
    line = _error(capsys)
    assert "data.train: 3 of 4 training rows were bad at build (75%, over data.max_bad_row_share=0.5)" in line
    assert "missing_image: 3 (e.g. " in line
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_every_step_non_finite_and_skipped_trains_nothing(tmp_path, capsys, monkeypatch):
    import pg_tune.train.policies as policies

    monkeypatch.setattr(policies, "is_nonfinite", lambda *a, **k: True)
    recipe = _recipe(tmp_path, _dataset(tmp_path, rows=4))
    assert main(["train", recipe, "train.on_nonfinite=skip"]) == 2
    line = _error(capsys)
    assert "trained nothing: every one of the 2 optimizer steps was non-finite and skipped" in line
    assert not (tmp_path / "run" / "adapter").exists()


def test_summary_json_is_strict_json(tmp_path):
    from pg_tune.cli.train import write_summary
    from pg_tune.train.result import TrainResult
    from pg_tune.train.state import TrainState

    state = TrainState(step=3, first_loss=math.nan, last_loss=math.inf)
    result = TrainResult(tmp_path, tmp_path / "adapter", state, {"caption/cider": math.nan})
    summary = json.loads(write_summary(result).read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["first_loss"] is None and summary["last_loss"] is None
    assert summary["metrics_after"] == {"caption/cider": None}


def test_max_bad_row_share_is_a_fraction(tmp_path):
    from pg_tune.config import ConfigError, parse_recipe

    base = {"output_dir": "x", "data": {"train": [{"format": "shapes"}]}}
    with pytest.raises(ConfigError, match=r"data.max_bad_row_share: must be a finite number in \[0, 1\]"):
        parse_recipe({**base, "data": {**base["data"], "max_bad_row_share": 1.5}})


@pytest.mark.slow
def test_a_resume_at_the_last_checkpoint_has_nothing_to_train_and_still_saves(tmp_path, capsys):
    """Killed after the last step's checkpoint, before the adapter: nothing is left to train, and that
    is not "trained nothing"."""
    recipe = _recipe(tmp_path, _dataset(tmp_path, rows=4), on_bad_row="stop")
    assert main(["train", recipe, "train.save_every=1"]) == 0
    run = tmp_path / "run"
    for name in ("adapter", "final_state.json", "summary.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main(["train", recipe, "train.save_every=1", "--resume", "auto"]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_a_run_short_of_its_planned_steps_says_so(tmp_path, capsys):
    """Windows whose every row was unreadable are skipped: the stop reason says how many steps ran."""
    recipe = _recipe(tmp_path, _dataset(tmp_path, rows=4, corrupt=2), max_bad_row_share=0.9, shuffle=False)
    assert main(["train", recipe, "train.batch_size=1", "train.max_steps=4"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["stop_reason"].startswith(
        "trained 2 of the planned 4 steps: windows without a readable row"
    )
    assert "corrupt_image: 2" in summary["stop_reason"]
