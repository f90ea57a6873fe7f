"""``train.compile``: the decoder layers compiled in place train the same loss and gradients, keep
their state-dict keys (adapters save as before) and still generate."""

from __future__ import annotations

import pytest
import torch

from pg_tune.config.recipe import parse_recipe
from pg_tune.train.adapters import prepare_model
from pg_tune.train.loss import SuffixLoss
from tests.families import family_of
from tests.numerics import assert_close_to_scale

PRESET = "tiny-paligemma2"


def _model(compile_decoder: bool):
    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "model": {"name_or_path": PRESET},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"format": "shapes"}], "max_text_length": 24},
            "train": {"batch_size": 2, "compile": compile_decoder},
        }
    )
    family = family_of(recipe)
    torch.manual_seed(0)
    base = family.tiny_module.build_base(PRESET)
    model = prepare_model(base, recipe, family).train()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A's gradient at zero
            torch.nn.init.normal_(param, std=0.1)
    return recipe, family, model


def _loss_and_grads(recipe, family, model):
    from tests.measure.test_plan import _longest_batch

    batch = _longest_batch(recipe, family, model)
    total, count = SuffixLoss(model, family)(batch)
    (total / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return total / count, grads


@pytest.mark.slow
def test_compiled_decoder_trains_the_same_and_generates():
    recipe, family, eager = _model(compile_decoder=False)
    _, _, compiled = _model(compile_decoder=True)
    layers = family.decoder_layers(family.unwrap(compiled))
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod: adapters save as before

    loss, grads = _loss_and_grads(recipe, family, eager)
    compiled_loss, compiled_grads = _loss_and_grads(recipe, family, compiled)
    assert_close_to_scale(compiled_loss.detach(), loss.detach(), msg="loss")
    assert compiled_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        # Inductor fuses the elementwise work (other rounding): fp32 sums over the hidden width.
        assert_close_to_scale(compiled_grads[name], grad, rel=1e-3, msg=name)

    # Evaluation during training generates with the same (compiled) layers and a KV cache.
    from PIL import Image

    from pg_tune.config.recipe import ModelConfig
    from pg_tune.data.sample import Sample
    from pg_tune.evaluate.generate import generate

    processor = family.load_processor(ModelConfig(name_or_path=PRESET))
    sample = Sample(
        image=Image.new("RGB", (32, 32), (20, 200, 90)), prefix="caption en", suffix="", source="t"
    )
    with torch.no_grad():
        eager_text = generate(eager.eval(), processor, [sample], family, max_new_tokens=4)
        compiled_text = generate(compiled.eval(), processor, [sample], family, max_new_tokens=4)
    assert compiled_text == eager_text
