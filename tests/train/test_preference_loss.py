"""The DPO pieces: the fused per-row log-probabilities, the loss formulas, the reference model (adapter
off / frozen copy), the image encoded once per pair, and the first loss of a fresh adapter (ln 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pg_tune.config.recipe import DpoConfig, LoraConfig, ModelConfig, parse_recipe
from pg_tune.data.sample import Sample
from pg_tune.models.family import family_for
from pg_tune.train.adapters import apply_lora, prepare_model
from pg_tune.train.loss import LogitsWorkspace, head_token_logprobs
from pg_tune.train.preference import PreferenceLoss, frozen_reference, preference_losses
from tests.numerics import assert_close_to_scale

LN2_FP32 = float(torch.tensor(math.log(2.0), dtype=torch.float32))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_head_token_logprobs_equal_autograd(softcap, train_head):
    """Values and gradients (hidden states, and the head when it trains) against log_softmax + gather,
    under per-row upstream weights as the DPO loss gives them; chunked and in one piece."""
    gen = torch.Generator().manual_seed(0)
    rows, width, vocab = 11, 8, 97
    hidden = torch.randn(rows, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen).requires_grad_(train_head)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen)

    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    expected = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    inputs = [hidden, weight] if train_head else [hidden]
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for chunk in (3, 64):
        got = head_token_logprobs(hidden, weight, targets, softcap, chunk, LogitsWorkspace())
        assert got.dtype == torch.float32
        assert_close_to_scale(got.detach(), expected.detach(), msg="log-probs")
        grads = torch.autograd.grad((got * upstream).sum(), inputs)
        for g, e in zip(grads, expected_grads, strict=True):
            assert_close_to_scale(g, e, msg=f"grad chunk={chunk}")


def test_loss_formulas():
    """Per pair, from the four summed log-probabilities (margin m = chosen ratio - rejected ratio)."""
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5], requires_grad=True)  # chosen 2, then rejected 2
    reference = torch.tensor([-3.5, -4.0, -3.0, -5.0])
    tokens = torch.tensor([2, 4, 3, 5])
    chosen_ratio = torch.tensor([0.5, -1.0])
    rejected_ratio = torch.tensor([-1.0, 0.5])
    m = chosen_ratio - rejected_ratio
    beta = 0.2
    sigmoid = preference_losses(policy, reference, tokens, DpoConfig(beta=beta))
    torch.testing.assert_close(sigmoid.loss, -F.logsigmoid(beta * m))
    torch.testing.assert_close(sigmoid.chosen_rewards, beta * chosen_ratio)
    torch.testing.assert_close(sigmoid.rejected_rewards, beta * rejected_ratio)
    torch.testing.assert_close(sigmoid.chosen_nll, torch.tensor([3.0, 5.0]))
    conservative = preference_losses(policy, reference, tokens, DpoConfig(beta=beta, label_smoothing=0.2))
    torch.testing.assert_close(
        conservative.loss, -0.8 * F.logsigmoid(beta * m) - 0.2 * F.logsigmoid(-beta * m)
    )
    hinge = preference_losses(policy, reference, tokens, DpoConfig(beta=beta, loss="hinge"))
    torch.testing.assert_close(hinge.loss, torch.relu(1 - beta * m))
    ipo = preference_losses(policy, reference, tokens, DpoConfig(beta=beta, loss="ipo"))
    per_token = chosen_ratio / torch.tensor([2.0, 4.0]) - rejected_ratio / torch.tensor([3.0, 5.0])
    torch.testing.assert_close(ipo.loss, (per_token - 1 / (2 * beta)) ** 2)


def _pairs(n: int = 2) -> list[Sample]:
    rng = np.random.default_rng(0)
    answers = [
        ("a red circle", "a blue circle"),
        ("a green square", "a green triangle"),
        ("a blue dot", "a dot"),
    ]
    return [
        Sample(
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
            "caption en",
            chosen,
            f"t[{i}]",
            rejected=rejected,
        )
        for i, (chosen, rejected) in enumerate(answers[:n])
    ]


def _pair_batch(family, preset):
    processor = family.load_processor(ModelConfig(name_or_path=preset))
    return family.collator(processor, 32).preference_batch(list(enumerate(_pairs())))


def _count_encodings(family, module) -> list[int]:
    """Images encoded per vision-tower call of ``module``'s family model."""
    calls: list[int] = []
    tower = family.unwrap(module).get_submodule(family.modules.vision)

    def count(module, args, kwargs, out):
        pixels = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        calls.append(int(pixels.shape[0]))

    tower.register_forward_hook(count, with_kwargs=True)
    return calls


