"""``pg-tune plan`` under ``train.objective: dpo``: the separate DPO term against what autograd saves."""

from __future__ import annotations

import torch

from pg_tune.config.recipe import parse_recipe
from pg_tune.measure.plan import estimate
from tests.families import family_of
from tests.measure.test_plan import _part, _prepared, _recipe


def _dpo(recipe):
    data = {
        "output_dir": "/tmp/unused",
        "model": {"name_or_path": recipe.model.name_or_path, "dtype": recipe.model.dtype},
        "method": recipe.method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention_mlp"},
        "data": {"train": [{"format": "shapes", "pairs": True}], "max_text_length": 32},
        "train": {"batch_size": recipe.train.batch_size, "objective": "dpo"},
    }
    return parse_recipe(data)


def _saved_dpo_activation_bytes(recipe) -> int:
    """Bytes autograd keeps for backward in one DPO forward of ``batch_size`` pairs (parameters excluded)."""
    from pg_tune.train.preference import PreferenceLoss

    model = _prepared(recipe)
    config = model.get_base_model().config
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    pairs, length = recipe.train.batch_size, image_tokens + recipe.data.max_text_length
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (2 * pairs, length))
    ids[:, :image_tokens] = model.get_base_model().config.image_token_id
    labels = torch.full((2 * pairs, length), -100)
    labels[:, -20:] = ids[:, -20:]
    size = config.vision_config.image_size
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": (labels != -100).long(),
        "labels": labels,
        "pixel_values": torch.randn(pairs, 3, size, size),  # each image once per pair
    }
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        PreferenceLoss(model, family_of(model))(inputs)
    return sum(storages.values())


def test_dpo_activations_double_and_match_what_autograd_saves():
    sft = _recipe("tiny-paligemma2")
    dpo = _dpo(sft)
    sft_plan, dpo_plan = (
        estimate(sft, family_of(sft), device="cuda"),
        estimate(dpo, family_of(dpo), device="cuda"),
    )
    assert _part(dpo_plan, "activations") == 2 * _part(sft_plan, "activations")
    assert _part(dpo_plan, "base weights") == _part(sft_plan, "base weights")  # LoRA: no reference copy
    assert not any(p.name.startswith("DPO reference") for p in dpo_plan.parts)
    measured = _saved_dpo_activation_bytes(dpo)
    # The same 15 % as the SFT estimate (small per-model tensors left out); the reference pass saves nothing.
    estimated = _part(dpo_plan, "activations")
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


def test_full_and_partial_dpo_count_the_frozen_reference():
    recipe = _dpo(
        parse_recipe({"output_dir": "x", "method": "partial", "data": {"train": [{"format": "shapes"}]}})
    )
    plan = estimate(recipe, family_of(recipe), device="cuda")
    assert _part(plan, "DPO reference (frozen copy)") == _part(plan, "base weights")
