"""Secrets never reach disk or logs: a planted HF_TOKEN / WANDB_API_KEY must appear nowhere in the
run dir (recipe copies, checkpoints, adapter, tensorboard events, wandb offline files) nor in the
process output, after a real short training run with both trackers on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

HF_TOKEN = "hf_PLANTEDsecretTOKEN0123456789abcdef"
WANDB_KEY = "PLANTEDwandbKEY0123456789abcdef0123456789"


@pytest.mark.slow
def test_planted_tokens_appear_nowhere(tmp_path):
    run_dir = tmp_path / "run"
    recipe = {
        "output_dir": str(run_dir),
        "model": {"name_or_path": "tiny-paligemma2"},
        "lora": {"r": 2, "targets": "attention"},
        "data": {
            "train": [{"format": "shapes", "num_samples": 4, "image_size": 32}],
            "eval": [{"format": "shapes", "num_samples": 2, "image_size": 32}],
            "max_text_length": 16,
        },
        "train": {"max_steps": 2, "batch_size": 2, "log_every": 1, "save_every": 1},
        "eval": {"max_new_tokens": 2, "every": 2},
        "logging": {"trackers": ["tensorboard", "wandb"], "wandb_mode": "offline", "run_name": "secrets"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY, "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's pg_tune
    env.pop("WANDB_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pg_tune", "train", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The trackers really ran and wrote their files into the run dir.
    assert list(run_dir.rglob("events.out.tfevents.*")), "tensorboard wrote nothing"
    assert list(run_dir.rglob("*.wandb")), "wandb (offline) wrote nothing"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "fingerprint.json").is_file()
    # The wandb run id is kept for resuming the same tracker run.
    assert json.loads((checkpoints[-1] / "state.json").read_text())["tracker_run_ids"]["wandb"]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    for secret in (HF_TOKEN, WANDB_KEY):
        needle = secret.encode()
        leaks = [str(p) for p in files if needle in p.read_bytes()]
        assert not leaks, f"secret found in {leaks}"
        assert secret not in proc.stdout and secret not in proc.stderr


def test_remote_code_off_and_safetensors_only_by_default(monkeypatch, tmp_path):
    """A recipe that says nothing about remote code loads without it, and only from safetensors."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from pg_tune.config.recipe import parse_recipe
    from pg_tune.models.paligemma import PaliGemmaFamily

    calls = {}

    def capture(name):
        def fake(*args, **kwargs):
            calls[name] = kwargs
            return "loaded"

        return fake

    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "from_pretrained", capture("model"))
    monkeypatch.setattr(PaliGemmaProcessor, "from_pretrained", capture("processor"))
    recipe = parse_recipe(
        {
            "output_dir": "x",
            "model": {"name_or_path": str(tmp_path)},
            "data": {"train": [{"format": "shapes"}]},
        }
    )
    PaliGemmaFamily().load_model(recipe.model)
    PaliGemmaFamily().load_processor(recipe.model)
    assert calls["model"]["trust_remote_code"] is False and calls["model"]["use_safetensors"] is True
    assert calls["processor"]["trust_remote_code"] is False
