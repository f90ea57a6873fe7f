"""pg-tune plan: exact parts are exact, the activation model matches what autograd really saves."""

from __future__ import annotations

import pytest
import torch

from pg_tune.config.recipe import parse_recipe
from pg_tune.measure.plan import estimate, parse_memory, suggest_micro_batch
from tests.families import family_of

IMAGE_TOKEN_ID = 257152


def _recipe(preset: str, **train):
    return parse_recipe(
        {
            "output_dir": "/tmp/unused",
            "model": {"name_or_path": preset, "dtype": train.pop("dtype", "float32")},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention_mlp"},
            "data": {"train": [{"format": "shapes"}], "max_text_length": 32},
            "train": {"batch_size": 2, **train},
        }
    )


def _part(plan, name: str) -> float:
    return next(p.bytes for p in plan.parts if p.name.startswith(name))


def _prepared(recipe):
    from pg_tune.models.family import resolve_dtype
    from pg_tune.models.paligemma.tiny import build_base
    from pg_tune.train.adapters import prepare_model

    model = build_base(recipe.model.name_or_path).to(resolve_dtype(recipe.model.dtype))
    return prepare_model(model, recipe, family_of(recipe)).train()


def test_weights_lora_gradients_and_optimizer_are_exact():
    recipe = _recipe("tiny-paligemma2")
    plan = estimate(recipe, family_of(recipe), device="cuda")
    model = _prepared(recipe)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert _part(plan, "base weights") == base * 4  # fp32
    assert _part(plan, "LoRA weights") == _part(plan, "gradients") == trainable * 4
    assert _part(plan, "optimizer states") == trainable * 8
    assert all(p.name != "runtime (imports)" for p in plan.parts)  # CPU only


def _saved_activation_bytes(recipe) -> int:
    """Bytes autograd keeps for backward in one pg_tune training forward (parameters excluded)."""
    from pg_tune.train.loss import SuffixLoss

    model = _prepared(recipe)
    config = model.get_base_model().config
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    batch, text = recipe.train.batch_size, recipe.data.max_text_length
    length = image_tokens + text
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (batch, length))
    ids[:, :image_tokens] = IMAGE_TOKEN_ID
    labels = torch.full((batch, length), -100)
    labels[:, -20:] = ids[:, -20:]
    token_type_ids = (labels != -100).long()
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": token_type_ids,
        "labels": labels,
        "pixel_values": torch.randn(
            batch, 3, config.vision_config.image_size, config.vision_config.image_size
        ),
    }
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SuffixLoss(model, family_of(model))(inputs)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("preset", "dtype"),
    [("tiny-paligemma2", "float32"), ("tiny-paligemma2", "bfloat16"), ("tiny-paligemma", "bfloat16")],
)
def test_activation_estimate_matches_what_autograd_saves(preset, dtype):
    # Gemma 2 runs eager attention (scores kept), Gemma SDPA; bf16 bases cast each LoRA input to fp32.
    recipe = _recipe(preset, dtype=dtype)
    estimated = _part(estimate(recipe, family_of(recipe), device="cuda"), "activations")
    measured = _saved_activation_bytes(recipe)
    # The model leaves out small per-model tensors (rotary cos/sin, masks, the head's rows): 15 %.
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


def test_checkpointing_keeps_layer_inputs_only():
    plain, checkpointed = _recipe("tiny-paligemma2"), _recipe("tiny-paligemma2", gradient_checkpointing=True)
    est_plain = _part(estimate(plain, family_of(plain), device="cuda"), "activations")
    est_ckpt = _part(estimate(checkpointed, family_of(checkpointed), device="cuda"), "activations")
    layers = 2
    # The forward keeps only the layer inputs; one layer is recomputed at a time during backward.
    forward_part = est_ckpt - est_plain / layers
    measured = _saved_activation_bytes(checkpointed)
    assert est_ckpt < est_plain
    assert abs(forward_part - measured) <= 0.25 * measured, (forward_part, measured)


def test_suggests_the_largest_micro_batch_that_fits_with_accumulation():
    recipe = _recipe("tiny-paligemma2", batch_size=8, grad_accum=1)
    at = {b: estimate(recipe, family_of(recipe), device="cuda", batch_size=b).peak for b in (1, 2, 4)}
    assert at[1] < at[2] < at[4]
    micro, accum, plan = suggest_micro_batch(
        recipe, family_of(recipe), memory=(at[2] + at[4]) / 2, device="cuda"
    )
    assert (micro, accum) == (2, 4) and plan.peak == at[2]
    assert suggest_micro_batch(recipe, family_of(recipe), memory=at[1] * 0.9, device="cuda") is None


def test_cpu_plan_counts_runtime_and_mapped_checkpoint_pages(tmp_path):
    from pg_tune.models.paligemma.tiny import save_checkpoint

    plan = estimate(_recipe("tiny-paligemma2"), family_of(_recipe("tiny-paligemma2")), device="cpu")
    assert 1e8 < _part(plan, "runtime") < 4e9  # this process's RSS after the imports: measured
    checkpoint = save_checkpoint("tiny-paligemma2", tmp_path / "ckpt")  # stored fp32
    on_disk = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))

    def recipe(mode):
        r = _recipe("tiny-paligemma2")
        r.model.name_or_path = str(checkpoint)
        r.quantization.mode = mode
        return r

    assert not any(
        p.name.startswith("checkpoint pages")
        for p in estimate(recipe("none"), family_of(recipe("none")), "cpu").parts
    )
    qplan = estimate(recipe("4bit"), family_of(recipe("4bit")), "cpu")
    # QLoRA keeps the files mapped: the pages not already counted as (view) weights are added.
    assert _part(qplan, "checkpoint pages") == pytest.approx(on_disk - _part(qplan, "base weights (float32)"))


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="expected a size"):
        parse_memory("lots")


def test_cli_prints_parts_and_the_fit(capsys):
    from pg_tune.cli import main

    assert main(["plan", "recipes/demo/shapes_tiny.yaml", "--memory", "1TB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for part in ("base weights", "LoRA weights", "optimizer states", "activations", "loss head chunk"):
        assert part in out
    assert "fits in 1TB: train.batch_size=" in out and "estimate" in out and "exact" in out
    assert main(["plan", "recipes/demo/shapes_tiny.yaml", "--memory", "1MB", "--device", "cpu"]) == 1
    assert "does not fit in 1MB" in capsys.readouterr().out
