"""Two real processes (gloo on CPU) train exactly like one process with the same global batch, for
both objectives (SFT, and DPO on preference pairs: its loss is the mean over the step's pairs). The
one-process runs are ``pg-tune train`` in the test's own process (``pg_tune.cli.main``).

``accelerate launch --cpu --num_processes 2`` silently starts ONE process without MPI, so the test
launches with ``torch.distributed.run --nproc_per_node 2`` and ``ACCELERATE_USE_CPU=1`` and checks
the world size the run recorded.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pg_tune.cli import main

RECIPE = """
output_dir: {out}
model: {{name_or_path: tiny-paligemma2}}
lora: {{r: 4, alpha: 8, dropout: 0.0, targets: attention_mlp, vision: true}}
data:
  train: [{{format: jsonl, path: {jsonl}}}]
  eval: [{{format: shapes, num_samples: 7}}{eval_pairs}]
  max_text_length: 16
train: {{objective: {objective}, max_steps: 4, batch_size: {batch}, grad_accum: {accum}, lr: 3.0e-3, log_every: 1, warmup_ratio: 0.0}}
eval: {{before_training: false, batch_size: 2, max_new_tokens: 4}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    """`pg-tune train` in `nproc` gloo ranks started by torch.distributed.run."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]  # fmt: skip
    cmd = [sys.executable, *launcher, "-m", "pg_tune", "train", str(recipe), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _recipe_text(out, jsonl, batch, accum, objective="sft"):
    eval_pairs = ", {format: shapes, num_samples: 5, seed: 2, pairs: true}" if objective == "dpo" else ""
    return RECIPE.format(
        out=out, jsonl=jsonl, batch=batch, accum=accum, objective=objective, eval_pairs=eval_pairs
    )


def _train_jsonl(tmp_path, objective: str):
    """The training rows of each objective: shapes captions, or shapes preference pairs."""
    from pg_tune.data.formats.shapes import write_jsonl

    return write_jsonl(tmp_path / "shapes", num_samples=24, pairs=objective == "dpo")


def _run(tmp_path, name, jsonl, batch, accum, nproc, objective="sft"):
    out = tmp_path / name
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(_recipe_text(out, jsonl, batch, accum, objective))
    if nproc == 1:  # one process: this one (the comparisons allow for float summation order)
        assert main(["train", str(recipe)]) == 0
    else:
        proc = _launch(recipe, nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    return summary, losses, load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_processes_match_one(tmp_path, objective):
    train_jsonl = _train_jsonl(tmp_path, objective)
    one, one_losses, one_adapter = _run(tmp_path, "one", train_jsonl, 8, 1, nproc=1, objective=objective)
    two, two_losses, two_adapter = _run(tmp_path, "two", train_jsonl, 4, 1, nproc=2, objective=objective)
    acc, acc_losses, acc_adapter = _run(tmp_path, "accum", train_jsonl, 4, 2, nproc=1, objective=objective)
    assert (one["world_size"], two["world_size"], acc["world_size"]) == (1, 2, 1)
    # Same global batches, loss normalised by the global supervised-token count: the per-step
    # losses and the final adapter agree up to float summation order (stated tolerance 1e-4).
    for losses in (two_losses, acc_losses):
        assert len(losses) == len(one_losses) == 4
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(one_losses), rtol=1e-4, atol=1e-4)
    for adapter in (two_adapter, acc_adapter):
        for key, value in one_adapter.items():
            torch.testing.assert_close(adapter[key], value, rtol=1e-3, atol=1e-4, msg=key)
    # Evaluation gathered every rank's predictions once: 7 samples, not 8 (no padding duplicates).
    assert two["metrics_after"]["caption/count"] == one["metrics_after"]["caption/count"] == 7
    # Preference metrics are means of per-pair log-probabilities batched differently on each rank
    # (other padding lengths): equal up to float summation order; the rest exactly.
    pref = {k for k in one["metrics_after"] if k.startswith("preference/")}
    assert {k: v for k, v in two["metrics_after"].items() if k not in pref} == {
        k: v for k, v in one["metrics_after"].items() if k not in pref
    }
    if objective == "dpo":
        assert two["metrics_after"]["preference/count"] == one["metrics_after"]["preference/count"] == 5
        for key in pref:
            torch.testing.assert_close(
                two["metrics_after"][key], one["metrics_after"][key], rtol=1e-4, atol=1e-4
            )


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_qlora_under_two_processes(tmp_path, tiny_checkpoint, objective):
    """Each rank loads and quantizes its own 4-bit copy; the run trains and writes one adapter (DPO: the
    reference is the 4-bit base with the adapter switched off)."""
    out = tmp_path / "qlora"
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(
        _recipe_text(out, _train_jsonl(tmp_path, objective), 4, 1, objective).replace(
            "model: {name_or_path: tiny-paligemma2}",
            f"model: {{name_or_path: {tiny_checkpoint}}}\n"
            "quantization: {mode: 4bit, bnb_4bit_compute_dtype: float32}",
        )
    )
    proc = _launch(recipe, 2, "train.max_steps=2", "train.gradient_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("14 linear layers quantized (nf4") == 2  # one quantized copy per rank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["last_loss"]))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    if objective == "dpo":  # a fresh adapter: the policy is its reference, every pair's loss ln 2
        assert abs(summary["first_loss"] - math.log(2)) < 1e-6
