"""A run's folder, resume and stopping as a careless user meets them (issue 17.3-17.7, 17.10, 16.3).

Each test runs the real ``pg-tune train`` command in-process (``pg_tune.cli.main``) on the tiny
PaliGemma 2 with a handful of steps; failures are simulated where they cannot be made real (a full
disk, Ctrl-C during setup) by making the writer or the loader raise what the system would.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pg_tune.cli import main
from tests.families import family_of

BASE = {
    "model": {"name_or_path": "tiny-paligemma2"},
    "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "targets": "attention"},
    "data": {"train": [{"format": "shapes", "num_samples": 4, "image_size": 32}], "max_text_length": 16},
    "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1},
    "eval": {"before_training": False, "batch_size": 2, "max_new_tokens": 2},
}


def _recipe(tmp_path: Path, name: str = "run", **sections) -> str:
    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data.setdefault("output_dir", str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys) -> str:
    """The command's own message (stderr also carries progress bars and library warnings)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pg-tune:")]
    assert len(lines) == 1, err
    return lines[0]


# --- 17.3: a non-empty output_dir ------------------------------------------------------------------


def test_non_empty_output_dir_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (run / "checkpoints" / "step-0000005").mkdir(parents=True)
    assert main(["train", _recipe(tmp_path)]) == 2
    line = _one_line_error(capsys)
    assert "is not empty" in line and "--resume auto" in line and "--overwrite" in line
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'  # nothing touched


def test_overwrite_refuses_files_pg_tune_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "summary.json").write_text("{}")
    assert main(["train", _recipe(tmp_path), "--overwrite"]) == 2
    assert "notes.txt" in _one_line_error(capsys)
    assert (run / "notes.txt").read_text() == "mine" and (run / "summary.json").read_text() == "{}"


