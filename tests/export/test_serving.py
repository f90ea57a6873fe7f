"""Exports that serving engines load, and `pg-tune export --check serving` per family x engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
from jinja2.exceptions import TemplateError

from pg_tune.cli import main
from pg_tune.config.recipe import LoraConfig, ModelConfig, parse_recipe, resolved
from pg_tune.export.merged import export_merged
from pg_tune.export.serving import ENGINES, adapter_facts, check_serving, export_problems, serving_report
from pg_tune.models.family import family_for, family_names
from tests.families import family_of

PRESETS = {"paligemma": "tiny-paligemma2", "gemma3": "tiny-gemma3", "smolvlm": "tiny-smolvlm2"}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def _adapter(preset: str, out: Path, *, vision=False, r=4, use_dora=False, modules_to_save=None) -> Path:
    """A peft LoRA adapter on the tiny preset, targets from the family (as training picks them)."""
    family = family_for(preset)
    model = family.tiny_module.build_base(preset)
    model.name_or_path = preset  # what peft writes as base_model_name_or_path
    targets = family.lora_target_regex(LoraConfig(r=r, targets="attention_mlp", vision=vision))
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=use_dora,
                             modules_to_save=modules_to_save)  # fmt: skip
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.parametrize("family_name", sorted(PRESETS))
def test_check_serving_reads_what_the_adapter_trains(family_name, tmp_path):
    preset = PRESETS[family_name]
    family = family_for(preset)
    lm_only = adapter_facts(_adapter(preset, tmp_path / "lm"), family)
    assert lm_only.modules["language_model"] and not lm_only.modules["vision"] and lm_only.rank == 4
    verdicts = {v.engine: v for v in check_serving(tmp_path, family, lm_only, preset, None, "mine")}
    vllm = verdicts["vLLM"]
    assert vllm.adapter[0] and f"vllm serve {preset} --enable-lora --lora-modules mine=" in vllm.adapter[1]
    assert "--max-lora-rank 8" in vllm.adapter[1]  # the smallest of vLLM's ranks >= 4
    assert ("--chat-template" in vllm.adapter[1]) == (family.serving_chat_template(None) is not None)
    for engine, verdict in verdicts.items():
        support = family.serving_engines[{v: k for k, v in ENGINES.items()}[engine]]
        assert verdict.export[0] == support.serves and verdict.source == support.source
        if engine != "vLLM":
            assert verdict.adapter[0] is False  # SGLang and TGI document no LoRA for these models

    tower = adapter_facts(_adapter(preset, tmp_path / "vision", vision=True), family)
    assert tower.modules["vision"]
    (vllm,) = [v for v in check_serving(tmp_path, family, tower, preset, None, "m") if v.engine == "vLLM"]
    assert vllm.adapter[0] is False and "LoRA on the vision tower / projector" in vllm.adapter[1]
    assert vllm.adapter[1].endswith("merge first") and vllm.export[0]
    report = serving_report(
        tmp_path / "vision"
    )  # the command on an adapter folder: its base from adapter_config
    assert f"adapter {tmp_path / 'vision'}, model family {family_name}" in report and "merge first" in report


def test_check_serving_refuses_dora_trained_modules_and_huge_ranks(tmp_path):
    family = family_for("tiny-paligemma2")

    def vllm_says(path):
        facts = adapter_facts(path, family)
        return next(
            v for v in check_serving(path, family, facts, "tiny-paligemma2", None, "m") if v.engine == "vLLM"
        )

    dora = vllm_says(_adapter("tiny-paligemma2", tmp_path / "dora", use_dora=True))
    assert dora.adapter == (False, "DoRA: vLLM does not yet support DoRA: merge first")
    head = vllm_says(
        _adapter("tiny-paligemma2", tmp_path / "head", modules_to_save=["multi_modal_projector"])
    )
    assert not head.adapter[0] and "vLLM only supports modules_to_save being None" in head.adapter[1]
    wide = vllm_says(_adapter("tiny-paligemma2", tmp_path / "wide", r=640))
    assert not wide.adapter[0] and "rank 640 > 512" in wide.adapter[1]


def test_the_readiness_table_in_the_docs_is_the_families_own():
    """docs/serving.md's family x engine table says what ``ModelFamily.serving_engines`` says."""
    text = DOCS.read_text(encoding="utf-8")
    for name in family_names():
        family = family_for(name)
        row = re.search(rf"^\| `{name}` \|(.+)\|$", text, re.M)
        assert row, f"no row for {name} in {DOCS.name}"
        cells = [c.strip() for c in row.group(1).split("|")]
        for cell, engine in zip(cells, ENGINES, strict=True):
            support = family.serving_engines[engine]
            expected = "no" if not support.serves else (
                ("merged or LoRA (language model)" if support.lora else "merged") + ("" if support.chat else ", no chat")
            )  # fmt: skip
            assert cell == expected, f"{name} / {engine}: docs say {cell!r}, the family says {expected!r}"


def _train(preset: str, out: Path) -> Path:
    from pg_tune.train.loop import train

    recipe = parse_recipe(
        {
            "output_dir": str(out),
            "model": {"name_or_path": preset, "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "attention", "vision": preset == "tiny-paligemma2"},
            "data": {"train": [{"format": "shapes", "num_samples": 4}], "max_text_length": 32},
            "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-2},
            "eval": {"before_training": False},
        }
    )  # fmt: skip
    train(recipe, resolved(recipe), family_of(recipe))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family_name", sorted(PRESETS))
def test_exports_carry_the_chat_template_and_end_tokens_engines_need(family_name, tmp_path, capsys):
    preset = PRESETS[family_name]
    run = _train(preset, tmp_path / "run")
    out = tmp_path / "export"
    export_merged(run, out, dtype="fp32")
    family = family_for(str(out))
    processor = family.load_processor(ModelConfig(name_or_path=str(out)))
    assert export_problems(out, family) == []
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == family.generation_kwargs(processor)["eos_token_id"]
    assert (out / "preprocessor_config.json").is_file() or (out / "processor_config.json").is_file()
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption en"}]}]
    rendered = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    if family.serving_chat_template(None) is not None:  # PaliGemma: the prompt passes through, nothing added
        assert (out / "chat_template.jinja").is_file() and rendered == "caption en"
        assert processor.tokenizer.apply_chat_template(user, tokenize=False) == "caption en"
        with pytest.raises(TemplateError, match="one user message"):
            processor.apply_chat_template([{"role": "system", "content": "be brief"}, *user], tokenize=False)
    else:  # the chat families keep their processor's own template
        assert "caption en" in rendered and rendered != "caption en"
    capsys.readouterr()

    assert main(["export", str(run), "--check", "serving"]) == 0
    report = capsys.readouterr().out
    assert f"model family {family_name}" in report and "no engine was run here" in report
    assert main(["export", str(out), "--check", "serving"]) == 0
    report = capsys.readouterr().out
    assert "export files: complete" in report and f"vllm serve {out} --served-model-name export" in report
    (out / "generation_config.json").unlink()
    assert "generation_config.json is missing" in serving_report(out)


def test_export_needs_out_unless_checking(capsys, tmp_path):
    assert main(["export", str(tmp_path)]) == 2
    assert "--out DIR is required (or --check serving)" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--check", "serving"]) == 2
    assert "not a run folder, an adapter folder or an exported model folder" in capsys.readouterr().err
