"""``benchmarks/real_shapes.py`` runs from main: every worker it starts (pg_tune's loop, the HF
reference, the streaming export, the export check) on a tiny checkpoint. No timing asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_shapes.py"


@pytest.mark.slow
def test_every_worker_runs_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    results_file = tmp_path / "real.json"
    command = [sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint), "--steps", "2"]
    command += ["--threads", "1", "--cases", "lora", "--exports", "stream", "--verify", "--need-gib", "0"]
    command += ["--work", str(tmp_path / "work"), "--json", str(results_file)]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout[-3000:]
    results = json.loads(results_file.read_text())
    pg, ref = results["train"]["lora"]["pg_tune"], results["train"]["lora"]["reference"]
    for side in (pg, ref):
        assert side["peak_rss_gb"] > 0 and len(side["step_seconds"]) == 2
    # Both sides read the same first row of the same bf16 checkpoint with the same adapter size: the
    # same loss up to bf16 rounding of the logits (2 ulp of bf16 relative to the loss).
    assert pg["trainable_params"] == ref["trainable_params"] > 0
    assert math.isclose(pg["first_loss"], ref["first_loss"], rel_tol=4 * torch.finfo(torch.bfloat16).eps)
    assert results["export"]["stream"]["peak_rss_gb"] > 0
    verify = results["verify"]
    assert verify["positions"] > 0 and verify["top1_agreement"] > 0.9
    assert results["plan"]["lora"]["total_gb"] > 0
    assert "ratio" in done.stdout and "first loss pg_tune" in done.stdout
