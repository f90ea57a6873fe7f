"""Checkpoints: atomic writes, partial folders ignored, keep-last-K-plus-best, safe loading, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from pg_tune.config.recipe import parse_recipe
from pg_tune.train.checkpoint import (
    BestPolicy,
    best_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from pg_tune.train.optim import build_optimizer, build_scheduler
from pg_tune.train.resume import (
    ResumeError,
    capture_rng,
    check_fingerprint,
    find_resume_checkpoint,
    restore_rng,
    run_fingerprint,
    truncate_metrics_log,
)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.adapter = torch.nn.Linear(3, 2)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = TwoLayers()
    recipe = parse_recipe(
        {"output_dir": "x", "data": {"train": [{"format": "shapes"}]}, "train": {"lr": 0.1}}
    )
    optimizer = build_optimizer(model.parameters(), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps=10)
    for _ in range(2):
        model.adapter(model.frozen(torch.randn(4, 3))).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _save(root, step, model, optimizer, scheduler, keep_last=2, metrics=None, best=None, **kw):
    return save_checkpoint(
        root,
        step,
        model,
        optimizer,
        scheduler,
        {"eval_metrics": metrics or {}},
        keep_last,
        rng_states=[capture_rng()],
        fingerprint={"lora.r": 4},
        best=best,
        **kw,
    )


def test_checkpoint_files_and_exact_round_trip(tmp_path):
    model, optimizer, scheduler = _trained()
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    assert sorted(p.name for p in path.iterdir()) == [
        "complete.json",
        "fingerprint.json",
        "optim.pt",
        "rng.pt",
        "state.json",
        "trainable.safetensors",
    ]
    # Only trainable weights are stored, and optim.pt is plain tensors: weights_only loading works.
    torch.load(path / "optim.pt", weights_only=True)
    fresh, fresh_opt, fresh_sched = _trained(seed=1)
    loaded = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert torch.equal(fresh.adapter.weight, model.adapter.weight)
    assert not torch.equal(fresh.frozen.weight, model.frozen.weight)  # the base is not in a checkpoint
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 2
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert loaded.state["step"] == 2 and loaded.fingerprint == {"lora.r": 4}


def test_rng_round_trip_covers_python_numpy_torch():
    import random

    import numpy as np

    state = capture_rng()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path):
    model, optimizer, scheduler = _trained()
    _save(tmp_path, 2, model, optimizer, scheduler)

    def crash(tmp):
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, model, optimizer, scheduler, before_rename=crash)
    # The half-finished write sits in a .tmp- folder; a folder without the marker is not complete either.
    (tmp_path / "step-0000006").mkdir()
    (tmp_path / "step-0000006" / "state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    assert find_resume_checkpoint("auto", tmp_path.parent / "nowhere") is None
    assert find_resume_checkpoint(str(tmp_path), tmp_path).name == "step-0000002"
    with pytest.raises(ResumeError, match="incomplete checkpoint"):
        find_resume_checkpoint(str(tmp_path / "step-0000006"), tmp_path)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-0000006", model)
    # The next save cleans the stale temporary folder up.
    _save(tmp_path, 8, model, optimizer, scheduler)
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_last_k_plus_best(tmp_path):
    model, optimizer, scheduler = _trained()
    best = BestPolicy("caption/exact_match", "max")
    scores = {1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.1}
    for step, score in scores.items():
        _save(tmp_path, step, model, optimizer, scheduler, metrics={"caption/exact_match": score}, best=best)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000004", "step-0000005"]
    assert best_checkpoint(tmp_path, best).name == "step-0000002"
    assert best_checkpoint(tmp_path, BestPolicy("caption/exact_match", "min")).name == "step-0000005"


def test_fingerprint_refuses_a_different_lora(tmp_path):
    model, _, _ = _trained()
    base = {"output_dir": "x", "data": {"train": [{"format": "shapes"}]}}
    stored = run_fingerprint(parse_recipe({**base, "lora": {"r": 4}}), model)
    current = run_fingerprint(parse_recipe({**base, "lora": {"r": 8, "targets": "attention"}}), model)
    check_fingerprint(tmp_path, stored, stored)
    with pytest.raises(ResumeError) as err:
        check_fingerprint(tmp_path, stored, current)
    message = str(err.value)
    assert "incompatible run" in message and "lora.r: checkpoint has 4, this run has 8" in message
    assert "lora.targets" in message
    with pytest.raises(ResumeError, match="no fingerprint.json"):
        check_fingerprint(tmp_path, None, current)


def test_truncate_metrics_log_drops_lost_future(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (0, 1, 2, 3)) + '{"step": 4, "lo'
    )
    assert truncate_metrics_log(log, 2) == 2
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2]


def test_best_checkpoint_ties_go_to_the_earliest(tmp_path):
    """A later checkpoint must improve on the metric to become the best (what the loop assumes)."""
    import json

    from pg_tune.train.checkpoint import COMPLETE_MARKER, BestPolicy, best_checkpoint

    for step, value in [(4, 0.5), (8, 0.7), (12, 0.7), (16, 0.2)]:
        folder = tmp_path / f"step-{step:07d}"
        folder.mkdir()
        (folder / "state.json").write_text(json.dumps({"step": step, "eval_metrics": {"m": value}}))
        (folder / COMPLETE_MARKER).write_text("{}")
    assert best_checkpoint(tmp_path, BestPolicy("m", "max")).name == "step-0000008"
    assert best_checkpoint(tmp_path, BestPolicy("m", "min")).name == "step-0000016"
