"""`pg-tune validate` refuses what training would refuse (issue 22.4, 22.8, 22.11-22.14): one line naming
the dotted key and what to do; settings the chosen method ignores are named in a warning."""

from __future__ import annotations

import pytest
import yaml

from pg_tune.cli import main
from pg_tune.config import ConfigError, load_recipe

BASE = {
    "output_dir": "runs/x",
    "model": {"name_or_path": "tiny-paligemma2"},
    "data": {
        "train": [{"format": "shapes", "num_samples": 4}],
        "eval": [{"format": "shapes", "num_samples": 2}],
    },
}
SAMPLES = "data_formats/samples"


def _validate(tmp_path, capsys, data: dict, *overrides: str) -> tuple[int, str, str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code = main(["validate", str(recipe), *overrides])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seed=-1", r"train.seed: must be in \[0, 4294967295\] \(numpy and torch seeds are 32-bit\), got -1"),
        ("train.seed=4294967296", r"train.seed: must be in \[0, 4294967295\]"),
        ("train.max_steps=100000000000000000000000000", r"train.max_steps: must be <= 1000000000, got 1000000000000"),
        ("train.batch_size=1000000000000000000000", r"train.batch_size: must be <= 65536, got 1000000000000000000000 \(the per-process micro-batch\)"),
        ("train.grad_accum=100000000", r"train.grad_accum: must be <= 65536"),
        ("train.epochs=10000000000", r"train.epochs: must be <= 1000000000"),
        ("eval.batch_size=1000000000000", r"eval.batch_size: must be <= 65536"),
        ("lora.r=1000000000", r"lora.r: must be <= 65536"),
        ("data.max_text_length=100000000", r"data.max_text_length: must be <= 1048576"),
        ("eval.min_delta=.inf", r"eval.min_delta: must be a finite number >= 0, got inf"),
        ("eval.min_delta=.nan", r"eval.min_delta: must be a finite number >= 0, got nan"),
        ("data.train.0.weight=.nan", r"data.train\[0\].weight: must be a finite number > 0 \(a repeat factor\), got nan"),
        ("data.train.0.weight=.inf", r"data.train\[0\].weight: must be a finite number > 0 \(a repeat factor\), got inf"),
        ("data.train.0.weight=1.0e6", r"data.train\[0\].weight: 1000000.0 is a repeat factor \(every row shown that many times an epoch\); at most 1000"),
        ("data.train.0.weight=heavy", r"data.train\[0\].weight: expected a number, got 'heavy'"),
    ],
)  # fmt: skip
def test_values_training_cannot_use_fail_validate(tmp_path, capsys, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, BASE), [override])
    code, _, err = _validate(tmp_path, capsys, BASE, override)
    assert code == 2 and err.count("\n") == 1


