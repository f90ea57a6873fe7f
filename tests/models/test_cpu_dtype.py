"""A CPU run that asks for bf16/fp16 on a CPU without fast kernels for it is told so, by plan and train."""

from __future__ import annotations

import pytest
import torch

from pg_tune.cli import main
from pg_tune.config.recipe import parse_recipe
from pg_tune.measure.plan import estimate
from pg_tune.models import cpu_dtype
from tests.families import family_of


@pytest.fixture
def cpu_without_fast_bf16(monkeypatch):
    monkeypatch.setattr(cpu_dtype, "fast_on_cpu", lambda kind: False)


@pytest.fixture
def cpu_with_fast_bf16(monkeypatch):
    monkeypatch.setattr(cpu_dtype, "fast_on_cpu", lambda kind: True)


def test_the_check_is_torchs_own_where_it_has_one():
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN bf16 check")
    cpu_dtype.fast_on_cpu.cache_clear()
    assert cpu_dtype.fast_on_cpu("bf16") == bool(check())


def test_the_note_names_each_16_bit_key_and_nothing_else(cpu_without_fast_bf16):
    note = cpu_dtype.slow_dtype_note(
        {
            "model.dtype": "bfloat16",
            "train.mixed_precision": "no",
            "quantization.bnb_4bit_compute_dtype": "float16",
        }
    )
    assert "model.dtype=bfloat16" in note and "quantization.bnb_4bit_compute_dtype=float16" in note
    assert "mixed_precision" not in note and "slow fallback" in note
    assert cpu_dtype.slow_dtype_note({"model.dtype": "float32", "train.mixed_precision": "auto"}) is None


def test_no_note_where_the_cpu_has_the_kernels(cpu_with_fast_bf16):
    assert cpu_dtype.slow_dtype_note({"model.dtype": "bfloat16", "train.mixed_precision": "bf16"}) is None


def _recipe(tmp_path, **model):
    return parse_recipe(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name_or_path": "tiny-paligemma2", **model},
            "data": {"train": [{"format": "shapes", "num_samples": 4}], "max_text_length": 16},
            "train": {"max_steps": 1, "batch_size": 2, "log_every": 1},
            "eval": {"before_training": False},
        }
    )


def test_a_cpu_plan_says_so_and_a_gpu_plan_does_not(tmp_path, cpu_without_fast_bf16):
    recipe = _recipe(tmp_path, dtype="bfloat16")
    notes = estimate(recipe, family_of(recipe), "cpu", runtime=0.0).notes
    assert any("model.dtype=bfloat16" in n and "no fast 16-bit" in n for n in notes)
    assert not any("no fast 16-bit" in n for n in estimate(recipe, family_of(recipe), "cuda").notes)
    # auto is float32 on a CPU: nothing to say.
    plain = _recipe(tmp_path)
    assert not any("no fast 16-bit" in n for n in estimate(plain, family_of(plain), "cpu", runtime=0.0).notes)


def test_training_on_such_a_cpu_warns_before_it_starts(tmp_path, cpu_without_fast_bf16, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        "model: {name_or_path: tiny-paligemma2, dtype: bfloat16}\n"
        "data: {train: [{format: shapes, num_samples: 4}], max_text_length: 16}\n"
        "train: {max_steps: 1, batch_size: 2, log_every: 1}\n"
        "eval: {before_training: false}\n"
    )
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "warning: this CPU" in out and "model.dtype=bfloat16 runs torch's slow fallback" in out
