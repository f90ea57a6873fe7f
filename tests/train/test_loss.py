"""SuffixLoss against the model's own loss, and the fused head against plain autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pg_tune.config.recipe import LoraConfig
from pg_tune.data.sample import Sample
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.tiny import build_model
from pg_tune.train.adapters import apply_lora
from pg_tune.train.loss import LogitsWorkspace, SuffixLoss, head_cross_entropy_sum
from tests.families import family_of
from tests.numerics import assert_close_to_scale


def _batch(processor, n: int = 3) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    suffixes = ["a red circle", "two blue squares on the left of the picture", "cat"]
    samples = [
        Sample(
            image=Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
            prefix="caption en" if i % 2 else "answer en what is in the image",
            suffix=suffixes[i % len(suffixes)],
            source=f"test[{i}]",
        )
        for i in range(n)
    ]
    return PaliGemmaFamily().collator(processor, max_text_length=32)(list(enumerate(samples)))


def _reference_loss(model, batch) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels")
    return model(**{k: batch[k] for k in keys}).loss


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_suffix_loss_equals_model_loss_and_gradients(tiny_preset, softcap):
    model, processor = build_model(tiny_preset)
    if softcap is not None:
        if tiny_preset != "tiny-paligemma2":
            pytest.skip("final-logit soft-capping exists in Gemma 2 only")
        model.config.text_config.final_logit_softcapping = softcap
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), tiny_preset, family_of(model))
    # Non-zero LoRA B so the adapter gradients depend on the whole path.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = _batch(processor)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]

    reference = _reference_loss(model, batch)
    ref_grads = torch.autograd.grad(reference, trainable)

    loss_sum, count = SuffixLoss(model, family_of(model), chunk_size=7)(batch)  # several chunks, one ragged
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    ours = loss_sum / count
    grads = torch.autograd.grad(ours, trainable)

    assert_close_to_scale(ours, reference)
    for (name, _), g, r in zip(named_trainable, grads, ref_grads, strict=True):
        # fp32 sums over the vocabulary in another order: compared relative to each gradient's scale.
        assert_close_to_scale(g, r, msg=name)


def test_frozen_head_and_vision_get_no_gradient():
    model, processor = build_model("tiny-paligemma")
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), "tiny-paligemma", family_of(model))
    model.train()
    loss_sum, count = SuffixLoss(model, family_of(model))(_batch(processor))
    (loss_sum / count).backward()
    core = model.get_base_model()
    assert not core.lm_head.weight.requires_grad and core.lm_head.weight.grad is None
    assert all(p.grad is None for p in core.model.vision_tower.parameters())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n
    )


def test_cached_image_features_give_the_same_loss():
    model, processor = build_model("tiny-paligemma2")
    batch = _batch(processor)
    with torch.no_grad():
        direct, _ = SuffixLoss(model, family_of(model))(batch)
        features = model.model.get_image_features(batch["pixel_values"]).pooler_output
        cached_batch = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_features": features}
        cached, _ = SuffixLoss(model, family_of(model))(cached_batch)
    torch.testing.assert_close(cached, direct)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_head_matches_autograd_including_weight_gradient(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,))

    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    exp_h, exp_w = torch.autograd.grad(expected * 0.7, (hidden, weight))

    got = head_cross_entropy_sum(hidden, weight, targets, softcap, chunk_rows=4)
    got_h, got_w = torch.autograd.grad(got * 0.7, (hidden, weight))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_h, exp_h)
    torch.testing.assert_close(got_w, exp_w)


def test_fused_head_without_grad_and_without_rows():
    weight = torch.randn(10, 4)
    with torch.no_grad():
        value = head_cross_entropy_sum(torch.randn(3, 4), weight, torch.tensor([0, 5, 9]))
    assert value.ndim == 0 and value > 0
    empty = head_cross_entropy_sum(
        torch.zeros(0, 4, requires_grad=True), weight, torch.zeros(0, dtype=torch.long)
    )
    assert float(empty.detach()) == 0.0
    with pytest.raises(ValueError, match="chunk_rows"):
        head_cross_entropy_sum(torch.randn(3, 4), weight, torch.tensor([0, 1, 2]), chunk_rows=0)


@pytest.fixture
def memory_does_not_bind(monkeypatch):
    """``host_memory.memory_binds()`` is False, whatever an earlier test in this process left: it is
    process-wide (a QLoRA base loaded before fixes the threshold), and it releases the workspace."""
    from pg_tune.models import host_memory

    monkeypatch.setattr(host_memory, "memory_binds", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_workspace_is_reused_and_changes_nothing(dtype, softcap, memory_does_not_bind):
    """The reused buffers (fp32 logits; a bf16 head's own matmul output and the softcap's tanh) give
    the same loss and gradient bit for bit, and step after step no new full-vocabulary buffer."""
    torch.manual_seed(0)
    weight = torch.randn(300, 8).to(dtype)
    workspace = LogitsWorkspace()
    pointers = []
    for rows in (7, 5, 7):
        hidden = torch.randn(rows, 8, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, 300, (rows,))
        plain = head_cross_entropy_sum(hidden, weight, targets, softcap, chunk_rows=4)
        (expected,) = torch.autograd.grad(plain, hidden)
        reused = head_cross_entropy_sum(hidden, weight, targets, softcap, chunk_rows=4, workspace=workspace)
        (got,) = torch.autograd.grad(reused, hidden)
        assert torch.equal(reused, plain)
        assert torch.equal(got, expected)
        pointers.append({slot: buf.data_ptr() for slot, buf in workspace._buffers.items()})
    expected_slots = (
        {"logits"} | ({"low"} if dtype != torch.float32 else set()) | ({"tanh"} if softcap else set())
    )
    assert set(pointers[0]) == expected_slots
    assert pointers[0] == pointers[1] == pointers[2]


def test_workspace_is_released_after_each_call_where_memory_binds(memory_does_not_bind, monkeypatch):
    """Under the compact memory policy (QLoRA, 1B+ bases) no full-vocabulary buffer outlives a head
    call, in the loss and in the preference head, forward and backward; the results are the same."""
    from pg_tune.models import host_memory
    from pg_tune.train.loss import head_token_logprobs

    torch.manual_seed(0)
    weight = torch.randn(300, 8).to(torch.bfloat16).requires_grad_()
    hidden = torch.randn(7, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (7,))
    kept = LogitsWorkspace()
    expected = head_cross_entropy_sum(hidden, weight.detach(), targets, 5.0, chunk_rows=4, workspace=kept)
    assert kept._buffers
    monkeypatch.setattr(host_memory, "memory_binds", lambda: True)
    released = LogitsWorkspace()
    got = head_cross_entropy_sum(hidden, weight.detach(), targets, 5.0, chunk_rows=4, workspace=released)
    assert not released._buffers
    assert torch.equal(got, expected)
    logprobs = head_token_logprobs(hidden, weight, targets, 5.0, chunk_rows=4, workspace=released)
    assert not released._buffers
    logprobs.sum().backward()  # the weight needs a gradient: backward recomputes through the workspace
    assert not released._buffers and weight.grad is not None


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("smoothing", [0.1, 0.35])
def test_label_smoothing_matches_pytorch_loss_and_gradients(softcap, smoothing):
    """Loss and both gradients equal F.cross_entropy(label_smoothing=eps) to 1e-6, in chunks."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,))

    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", label_smoothing=smoothing)
    exp_h, exp_w = torch.autograd.grad(expected * 0.7, (hidden, weight))

    got = head_cross_entropy_sum(hidden, weight, targets, softcap, chunk_rows=4, label_smoothing=smoothing)
    got_h, got_w = torch.autograd.grad(got * 0.7, (hidden, weight))
    # Smoothing really changes the loss, so matching it is not matching the plain one.
    plain = head_cross_entropy_sum(hidden.detach(), weight.detach(), targets, softcap)
    assert abs(float(got) - float(plain)) > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_h, exp_h, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_w, exp_w, rtol=0, atol=1e-6)


def test_label_smoothing_out_of_range_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        head_cross_entropy_sum(
            torch.randn(2, 4), torch.randn(6, 4), torch.tensor([0, 1]), label_smoothing=1.5
        )


def test_suffix_loss_label_smoothing_equals_pytorch_on_supervised_positions():
    """On a tiny PaliGemma 2 with soft-capping: SuffixLoss(eps) == F.cross_entropy(eps) over the
    model's own full-sequence logits, masked to the supervised positions, loss and LoRA gradients."""
    model, processor = build_model("tiny-paligemma2")
    model.config.text_config.final_logit_softcapping = 30.0
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), "tiny-paligemma2", family_of(model))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch(processor)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keys = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
    logits = model(**{k: batch[k] for k in keys}).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    ref_grads = torch.autograd.grad(reference, [p for _, p in named])
    loss_sum, count = SuffixLoss(model, family_of(model), chunk_size=7, label_smoothing=0.1)(batch)
    ours = loss_sum / count
    grads = torch.autograd.grad(ours, [p for _, p in named])
    assert_close_to_scale(ours, reference)
    for (name, _), g, r in zip(named, grads, ref_grads, strict=True):
        assert_close_to_scale(g, r, msg=name)
