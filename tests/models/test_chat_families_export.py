"""Gemma 3 and SmolVLM2: QLoRA on CPU (bitsandbytes), merged export parity, batched generation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pg_tune.config.recipe import ModelConfig, QuantizationConfig, parse_recipe, resolved
from pg_tune.data import Sample
from pg_tune.export.merged import export_merged
from pg_tune.models.chat import gemma3_tiny, smolvlm_tiny
from pg_tune.models.family import family_for
from tests.families import family_of

TINY = {"tiny-gemma3": gemma3_tiny, "tiny-smolvlm2": smolvlm_tiny}


@pytest.fixture(scope="module", params=sorted(TINY))
def checkpoint(request, tmp_path_factory):
    """The family's tiny preset saved in the hub's layout (QLoRA needs weights on disk)."""
    return TINY[request.param].save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def _run(out_dir, checkpoint, quantization: str):
    from pg_tune.train.loop import train

    recipe = parse_recipe(
        {
            "output_dir": str(out_dir),
            "model": {"name_or_path": str(checkpoint), "dtype": "float32"},
            "quantization": {"mode": quantization, "bnb_4bit_compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "attention_mlp"},
            "data": {
                "train": [{"format": "shapes", "num_samples": 8}],
                "eval": [{"format": "shapes", "num_samples": 2}],
                "max_text_length": 32,
            },
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
            "eval": {"max_new_tokens": 4, "before_training": False},
        }
    )
    return train(recipe, resolved(recipe), family_of(recipe))


@pytest.mark.slow
def test_qlora_trains_and_exports_with_parity(checkpoint, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    family = family_for(str(checkpoint))
    q = QuantizationConfig(mode="4bit", bnb_4bit_compute_dtype="float32")
    from pg_tune.models.quantize import check_quantized

    report = check_quantized(family.load_model(ModelConfig(str(checkpoint), dtype="float32"), q), q, family)
    # 2 decoder layers x 7 linears; the vision encoder, the projector and the head stay fp32.
    assert len(report.quantized) == 14
    assert all(n.startswith(family.modules.language_model + ".") for n in report.quantized)

    result = _run(tmp_path / "run", checkpoint, "4bit")
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))
    out = tmp_path / "merged"
    exported = export_merged(tmp_path / "run", out, dtype="fp32", num_samples=2, parity="full")
    printed = capsys.readouterr().out
    assert "parity: OK" in printed and "QLoRA gap" in printed
    parity = exported["parity_fp32"]
    assert parity["max_abs_diff"] <= parity["tolerance"] and parity["top1_agreement"] == 1.0
    assert exported["adapter_effect"]["max_abs_diff"] > 20 * parity["tolerance"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == family.model_types[0]

    # The folder loads with transformers alone (the model class; the processor through the family
    # only where torchvision is missing for SmolVLM's video part).
    merged = family.model_class.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    processor = family.load_processor(ModelConfig(str(out)))
    sample = Sample(Image.new("RGB", (90, 60), (220, 40, 40)), "caption en", "a red square", "t")
    batch = family.collator(processor, 32, train=False)([(0, sample)])
    with torch.no_grad():
        logits = merged(**family.generation_inputs(batch, torch.float32)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_batched_generation_equals_one_by_one(checkpoint):
    """Left padding, token types and padding tiles do not change what each row generates."""
    from pg_tune.evaluate.generate import generate

    family = family_for(str(checkpoint))
    processor = family.load_processor(ModelConfig(str(checkpoint)))
    sizes = [(90, 60), (40, 70), (30, 30), (112, 112)]
    samples = [
        Sample(Image.new("RGB", size, colour), prompt, "", f"s{i}")
        for i, (size, colour, prompt) in enumerate(
            zip(
                sizes,
                [(220, 40, 40), (40, 170, 60), (40, 70, 220), (235, 200, 30)],
                ["caption en", "answer en what shape is it?", "caption en", "ocr"],
                strict=True,
            )
        )
    ]
    # The tiny tied models echo their last input token ("\n"); a random final norm makes greedy
    # outputs long, arbitrary and input-dependent, so a padding / mask / token-type leak would show.
    model = family.load_model(ModelConfig(str(checkpoint), dtype="float32")).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.get_submodule(family.modules.language_model + ".norm").weight, std=2.0)
    kwargs = {"max_text_length": 32, "max_new_tokens": 6, "batch_size": 4}
    batched = generate(model, processor, samples, family=family, **kwargs)
    one_by_one = [
        generate(model, processor, [s], family=family, **{**kwargs, "batch_size": 1})[0] for s in samples
    ]
    assert batched == one_by_one
    assert all(batched) and len(set(batched)) > 1  # real generations that differ between rows