@pytest.mark.slow
def test_overwrite_says_what_it_removes_and_starts_clean(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000009").mkdir(parents=True)
    (run / "checkpoints" / "step-0000009" / "complete.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    assert main(["train", _recipe(tmp_path), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: removing" in out and "checkpoints" in out and "metrics.jsonl" in out
    assert not (run / "checkpoints" / "step-0000009").exists()
    assert [r["step"] for r in _records(run)] == [1, 2]


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_output_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, kind):
    if kind == "file":
        target = tmp_path / "run"
        target.write_text("not a folder")
        expected = "is a file"
    elif os.geteuid() == 0:  # root writes through permission bits: use a place nobody can create folders
        target = Path("/proc/pg_tune_cannot_write_here/run")
        expected = "cannot write there"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        target = parent / "run"
        expected = "cannot write there"
    assert main(["train", _recipe(tmp_path, output_dir=str(target))]) == 2
    assert expected in _one_line_error(capsys)


# --- 17.10: Ctrl-C during setup, max_steps ----------------------------------------------------------


def test_ctrl_c_during_setup_is_a_clean_one_line_exit(tmp_path, capsys, monkeypatch):
    import pg_tune.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_samples", interrupted)  # Ctrl-C while the datasets are read
    assert main(["train", _recipe(tmp_path)]) == 130
    assert "interrupted by Ctrl-C" in _one_line_error(capsys)


@pytest.mark.parametrize("max_steps", [0, -5])
def test_max_steps_below_one_is_refused_not_ignored(tmp_path, capsys, max_steps):
    from pg_tune.config import ConfigError, load_recipe
    from pg_tune.train.loop import train

    assert main(["train", _recipe(tmp_path, train={"max_steps": max_steps})]) == 2
    assert "train.max_steps" in _one_line_error(capsys)
    # The loop itself refuses it too, for a recipe changed in code after validation.
    recipe, resolved = load_recipe(_recipe(tmp_path))
    recipe.train.max_steps = max_steps
    with pytest.raises(ConfigError, match="train.max_steps: must be >= 1"):
        train(recipe, resolved, family_of(recipe))
    assert not (tmp_path / "run" / "adapter").exists()


# --- 17.5: resume with changed hyper-parameters --------------------------------------------------------


@pytest.mark.slow
def test_resume_with_changed_hyper_parameters_is_refused_listing_them(tmp_path, capsys):
    recipe = _recipe(tmp_path, train={"save_every": 1, "max_steps": 2})
    assert main(["train", recipe]) == 0
    (tmp_path / "run" / "adapter").rename(tmp_path / "adapter-kept")  # as if killed before the end
    capsys.readouterr()
    assert main(["train", recipe, "train.lr=1e-5", "train.seed=3", "--resume", "auto"]) == 2
    line = capsys.readouterr().err
    assert "refusing to resume" in line and "train.lr: checkpoint has 0.001, this run has 1e-05" in line
    assert "train.seed" in line
    # A longer run is applied and said; recipe.yaml and the schedule both use the new length.
    assert main(["train", recipe, "train.max_steps=3", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps changed since the checkpoint (2 -> 3); applied" in out
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["max_steps"] == 3
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [1, 2, 3]


# --- 17.6: a full disk ---------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_names_the_path_and_cleans_up(tmp_path, capsys, monkeypatch):
    import pg_tune.train.checkpoint as checkpoint

    stale = tmp_path / "run" / "checkpoints" / ".tmp-step-0000001-4242"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(checkpoint, "save_file", _no_space)
    assert main(["train", _recipe(tmp_path, train={"save_every": 1}), "--resume", "auto"]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("pg-tune: no space left while writing ") and "step-0000001" in line
    assert " MB free)" in line
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # the stale and the new temporary: gone


@pytest.mark.slow
def test_final_adapter_save_is_atomic_on_a_full_disk(tmp_path, capsys, monkeypatch):
    from transformers import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "save_pretrained", _no_space)
    assert main(["train", _recipe(tmp_path)]) == 1
    line = _one_line_error(capsys)
    assert "no space left while writing" in line and "adapter" in line
    run = tmp_path / "run"
    assert not (run / "adapter").exists()  # no half-written folder beside a valid-looking adapter
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


# --- 17.7: a corrupt eval image under on_bad_row=skip ------------------------------------------------------


@pytest.mark.slow
def test_corrupt_eval_image_is_counted_not_fatal(tmp_path, capsys):
    from pg_tune.data.formats.shapes import write_jsonl

    jsonl = write_jsonl(tmp_path / "eval", num_samples=3)
    sorted((tmp_path / "eval" / "images").glob("*.png"))[1].write_bytes(b"not a png")
    recipe = _recipe(
        tmp_path,
        data={"eval": [{"format": "jsonl", "path": str(jsonl)}], "on_bad_row": "skip"},
        eval={"before_training": True, "every": 1},
    )
    assert main(["train", recipe]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_rows"]["eval"] == {"corrupt_image": 1}
    assert summary["metrics_after"]["caption/count"] == 2
    assert [r["step"] for r in _records(tmp_path / "run") if any(k.startswith("eval/") for k in r)] == [
        0,
        1,
        2,
        2,
    ]
    # Under stop, the run stops before training, naming the row.
    capsys.readouterr()
    assert main(["train", recipe, "data.on_bad_row=stop", "--overwrite"]) == 2
    line = _one_line_error(capsys)
    assert "data.jsonl:2" in line and "cannot read image" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- 17.10: damaged checkpoints, resume with nothing to resume, a finished run -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["trainable.safetensors", "state.json", "optim.pt"])
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damaged):
    recipe = _recipe(tmp_path, train={"save_every": 1, "max_steps": 2, "keep_last": 3})
    assert main(["train", recipe]) == 0
    run = tmp_path / "run"
    expected = load_file(run / "adapter" / "adapter_model.safetensors")
    (run / "adapter").rename(tmp_path / "adapter-kept")  # as if killed right after step 2's checkpoint
    path = run / "checkpoints" / "step-0000002" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    capsys.readouterr()
    assert main(["train", recipe, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"step-0000002 is damaged ({damaged}" in out and "falling back to the previous checkpoint" in out
    assert "resuming from" in out and "step-0000001 (step 1)" in out
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all((expected[k] == got[k]).all() for k in expected)  # step 2 redone from step 1: same weights


@pytest.mark.slow
def test_resume_auto_without_checkpoint_does_not_duplicate_log_records(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n'
    )  # killed, no checkpoint
    assert main(["train", _recipe(tmp_path), "--resume", "auto"]) == 0
    assert "no checkpoint under" in capsys.readouterr().out
    assert [r["step"] for r in _records(run)] == [1, 2]
    assert all(r["loss"] not in (9.0, 8.0) for r in _records(run))


@pytest.mark.slow
def test_resume_of_a_finished_run_does_nothing(tmp_path, capsys):
    recipe = _recipe(tmp_path, data={"eval": [{"format": "shapes", "num_samples": 2}]})
    assert main(["train", recipe]) == 0
    run = tmp_path / "run"
    log, summary = (run / "metrics.jsonl").read_text(), (run / "summary.json").read_text()
    capsys.readouterr()
    assert main(["train", recipe, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2" in out and "eval after training" not in out
    assert (run / "metrics.jsonl").read_text() == log and (run / "summary.json").read_text() == summary


# --- 16.3: early stopping --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scores", "min_delta", "stop_step", "best_step"),
    [
        ([0.5, 0.6, 0.6, 0.55, 0.9, 0.9], 0.0, 4, 2),  # a tie is no improvement
        ([0.5, 0.54, 0.56, 0.6, 0.6, 0.9], 0.05, 5, 3),  # 0.54 and 0.6 are not better by more than 0.05
    ],
)
def test_early_stopping_stops_exactly_when_patience_runs_out(
    tmp_path, capsys, monkeypatch, scores, min_delta, stop_step, best_step
):
    import pg_tune.train.evaluation as evaluation

    calls = iter(scores + [0.0])

    def scripted(*args, **kwargs):
        return {"caption/cider": next(calls)}

    monkeypatch.setattr(evaluation, "evaluate_samples", scripted)
    recipe = _recipe(
        tmp_path,
        data={"eval": [{"format": "shapes", "num_samples": 2}]},
        train={"max_steps": 8, "keep_last": 1},
        eval={"every": 1, "best_metric": "caption/cider", "patience": 2, "min_delta": min_delta},
    )
    assert main(["train", recipe]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == stop_step
    assert summary["stop_reason"].startswith(
        f"early stopping at step {stop_step}: caption/cider did not improve"
    )
    assert f"at step {best_step})" in summary["stop_reason"]
    assert "stopped:        early stopping" in out
    assert summary["best_checkpoint"].endswith(f"step-{best_step:07d}")
    assert (run / "checkpoints" / f"step-{best_step:07d}").is_dir()  # kept besides keep_last=1
    assert max(r["step"] for r in _records(run) if "loss" in r) == stop_step


def test_patience_needs_a_metric_and_an_interval(tmp_path, capsys):
    assert main(["validate", _recipe(tmp_path, eval={"patience": 2})]) == 2
    assert "eval.patience" in _one_line_error(capsys)