@pytest.mark.parametrize("preset", ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2"])
def test_fresh_adapter_first_loss_is_ln2_and_each_image_is_encoded_once(preset):
    """B = 0 in a fresh LoRA adapter: the policy IS the reference (the base with the adapter switched
    off), so every reward is 0 and the sigmoid loss exactly ln 2. With the vision side frozen the
    images are encoded once per pair (one call, B images), for both answers and the reference."""
    family = family_for(preset)
    model = apply_lora(
        family.load_model(ModelConfig(name_or_path=preset)), LoraConfig(r=4, alpha=8), preset, family
    )
    model.train()
    batch = _pair_batch(family, preset)
    calls = _count_encodings(family, model)
    policy, reference, tokens = PreferenceLoss(model, family)(batch)
    assert torch.equal(policy, reference) and policy.shape == (4,) and (tokens > 0).all()
    terms = preference_losses(policy, reference, tokens, DpoConfig())
    assert float(terms.loss.detach().mean()) == LN2_FP32
    assert terms.chosen_rewards.abs().max() == 0 and terms.rejected_rewards.abs().max() == 0
    pixels = batch[family.image_inputs[0]]
    assert pixels.shape[0] == 2 and len(calls) == 1  # B = 2 images, one encoder call
    if pixels.dim() == 4:  # one picture per image (SmolVLM encodes its real tiles: several per image)
        assert calls == [2]


def test_vision_adapter_makes_the_reference_encode_its_own_features():
    """With lora.vision the adapter changes the image features, so the reference (adapter off) encodes
    the images again; the policy still encodes them once for both answers."""
    preset = "tiny-paligemma2"
    family = family_for(preset)
    model = apply_lora(
        family.load_model(ModelConfig(name_or_path=preset)),
        LoraConfig(r=4, alpha=8, vision=True),
        preset,
        family,
    )
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = _pair_batch(family, preset)
    calls = _count_encodings(family, model)
    policy, reference, _ = PreferenceLoss(model, family)(batch)
    assert calls == [2, 2]
    with torch.no_grad(), model.disable_adapter():
        base = PreferenceLoss(model, family, reference=None)
        base_policy = base._logprobs(model, batch, base._image_features(family.unwrap(model), batch))[0]
    torch.testing.assert_close(reference, base_policy, rtol=0, atol=0)
    assert not torch.equal(policy, reference)


@pytest.mark.parametrize("method", ["partial", "full"])
def test_full_and_partial_keep_a_frozen_copy_as_reference(method):
    recipe = parse_recipe(
        {
            "output_dir": "unused",
            "method": method,
            "partial": {"groups": ["attention"]},
            "data": {"train": [{"format": "shapes", "pairs": True}]},
            "train": {"objective": "dpo"},
        }
    )
    family = family_for(recipe.model.name_or_path)
    model = family.load_model(recipe.model)
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    on_cpu = SimpleNamespace(distributed_type=DistributedType.NO, device=torch.device("cpu"))
    reference = frozen_reference(model, recipe, on_cpu)
    with pytest.raises(Exception, match="not sharded under FSDP"):
        frozen_reference(model, recipe, SimpleNamespace(distributed_type=DistributedType.FSDP))
    model = prepare_model(model, recipe, family)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    batch = _pair_batch(family, recipe.model.name_or_path)
    scorer = PreferenceLoss(model, family, reference)
    assert "_reference" not in dict(scorer.named_children())  # not saved, not wrapped by DDP
    policy, ref, _ = scorer(batch)
    torch.testing.assert_close(policy, ref, rtol=0, atol=0)  # before training they are the same model
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    moved, ref_after, _ = scorer(batch)
    torch.testing.assert_close(ref_after, ref, rtol=0, atol=0)
    assert not torch.equal(moved, ref_after)
    # full trains the projector: the copy encodes the images itself; partial [attention] shares them.
    calls = _count_encodings(family, model)
    scorer(batch)
    assert calls == [2]
    copy_calls = _count_encodings(family, reference)
    scorer(batch)
    assert copy_calls == ([] if method == "partial" else [2])


def test_feature_cache_feeds_preference_batches(tmp_path):
    """``data.feature_cache`` with DPO: the cached features (one image per pair) give the same answer
    log-probabilities as encoding the pixels."""
    from pg_tune.data.feature_cache import CachedFeatureCollator, FeatureCache

    preset = "tiny-paligemma2"
    family = family_for(preset)
    processor = family.load_processor(ModelConfig(name_or_path=preset))
    model = apply_lora(
        family.load_model(ModelConfig(name_or_path=preset)), LoraConfig(r=4, alpha=8), preset, family
    )
    pairs = _pairs()
    cache = FeatureCache.build(tmp_path, pairs, model, processor.image_processor, family)
    collator = family.collator(processor, 32)
    cached = CachedFeatureCollator(collator, cache, pairs=True)(list(enumerate(pairs)))
    assert "pixel_values" not in cached and cached["image_features"].shape[0] == len(pairs)
    scorer = PreferenceLoss(model, family)
    with torch.no_grad():
        from_pixels = scorer(collator.preference_batch(list(enumerate(pairs))))
        from_cache = scorer(cached)
    torch.testing.assert_close(from_cache[0], from_pixels[0], rtol=0, atol=0)
    torch.testing.assert_close(from_cache[1], from_pixels[1], rtol=0, atol=0)
