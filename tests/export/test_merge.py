"""Streaming export: shard-by-shard merge equals peft's in-memory merge; per-module parity bites."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import yaml
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from pg_tune.config.recipe import parse_recipe, resolved
from pg_tune.export.merged import ExportError, export_merged
from pg_tune.export.stream import LoraUpdate, merge_weight, module_parity, read_adapter
from pg_tune.models.paligemma import PaliGemmaFamily
from tests.numerics import assert_close_to_scale


def _adapter_run(run_dir, checkpoint, *, use_rslora=False, use_dora=False, modules_to_save=None, seed=1):
    """A run folder (recipe.yaml + adapter/) whose LoRA B matrices are random, not zero, so every
    merged module really changes. No training: this is about the merge, not the loop."""
    recipe = parse_recipe(
        {
            "output_dir": str(run_dir),
            "model": {"name_or_path": str(checkpoint), "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": modules_to_save or []},
            "data": {"train": [{"format": "shapes", "num_samples": 4}]},
        }
    )
    base = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint)
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=PaliGemmaFamily().lora_target_regex(recipe.lora),
        modules_to_save=modules_to_save,
        init_lora_weights=False,  # random A and B: a visible update
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    model = peft.get_peft_model(base, config)
    if modules_to_save:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p))
    model.save_pretrained(run_dir / "adapter")
    PaliGemmaProcessor.from_pretrained(checkpoint).save_pretrained(run_dir / "adapter")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved(recipe), sort_keys=False))
    return run_dir


def _in_memory_merge(run_dir, checkpoint) -> dict[str, torch.Tensor]:
    base = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload().state_dict()


@pytest.mark.parametrize(
    "variant",
    [
        "lora",
        pytest.param("rslora_modules_to_save", marks=pytest.mark.slow),
        pytest.param("dora", marks=pytest.mark.slow),
    ],
)
def test_streamed_export_equals_in_memory_merge_and_loads_alone(tmp_path, tiny_checkpoint, variant, capsys):
    kwargs = {
        "lora": {},
        "rslora_modules_to_save": {"use_rslora": True, "modules_to_save": ["multi_modal_projector"]},
        "dora": {"use_dora": True},
    }[variant]
    run = _adapter_run(tmp_path / "run", tiny_checkpoint, **kwargs)
    out = tmp_path / "merged"
    report = export_merged(run, out, dtype="fp32")
    printed = capsys.readouterr().out
    modules = report["parity_modules"]
    # 2 layers x 7 linears (attention + MLP) of the language model.
    assert modules["modules_merged"] == modules["modules_checkable"] == 14
    assert "14 modules OK" in printed and (out / "export_report.json").is_file()
    # The folder is self-sufficient: processor files, model card, plain from_pretrained.
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "processor_config.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    assert "merged linear layers was checked on random inputs" in (out / "README.md").read_text()
    PaliGemmaProcessor.from_pretrained(out)
    streamed = PaliGemmaForConditionalGeneration.from_pretrained(out).state_dict()
    expected = _in_memory_merge(run, tiny_checkpoint)
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        # Same fp32 arithmetic up to summation order (peft: W + (B @ A) * s; here W + s * (B @ A)).
        assert_close_to_scale(streamed[name], tensor, rel=64 * torch.finfo(torch.float32).eps, msg=name)
    base = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    changed = [n for n in expected if not torch.equal(base[n], streamed[n])]
    assert len(changed) == 14 + (2 if "modules_to_save" in kwargs else 0), changed


def test_bf16_export_casts_and_reports(tmp_path, tiny_checkpoint):
    from pg_tune.cli import main

    run = _adapter_run(tmp_path / "run", tiny_checkpoint)
    out = tmp_path / "bf16"
    assert main(["export", str(run), "--out", str(out), "--dtype", "bf16"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"] == "module" and 0 < report["parity_modules"]["cast_worst_rel"]["rel"] < 1e-2
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert PaliGemmaForConditionalGeneration.from_pretrained(out).dtype == torch.bfloat16
    assert main(["export", str(run), "--out", str(out)]) == 2  # refuses a non-empty --out


def test_broken_merge_fails_loudly_and_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    run = _adapter_run(tmp_path / "run", tiny_checkpoint)

    def merge_twice_the_update(weight, update):
        return weight.float() + 2 * update.delta()

    monkeypatch.setattr("pg_tune.export.stream.merge_weight", merge_twice_the_update)
    out = tmp_path / "broken"
    with pytest.raises(
        ExportError, match=r"merged output differs from base \+ adapter by .* nothing was written"
    ):
        export_merged(run, out)
    assert not out.exists() and not (tmp_path / "broken.partial").exists()


def test_adapter_of_another_base_is_refused(tmp_path, tiny_checkpoint):
    from pg_tune.models.paligemma.shapes import shape_config, write_checkpoint

    narrower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    other = tmp_path / "other"
    write_checkpoint(
        shape_config("paligemma-3b-224", {**narrower, "head_dim": 16, "intermediate_size": 64}), other, 224
    )
    run = _adapter_run(tmp_path / "run", tiny_checkpoint)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = str(other)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # Past the by-name check (read_run): the run claims this base, the tensors say otherwise.
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(other)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ExportError, match=r"the adapter's update is \[64, \d+\] but .* holds \[32, \d+\]"):
        export_merged(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_module_parity_tolerance_is_tight_enough_to_see_a_small_update():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 2304, generator=g) * 0.02
    update = LoraUpdate(torch.randn(8, 2304, generator=g) * 0.02, torch.randn(64, 8, generator=g) * 1e-3, 2.0)
    good = module_parity(weight, merge_weight(weight, update), update, g)
    assert good["max_abs_diff"] <= good["tolerance"] < good["update_effect"]
    bad = module_parity(weight, weight.clone(), update, g)  # the update forgotten
    assert bad["max_abs_diff"] > bad["tolerance"]


def test_read_adapter_scales(tmp_path, tiny_checkpoint):
    run = _adapter_run(tmp_path / "run", tiny_checkpoint, use_rslora=True)
    adapter = read_adapter(run / "adapter")
    update = next(iter(adapter.updates.values()))
    assert update.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert all(name.startswith("model.language_model.layers.") for name in adapter.updates)


def test_shard_writer_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from pg_tune.export.stream import ShardReader, ShardWriter

    tensors = {
        "a.weight": torch.randn(3, 5).to(torch.bfloat16),
        "b.bias": torch.randn(7),
        "c.ids": torch.arange(4),
        "d.mask": torch.tensor([True, False, True]),
        "e.empty": torch.empty(0, 2),
        "f.scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "in.safetensors")
    reader = ShardReader(tmp_path / "in.safetensors")
    writer = ShardWriter(tmp_path / "out.safetensors", reader.layout())
    for key, _, _ in reader.layout():
        writer.write(key, reader.read(key))
    writer.finish()
    reader.close()
    back = load_file(tmp_path / "out.safetensors")  # safetensors' own reader accepts the file
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
