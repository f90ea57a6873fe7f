"""Smoke run of the benchmark's code path (both sides, one step, a tiny preset): no timing asserted."""

from __future__ import annotations

import argparse

import pytest

from pg_tune.measure import bench
from pg_tune.models.paligemma.tiny import PRESETS, build_config
from tests.families import family_of


def _args(
    tmp_path, side: str, preset: str = "tiny-paligemma", group_by_length: bool = True
) -> argparse.Namespace:
    return argparse.Namespace(
        side=side,
        preset=preset,
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
        group_by_length=group_by_length,
        feature_cache=None,
        data_dir=str(tmp_path),
        method="lora",
        partial_groups="attention",
        full_vision=False,
        use_dora=False,
        use_rslora=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-paligemma", "tiny-gemma3", "tiny-smolvlm2"])
def test_both_sides_train_the_same_thing_on_the_same_batch(tmp_path, preset):
    """Every family's reference recipe supervises what pg_tune supervises (the answer and its end
    token), on the same first batch: equal first losses and equal adapters, proved by the bench."""
    args = {side: _args(tmp_path, side, preset, group_by_length=False) for side in bench.SIDES}
    results = {side: [bench.run_side(args[side])] for side in bench.SIDES}
    ours, ref = results["pg_tune"][0], results["reference"][0]
    assert ours.samples_per_s > 0 and ref.samples_per_s > 0 and ours.peak_memory_gb > 0
    assert ours.trainable_params == ref.trainable_params > 0
    proved, verdict = bench.same_training(results, args["pg_tune"], vocab=300_000)
    assert proved and verdict.startswith("same training"), verdict
    table = bench.format_table(results, peak_gflops=100.0, device="cpu")
    assert "ratio" in table and "pg_tune" in table and "reference" in table


def test_the_verdict_names_a_different_loss_or_adapter(tmp_path):
    def result(side, loss, trainable):
        return bench.SideResult(side, 2, 1.0, 1.0, 1.0, "peak RSS", 1.0, 1.0, 0.5, loss, trainable)

    args = _args(tmp_path, "pg_tune", group_by_length=False)
    same = {"pg_tune": [result("pg_tune", 12.5920, 100)], "reference": [result("reference", 12.5920, 100)]}
    assert bench.same_training(same, args, vocab=262_208)[0]
    # Gemma 3's first losses before the reference supervised the answer only: 12.592 vs 12.536.
    other = {"pg_tune": [result("pg_tune", 12.592, 100)], "reference": [result("reference", 12.536, 100)]}
    proved, verdict = bench.same_training(other, args, vocab=262_208)
    assert not proved and verdict.startswith("NOT the same training")
    zero = {"pg_tune": [result("pg_tune", 12.592, 100)], "reference": [result("reference", 12.592, 0)]}
    proved, verdict = bench.same_training(zero, args, vocab=262_208)
    assert not proved and verdict.startswith("NOT the same adapter")
    grouped = _args(tmp_path, "pg_tune", group_by_length=True)
    assert "not compared" in bench.same_training(other, grouped, vocab=262_208)[1]


def test_step_flops_of_bench_mini_match_the_hand_count():
    # The figure: about 43 GFLOP a step (batch 4, ~287 tokens, 80 supervised), half of it the head.
    config = build_config(PRESETS["bench-mini"])
    total = bench.step_flops(config, batch_size=4, seq_len=287, supervised=80)
    head = 4 * 80 * 256 * 257216
    assert 40e9 < total < 46e9
    assert 0.45 < head / total < 0.52


def test_operator_classes_sum_self_times_by_class():
    """``--ops``' class table: every profiler entry lands in one class by name, the classes add up
    to the profiled time, and the table divides by the number of profiled step passes."""
    from pg_tune.measure.bench_profile import CLASSES, format_classes, operator_class, operator_classes

    assert operator_class("aten::mm") == operator_class("aten::addmm_") == "matrix products"
    assert operator_class("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention kernels"
    assert operator_class("aten::gelu_backward").startswith("activations")
    assert operator_class("aten::exp_") == operator_class("aten::amax") == "softmax and exp"
    assert operator_class("aten::mul") == "other ATen operators"
    assert operator_class("LoraDeltaBackward").startswith("outside ATen")
    entries = [("aten::mm", 6000.0), ("aten::addmm", 1000.0), ("aten::gelu", 1000.0), ("aten::mul", 1500.0)]
    entries += [("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 500.0)]
    totals = operator_classes(entries)
    assert list(totals) == list(CLASSES)
    assert totals["matrix products"] == 7000.0 and totals["attention kernels"] == 0.0
    assert sum(totals.values()) == 10000.0
    table = format_classes(totals, passes=2).splitlines()
    products = next(line for line in table if line.startswith("matrix products"))
    assert products.split()[-2:] == ["3.5", "70.0%"]  # 7,000 us over 2 passes; 70 % of the whole


def test_top_operators_profile_the_timed_steps_only(tmp_path):
    """``bench --profile --ops``: torch.profiler covers the timed steps, not the model's set-up (the
    random initialisation's ``normal_``), and the class table follows the operator table."""
    from pg_tune.measure.bench_profile import CLASSES, top_operators
    from pg_tune.measure.bench_setup import make_samples

    args = _args(tmp_path, "pg_tune", group_by_length=False)
    args.warmup, args.steps = 1, 1
    samples = make_samples(tmp_path, 4)
    text = top_operators(args, samples, "cpu", family_of("tiny-paligemma"), count=500)
    assert "aten::mm" in text and "aten::normal_" not in text
    classes = text[text.index("operator class") :].splitlines()[2:]
    assert [line[:45].strip() for line in classes] == list(CLASSES)
    shares = [float(line.split()[-1].rstrip("%")) for line in classes]
    assert abs(sum(shares) - 100) < 0.5 and shares[0] > 0


def test_profile_times_every_part_of_the_step(tmp_path):
    """``bench --profile``: the step taken apart (data, vision, decoder, head, backward, optimizer)
    and timed whole, each part measured on every timed step; the table names them all."""
    from pg_tune.measure.bench_profile import PARTS, format_profile, profile_pg_tune
    from pg_tune.measure.bench_setup import make_samples

    args = _args(tmp_path, "pg_tune", group_by_length=False)
    args.warmup, args.steps = 1, 2
    samples = make_samples(tmp_path, 4)
    times = profile_pg_tune(args, samples, "cpu", family_of("tiny-paligemma"))
    assert set(times) == {*PARTS, "step"}
    assert all(len(times[part]) == 2 and all(w > 0 and c >= 0 for w, c in times[part]) for part in times)
    table = format_profile(times, args.batch_size)
    assert all(line.split()[0] in (*PARTS, "sum", "step") for line in table.splitlines()[2:])
    assert len(table.splitlines()) == 2 + len(PARTS) + 2
