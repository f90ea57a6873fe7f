"""Exact resume after a real crash, clean stop on SIGTERM, non-finite loss handling.

The crash is real: ``PG_TUNE_FAULT_KILL_AFTER_CHECKPOINT=N`` makes the training process SIGKILL
itself right after step N's checkpoint is on disk (no clean-up, no atexit). The run is resumed with
``--resume auto`` and compared with an uninterrupted run of the same recipe: same adapter weights
bit for bit, same ``metrics.jsonl`` values (all but the wall-clock ``samples_per_s``).

Only what must be a process is one (the crashed run, the SIGTERMed run): the uninterrupted and the
resumed runs are ``pg-tune train`` in this process (``pg_tune.cli.main``), which also shows that a
run resumes bitwise in another process than the one that crashed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pg_tune.cli import main
from pg_tune.config.recipe import load_recipe
from pg_tune.train.signals import KILL_AFTER_CHECKPOINT_ENV, NonFiniteError
from tests.families import family_of

REPO = Path(__file__).resolve().parents[2]

# 6 shapes, batch 2 -> 3 batches an epoch; 7 steps cross two epoch boundaries. LoRA dropout > 0
# makes the result depend on the torch RNG state, which the resume must restore too.
RECIPE = {
    "model": {"name_or_path": "tiny-paligemma2"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "attention"},
    "data": {"train": [{"format": "shapes", "num_samples": 6, "image_size": 32}], "max_text_length": 16},
    "train": {"max_steps": 7, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 2, "keep_last": 2},
    "eval": {"before_training": False},
}
EVAL_SET = {"format": "shapes", "num_samples": 2, "image_size": 32, "seed": 1}


def _write_recipe(tmp_path, name: str, **sections) -> str:
    data = json.loads(json.dumps(RECIPE))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _pg_tune(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pg_tune", "train", *args],
        # This checkout's pg_tune, whatever the installed (editable) one points at.
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _records(path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
        for line in path.read_text().splitlines()
    ]


# DPO resumes like SFT: its reference (the adapter switched off) needs nothing saved.
OBJECTIVES = {
    "sft": {},
    "dpo": {
        "train": {"objective": "dpo"},
        "data": {**RECIPE["data"], "train": [{**RECIPE["data"]["train"][0], "pairs": True}]},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, objective, capsys):
    full_recipe = _write_recipe(tmp_path, "full", **OBJECTIVES[objective])
    crash_recipe = _write_recipe(tmp_path, "crash", **OBJECTIVES[objective])
    crashed = _pg_tune(crash_recipe, env={KILL_AFTER_CHECKPOINT_ENV: "4"})  # step 4 = mid second epoch
    assert main(["train", full_recipe]) == 0  # while the child trains
    crash_out, _ = crashed.communicate(timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crash_out
    run = tmp_path / "crash"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert not (run / "adapter").exists()
    assert [r["step"] for r in _records(run / "metrics.jsonl")] == [1, 2, 3, 4]

    capsys.readouterr()
    assert main(["train", crash_recipe, "--resume", "auto"]) == 0
    resumed_out = capsys.readouterr().out
    assert "resuming from" in resumed_out and "step-0000004" in resumed_out

    expected = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bitwise: same ops, same order, same RNG
    assert _records(run / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")
    assert [r["epoch"] for r in _records(run / "metrics.jsonl")] == [0, 0, 0, 1, 1, 1, 2]
    if objective == "dpo":
        assert {"rewards/margin", "rewards/accuracy", "logps/chosen"} <= set(
            _records(run / "metrics.jsonl")[-1]
        )


# Every boundary a checkpoint can sit on. "accum2": 10 shapes, batch 2, grad_accum 2 -> windows of
# 2, 2, 1 batches: 3 steps an epoch, the last one a partial window; evaluation every 2 steps.
# "plain": 6 shapes, batch 2 -> 3 steps an epoch; evaluation every 3 steps (at the epoch end).
BOUNDARY_RECIPES = {
    "accum2": {
        "data": {"train": [{"format": "shapes", "num_samples": 10, "image_size": 32}], "eval": [EVAL_SET]},
        "train": {"max_steps": 5, "grad_accum": 2, "save_every": 1, "keep_last": 10},
        "eval": {"every": 2, "batch_size": 2, "max_new_tokens": 2},
    },
    "plain": {
        "data": {"train": [{"format": "shapes", "num_samples": 6, "image_size": 32}], "eval": [EVAL_SET]},
        "train": {"max_steps": 5, "save_every": 1, "keep_last": 10},
        "eval": {"every": 3, "batch_size": 2, "max_new_tokens": 2},
    },
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per boundary recipe, shared by the kill points."""
    runs = {}

    def get(name: str) -> Path:
        if name not in runs:
            root = tmp_path_factory.mktemp(f"full-{name}")
            assert main(["train", _write_recipe(root, "full", **BOUNDARY_RECIPES[name])]) == 0
            runs[name] = root / "full"
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kill_after"),
    [
        ("accum2", 2),  # mid-epoch, end of a full accumulation window, with an evaluation at that step
        ("accum2", 3),  # end of the epoch, a partial window, no evaluation
        ("plain", 3),  # end of the epoch, with an evaluation at that step
    ],
)
def test_resume_is_bitwise_at_every_boundary(tmp_path, uninterrupted, name, kill_after, capsys):
    recipe = _write_recipe(tmp_path, "crash", **BOUNDARY_RECIPES[name])
    crashed = _pg_tune(recipe, env={KILL_AFTER_CHECKPOINT_ENV: str(kill_after)})
    full = uninterrupted(name)  # the first kill point of a recipe trains it while the child runs
    out, _ = crashed.communicate(timeout=300)
    assert crashed.returncode == -signal.SIGKILL, out
    capsys.readouterr()
    assert main(["train", recipe, "--resume", "auto"]) == 0
    assert f"step-{kill_after:07d} (step {kill_after})" in capsys.readouterr().out
    expected = load_file(full / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "crash" / "adapter" / "adapter_model.safetensors")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert _records(tmp_path / "crash" / "metrics.jsonl") == _records(full / "metrics.jsonl")


