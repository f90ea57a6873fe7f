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


def test_rss_phases_marks_every_step_of_a_tiny_run(tiny_checkpoint, tmp_path):
    """``benchmarks/rss_phases.py`` (its own process: it patches the loop's forward and AdamW's
    step, and RSS is per process): every phase mark of every step, the heap read at each, a peak."""
    script = SCRIPT.parent / "rss_phases.py"
    command = [sys.executable, str(script), "--checkpoint", str(tiny_checkpoint), "--steps", "2"]
    command += ["--work", str(tmp_path), "--tensors", "--trim-each-step"]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The report's lines: "   12.34 s  fwd start  RSS 0.512 GB  peak until the next mark ...".
    names = [
        line.split(" s  ")[1].split(" RSS")[0].strip() for line in done.stdout.splitlines() if " s  " in line
    ]
    step = ["fwd start", "fwd end", "opt start", "opt end"]
    assert names == ["imported", "loaded", *step, *step, "trained"], done.stdout[-3000:]
    assert done.stdout.count("tensors alive") == 2 and done.stdout.count("trimmed") == 2
    assert "peak RSS" in done.stdout and "first loss" in done.stdout
