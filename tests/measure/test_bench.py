"""Smoke run of the benchmark's code path (both sides, one step, a tiny preset): no timing asserted."""

from __future__ import annotations

import argparse

import pytest

from pg_tune.measure import bench
from pg_tune.models.paligemma.tiny import PRESETS, build_config


def _args(tmp_path, side: str) -> argparse.Namespace:
    return argparse.Namespace(
        side=side,
        preset="tiny-paligemma",
        steps=1,
        warmup=0,
        batch_size=2,
        threads=1,
        device="cpu",
        dtype="float32",
        lora_r=4,
        num_workers=0,
        samples=2,
        optimizer="adamw",
        group_by_length=True,
        feature_cache=None,
        data_dir=str(tmp_path),
        method="lora",
        partial_groups="attention",
        full_vision=False,
        use_dora=False,
        use_rslora=False,
    )


@pytest.mark.slow
def test_both_sides_run_one_step_and_agree_on_the_loss(tmp_path):
    results = {side: [bench.run_side(_args(tmp_path, side))] for side in bench.SIDES}
    ours, ref = results["pg_tune"][0], results["reference"][0]
    assert ours.samples_per_s > 0 and ref.samples_per_s > 0 and ours.peak_memory_gb > 0
    # same model, same two rows (one batch): the step-1 losses are the same loss
    assert ours.first_loss == pytest.approx(ref.first_loss, rel=1e-5)
    table = bench.format_table(results, peak_gflops=100.0, device="cpu")
    assert "ratio" in table and "pg_tune" in table and "reference" in table


def test_step_flops_of_bench_mini_match_the_hand_count():
    # The figure: about 43 GFLOP a step (batch 4, ~287 tokens, 80 supervised), half of it the head.
    config = build_config(PRESETS["bench-mini"])
    total = bench.step_flops(config, batch_size=4, seq_len=287, supervised=80)
    head = 4 * 80 * 256 * 257216
    assert 40e9 < total < 46e9
    assert 0.45 < head / total < 0.52