@pytest.mark.slow
def test_sigterm_finishes_step_checkpoints_and_exits_nonzero(tmp_path):
    recipe = _write_recipe(tmp_path, "term", train={"save_every": None, "max_steps": 50})
    proc = _pg_tune(recipe)
    log = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "received SIGTERM" in out and "stopped by SIGTERM after step" in out and "--resume auto" in out
    checkpoints = list((tmp_path / "term" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "complete.json").is_file()
    step = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    assert 1 <= step < 50
    assert max(r["step"] for r in _records(log)) == step


def _poison_loss(monkeypatch, bad_calls: set[int]):
    """Make the loss NaN on the given forward calls (1-based), as a blown-up batch would."""
    from pg_tune.train import loss as loss_module

    original = loss_module.SuffixLoss.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        total, count = original(self, batch)
        return (total * float("nan") if calls["n"] in bad_calls else total), count

    monkeypatch.setattr(loss_module.SuffixLoss, "forward", forward)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_rows_and_checkpoint(tmp_path, monkeypatch):
    from pg_tune.train.loop import train

    recipe, resolved = load_recipe(_write_recipe(tmp_path, "nan", train={"max_steps": 3, "save_every": None}))
    _poison_loss(monkeypatch, {2})
    with pytest.raises(NonFiniteError) as err:
        train(recipe, resolved, family_of(recipe))
    message = str(err.value)
    assert "non-finite loss nan" in message and "at step 2" in message
    assert "shapes(seed=0)[" in message  # the batch's Sample.source values
    assert "step-0000001" in message
    state = json.loads((tmp_path / "nan" / "checkpoints" / "step-0000001" / "state.json").read_text())
    assert state["step"] == 1


@pytest.mark.slow
def test_nonfinite_loss_skipped_and_counted(tmp_path, monkeypatch):
    from pg_tune.cli.train import run_training

    recipe, resolved = load_recipe(
        _write_recipe(tmp_path, "nanskip", train={"max_steps": 2, "save_every": None, "on_nonfinite": "skip"})
    )
    _poison_loss(monkeypatch, {2})
    result = run_training(recipe, resolved)
    assert result.steps == 2
    summary = json.loads((tmp_path / "nanskip" / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == 1
    records = _records(tmp_path / "nanskip" / "metrics.jsonl")
    assert {"step": 2, "epoch": 0, "nonfinite_skipped": 1} in records