def _write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_weight_yaml_reads_as_a_string_is_read_as_the_number_it_is(tmp_path):
    """YAML 1.1 reads `2.5e2` (no sign in the exponent) as a string, as it does `1e-4`."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE).replace("num_samples: 4", "num_samples: 4\n    weight: 2.5e2"))
    assert yaml.safe_load(path.read_text())["data"]["train"][0]["weight"] == "2.5e2"
    recipe, resolved = load_recipe(path)
    assert recipe.data.train[0].weight == 250.0 and resolved["data"]["train"][0]["weight"] == 250.0
    assert load_recipe(path, ["train.seed=4294967295"])[0].train.seed == 4294967295


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        (["method=full", "lora.use_dora=true"], "warning: lora.use_dora=true is ignored by method=full (only method=lora reads the lora section)"),
        (["method=full", "lora.r=8"], "warning: lora.r=8 is ignored by method=full"),
        (["partial.groups=[mlp]"], "warning: partial.groups=['mlp'] is ignored by method=lora (only method=partial reads the partial section)"),
        (["full.vision=true"], "warning: full.vision=true is ignored by method=lora (only method=full reads the full section)"),
        (["method=partial", "full.vision=true"], "warning: full.vision=true is ignored by method=partial"),
        (["quantization.bnb_4bit_quant_type=fp4"], "warning: quantization.bnb_4bit_quant_type='fp4' is ignored by quantization.mode=none"),
        (["eval.min_delta=0.1"], "warning: eval.min_delta=0.1 is ignored without eval.best_metric"),
    ],
)  # fmt: skip
def test_settings_the_method_ignores_are_named(tmp_path, capsys, overrides, warning):
    code, out, _ = _validate(tmp_path, capsys, BASE, *overrides)
    assert code == 0 and warning in out
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [
        line for line in out.splitlines() if warning in line
    ]  # one line, that key only
    code, out, _ = _validate(tmp_path, capsys, BASE)
    assert code == 0 and "warning" not in out


@pytest.mark.parametrize(
    ("entry", "overrides", "message"),
    [
        ({"format": "hf", "path": "train-*.parquet", "streaming": True}, ["data.group_by_length=true"],
         r"data.group_by_length: not available with a streamed training entry \(data.train\[0\] streams\)"),
        ({"format": "hf", "path": "train-*.parquet", "streaming": True}, ["data.feature_cache=cache"],
         r"data.feature_cache: not available with a streamed training entry \(data.train\[0\] streams\)"),
        ({"format": "hf", "path": f"{SAMPLES}/hf/docs", "split": "train", "streaming": True}, [],
         r"data.train\[0\].streaming: data_formats/samples/hf/docs is a save_to_disk folder, memory-mapped already"),
    ],
)  # fmt: skip
def test_streaming_combinations_training_refuses_fail_validate(tmp_path, capsys, entry, overrides, message):
    data = {**BASE, "data": {"train": [entry]}}
    code, _, err = _validate(tmp_path, capsys, data, *overrides)
    assert code == 2 and err.count("\n") == 1
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, data), overrides)


def test_a_streamed_eval_entry_without_limit_fails_validate(tmp_path, capsys):
    stream = {"format": "hf", "path": "val-*.parquet", "streaming": True}
    data = {**BASE, "data": {"train": BASE["data"]["train"], "eval": [stream]}}
    code, _, err = _validate(tmp_path, capsys, data)
    assert code == 2
    assert (
        "data.eval[0].limit: a streamed eval entry needs limit (evaluation reads its first limit rows)" in err
    )
    assert _validate(tmp_path, capsys, data, "data.eval.0.limit=8")[0] == 0


def test_qlora_on_a_tiny_preset_fails_validate_with_the_fix(tmp_path, capsys):
    code, _, err = _validate(tmp_path, capsys, BASE, "quantization.mode=4bit")
    assert code == 2 and err.count("\n") == 1
    assert "quantization.mode: '4bit' needs the base as a checkpoint on disk" in err
    assert "python -m pg_tune.models.tiny DIR --preset tiny-paligemma2" in err


@pytest.mark.parametrize("model", ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2"])
def test_the_text_budget_is_checked_against_the_context_at_validate(tmp_path, capsys, model):
    code, out, err = _validate(
        tmp_path, capsys, BASE, f"model.name_or_path={model}", "data.max_text_length=9001"
    )
    assert code == 2 and err.count("\n") == 1, out + err
    assert (
        "data.max_text_length=9001: with up to " in err
        and "past the model's context of 8192 positions" in err
    )
    allowed = int(err.split("set data.max_text_length to at most ")[1].split()[0].rstrip(";,."))
    assert (
        _validate(tmp_path, capsys, BASE, f"model.name_or_path={model}", f"data.max_text_length={allowed}")[0]
        == 0
    )
    assert (
        _validate(
            tmp_path, capsys, BASE, f"model.name_or_path={model}", f"data.max_text_length={allowed + 1}"
        )[0]
        == 2
    )


def test_the_text_budget_is_checked_by_data_validate(tmp_path, capsys):
    path = _write(tmp_path, BASE)
    assert main(["data", "validate", str(path), "data.max_text_length=9001"]) == 2
    err = capsys.readouterr().err
    assert "past the model's context of 8192 positions" in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_text_budget_is_checked_by_training_on_the_loaded_model(tmp_path, capsys):
    """The loop checks the model it loaded (a recipe changed in code after validation, too)."""
    from pg_tune.train.loop import train
    from tests.families import family_of

    recipe, resolved = load_recipe(_write(tmp_path, {**BASE, "output_dir": str(tmp_path / "run")}))
    recipe.data.max_text_length = 9001
    with pytest.raises(
        ConfigError, match=r"data.max_text_length=9001: with up to \d+ image and template tokens"
    ):
        train(recipe, resolved, family_of(recipe))
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(
    ("overrides", "what"),
    [
        (["lora.vision=true"], "lora.vision=true"),
        (["method=full"], "method=full (it trains the projector)"),
        (
            ["method=partial", "partial.groups=[attention, projector]"],
            "partial.groups=['attention', 'projector']",
        ),
    ],
)
def test_a_feature_cache_with_a_trained_vision_side_fails_validate(tmp_path, capsys, overrides, what):
    code, _, err = _validate(tmp_path, capsys, BASE, "data.feature_cache=cache", *overrides)
    assert code == 2 and f"data.feature_cache: {what} trains what produces the image features" in err
    assert _validate(tmp_path, capsys, BASE, "data.feature_cache=cache")[0] == 0
