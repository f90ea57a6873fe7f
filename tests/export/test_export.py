"""Merged export: parity with base + adapter, a folder that loads with from_pretrained alone."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from pg_tune.config.recipe import parse_recipe, resolved
from pg_tune.export.merged import ExportError, export_merged, read_run


def make_run(out_dir, checkpoint, quantization: str = "none"):
    """A real training run folder: 2 steps of LoRA (or QLoRA) on the saved tiny checkpoint."""
    from pg_tune.cli.train import run_training

    recipe = parse_recipe(
        {
            "output_dir": str(out_dir),
            "model": {"name_or_path": str(checkpoint), "dtype": "float32"},
            "quantization": {"mode": quantization, "bnb_4bit_compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {
                "train": [{"format": "shapes", "num_samples": 16}],
                "eval": [{"format": "shapes", "num_samples": 4}],
            },
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
            "eval": {"max_new_tokens": 4},
        }
    )
    run_training(recipe, resolved(recipe))
    return out_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_checkpoint):
    return make_run(tmp_path_factory.mktemp("run-lora"), tiny_checkpoint)


@pytest.mark.slow
def test_export_parity_and_folder_loads_alone(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    report = export_merged(lora_run, out, dtype="fp32", parity="full")
    printed = capsys.readouterr().out
    assert "parity (merged fp32 vs base + adapter fp32): max |Δlogit|" in printed and "parity: OK" in printed
    parity, effect = report["parity_fp32"], report["adapter_effect"]
    assert parity["max_abs_diff"] <= parity["tolerance"] and parity["top1_agreement"] == 1.0
    # The check is only meaningful because the adapter moves the logits far beyond its tolerance.
    assert effect["max_abs_diff"] > 20 * parity["tolerance"]
    assert json.loads((out / "export_report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    # The folder is self-sufficient: plain transformers, no peft, no pg_tune.
    model = PaliGemmaForConditionalGeneration.from_pretrained(out)
    processor = PaliGemmaProcessor.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    # ... and it equals base + adapter loaded with peft, on the run's own prompt.
    run = read_run(lora_run)
    base = PaliGemmaForConditionalGeneration.from_pretrained(run.recipe.model.name_or_path)
    reference = peft.PeftModel.from_pretrained(base, run.adapter_dir).eval()
    from PIL import Image

    inputs = processor(
        text="caption en", images=Image.new("RGB", (112, 112), (220, 40, 40)), return_tensors="pt"
    )
    with torch.no_grad():
        got, want = model(**inputs).logits, reference(**inputs).logits
    torch.testing.assert_close(got, want, atol=parity["tolerance"], rtol=0)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## Export parity" in card


@pytest.mark.slow
def test_export_bf16_reports_cast_and_refuses_non_empty_out(lora_run, tmp_path):
    from pg_tune.cli import main

    out = tmp_path / "bf16"
    assert (
        main(
            [
                "export",
                str(lora_run),
                "--out",
                str(out),
                "--dtype",
                "bf16",
                "--samples",
                "2",
                "--parity",
                "full",
            ]
        )
        == 0
    )
    report = json.loads((out / "export_report.json").read_text())
    assert report["samples"] == 2 and report["cast"]["max_abs_diff"] > report["parity_fp32"]["max_abs_diff"]
    model = PaliGemmaForConditionalGeneration.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    with pytest.raises(ExportError, match="not empty"):
        export_merged(lora_run, out)
    assert main(["export", str(lora_run), "--out", str(out)]) == 2


@pytest.mark.slow
def test_broken_merge_fails_parity_and_writes_nothing(lora_run, tmp_path, monkeypatch):
    original = peft.tuners.lora.LoraModel.merge_and_unload

    def merge_twice_the_update(self, *args, **kwargs):
        for module in self.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.scaling = {k: 2 * v for k, v in module.scaling.items()}
        return original(self, *args, **kwargs)

    monkeypatch.setattr(peft.tuners.lora.LoraModel, "merge_and_unload", merge_twice_the_update)
    out = tmp_path / "broken"
    with pytest.raises(ExportError, match="differs from base \\+ adapter"):
        export_merged(lora_run, out, parity="full")
    assert not out.exists()


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ExportError, match="adapter_config.json is missing"):
        read_run(tmp_path)
    with pytest.raises(ExportError, match="--dtype"):
        export_merged(tmp_path, tmp_path / "o", dtype="int4")


@pytest.mark.slow
def test_qlora_export_merges_into_full_precision_and_reports_the_gap(tmp_path, tiny_checkpoint, capsys):
    run = make_run(tmp_path / "run", tiny_checkpoint, quantization="4bit")
    report = export_merged(run, tmp_path / "merged", dtype="fp32", num_samples=2, parity="full")
    printed = capsys.readouterr().out
    assert "QLoRA gap (4bit base + adapter, as trained, vs merged fp32)" in printed
    gap = report["quantized_vs_merged"]
    # The merge happened in full precision (parity holds) and 4-bit rounding is a visible, reported gap.
    assert report["parity_fp32"]["max_abs_diff"] <= report["parity_fp32"]["tolerance"] < gap["max_abs_diff"]
    model = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules())
    assert "4bit base + adapter (as trained)" in (tmp_path / "merged" / "README.md").read_text()
