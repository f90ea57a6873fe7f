"""pg_tune's DPO against TRL's ``DPOTrainer``, the reference implementation, on one batch of each family.

TRL's trainer runs here on every tiny preset. It is built from the same base weights with a
``peft_config`` of the same LoRA (so its reference is the base with the adapter switched off, as
pg_tune's; a PeftModel passed in would make TRL copy the adapter as a "ref" adapter instead), then
given pg_tune's adapter weights (B random, so the policy differs from the reference), and its own
``compute_loss`` runs on pg_tune's preference batch in TRL's layout: the ``2B`` rows, chosen first,
``completion_mask = labels != -100``, the images repeated for both halves as TRL's collator repeats
them. Compared: the loss, TRL's logged ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (batch means, and for the sigmoid loss
each pair's own, from TRL run on that pair alone) and every LoRA gradient.

What is not TRL's here: its collator (each processor's own chat template; pg_tune's sequences are the
families' documented ones, pinned by their own tests), so both sides see identical token sequences.
TRL 1.16 has no conservative DPO for ``sigmoid`` (its ``label_smoothing`` drives ``robust``/``exo_pair``):
pg_tune's cDPO loss is ``(1-ε)·DPO(pairs) + ε·DPO(pairs with chosen and rejected swapped)``, so it is
compared with that combination of two TRL runs (loss and gradients).
"""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from PIL import Image

from pg_tune.config.recipe import DpoConfig, LoraConfig, ModelConfig
from pg_tune.data.sample import Sample
from pg_tune.models.family import family_for
from pg_tune.train.adapters import apply_lora
from pg_tune.train.preference import PreferenceLoss, preference_losses
from tests.numerics import VOCAB_SUM_REL, assert_close_to_scale

trl = pytest.importorskip("trl")

VARIANTS = {  # pg_tune's dpo section -> TRL's loss_type, loss_weights
    "sigmoid": (DpoConfig(beta=0.1), ["sigmoid"], None),
    "hinge": (DpoConfig(beta=0.5, loss="hinge"), ["hinge"], None),
    "ipo": (DpoConfig(beta=0.1, loss="ipo"), ["ipo"], None),
    "rpo": (DpoConfig(beta=0.1, sft_weight=0.5), ["sigmoid", "sft"], [1.0, 0.5]),
}


def _pairs() -> list[Sample]:
    rng = np.random.default_rng(0)
    answers = [
        ("a red circle", "a blue circle"),
        ("a green square on the left", "a red square"),
        ("a dot", "two dots"),
    ]
    return [
        Sample(Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)), "caption en", c, f"t[{i}]", rejected=r)
        for i, (c, r) in enumerate(answers)
    ]  # fmt: skip


def _one_pair(batch: dict, index: int, pairs: int, family) -> dict:
    """Pair ``index`` of a preference batch alone (its two rows and its image)."""
    rows = torch.tensor([index, pairs + index])
    out = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (2 * pairs,)}
    out.update({k: batch[k][index : index + 1] for k in family.image_inputs})
    return out


def _swap(batch: dict, pairs: int) -> dict:
    """The same pairs with chosen and rejected exchanged (rows B..2B-1 first)."""
    order = torch.cat([torch.arange(pairs, 2 * pairs), torch.arange(pairs)])
    return {
        k: v[order] if torch.is_tensor(v) and v.shape[:1] == (2 * pairs,) else v for k, v in batch.items()
    }


def _trl_inputs(batch: dict, family) -> dict:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", *family.attention_inputs)}
    inputs["completion_mask"] = (batch["labels"] != -100).long()
    for key in family.image_inputs:  # TRL's collator repeats the images for the rejected half
        inputs[key] = torch.cat([batch[key], batch[key]])
    return inputs


def _trl_trainer(base, family, lora: LoraConfig, processor, tmp_path):
    from datasets import Dataset

    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=family.lora_target_regex(lora),
        bias="none",
        task_type="CAUSAL_LM",
    )
    dataset = Dataset.from_dict(  # required by the constructor; the batches come from pg_tune
        {"image": [Image.new("RGB", (8, 8))], "prompt": ["x"], "chosen": ["a"], "rejected": ["b"]}
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
    )
    return trl.DPOTrainer(
        model=base, args=args, train_dataset=dataset, processing_class=processor, peft_config=config
    )


def _trl_run(trainer, inputs, variant) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    dpo, loss_types, weights = variant
    trainer.beta, trainer.loss_types = dpo.beta, loss_types
    trainer.loss_weights = weights or [1.0] * len(loss_types)
    trainer._metrics["train"].clear()
    model = trainer.model
    loss = trainer.compute_loss(model, inputs)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), logged, list(grads)


FIGURES: dict[str, list[float]] = {}
"""Per compared quantity: the worst |difference|, its tolerance, and the size of the values compared
(printed with ``pytest -s``)."""


def _within(actual: float, expected: float, allowed: float, what: str) -> None:
    _record(what, abs(actual - expected), allowed, abs(expected))
    assert abs(actual - expected) <= allowed, f"{what}: |{actual} - {expected}| > {allowed:.3g}"


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``assert_close_to_scale``, recording the worst difference against the allowed one."""
    scale = float(expected.abs().max())
    _record(what, float((actual - expected).abs().max()), VOCAB_SUM_REL * max(scale, 1e-12), scale)
    assert_close_to_scale(actual, expected, msg=what)


def _record(what: str, diff: float, allowed: float, size: float) -> None:
    worst = FIGURES.setdefault(what, [0.0, allowed, size])
    if diff / allowed >= worst[0] / worst[1]:
        FIGURES[what] = [diff, allowed, max(size, worst[2])]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "vision"),
    # PaliGemma with a vision adapter: the reference (adapter off) encodes the images itself.
    [("tiny-paligemma2", True), ("tiny-gemma3", False), ("tiny-smolvlm2", False)],
)
def test_dpo_equals_trl_dpo_trainer(preset, vision, tmp_path):
    family = family_for(preset)
    processor = family.load_processor(ModelConfig(name_or_path=preset))
    base = family.load_model(ModelConfig(name_or_path=preset))
    trainer_base = copy.deepcopy(base)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets="attention_mlp", vision=vision)
    model = apply_lora(base, lora, preset, family)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # rewards well away from 0
    model.train()
    trainer = _trl_trainer(trainer_base, family, lora, processor, tmp_path)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert [n for n, _ in theirs] == list(ours)
    with torch.no_grad():
        for name, p in theirs:
            p.copy_(ours[name])
    trainer.model.train()

    pairs = _pairs()
    batch = family.collator(processor, 32).preference_batch(list(enumerate(pairs)))
    scorer = PreferenceLoss(model, family)
    trainable = list(ours.values())
    for name, variant in VARIANTS.items():
        dpo = variant[0]
        policy, reference, tokens = scorer(batch)
        terms = preference_losses(policy, reference, tokens, dpo)
        loss = terms.loss.mean()
        if dpo.sft_weight:
            loss = loss + dpo.sft_weight * terms.chosen_nll.sum() / tokens[: len(pairs)].sum()
        grads = torch.autograd.grad(loss, trainable)
        trl_loss, logged, trl_grads = _trl_run(trainer, _trl_inputs(batch, family), variant)

        # Log-probabilities: fp32 sums through a vocabulary-wide softmax, relative to their own size;
        # rewards and margins are beta times differences of two and four of them.
        logps = torch.cat([terms.chosen_logps, terms.rejected_logps])
        logp_tol = VOCAB_SUM_REL * float(logps.abs().max())
        _within(float(terms.chosen_logps.mean()), logged["logps/chosen"], logp_tol, f"{name} logps/chosen")
        _within(
            float(terms.rejected_logps.mean()), logged["logps/rejected"], logp_tol, f"{name} logps/rejected"
        )
        margin = terms.chosen_rewards - terms.rejected_rewards
        for key, ours_value, n_logps in (
            ("rewards/chosen", terms.chosen_rewards.mean(), 2),
            ("rewards/rejected", terms.rejected_rewards.mean(), 2),
            ("rewards/margins", margin.mean(), 4),
        ):
            _within(float(ours_value), logged[key], dpo.beta * n_logps * logp_tol, f"{preset} {name} {key}")
        assert float((margin > 0).float().mean()) == logged["rewards/accuracies"], name
        _close(torch.tensor(float(loss)), torch.tensor(trl_loss), f"{preset} {name} loss")
        if name == "sigmoid":  # each pair's rewards and log-probabilities, TRL run on that pair alone
            for i in range(len(pairs)):
                with torch.no_grad():
                    trainer._metrics["train"].clear()
                    trainer.compute_loss(
                        trainer.model, _trl_inputs(_one_pair(batch, i, len(pairs), family), family)
                    )
                alone = {k: v[-1] for k, v in trainer._metrics["train"].items()}
                for key, value, tol in (
                    ("rewards/chosen", terms.chosen_rewards[i], 2 * dpo.beta * logp_tol),
                    ("rewards/rejected", terms.rejected_rewards[i], 2 * dpo.beta * logp_tol),
                    ("logps/chosen", terms.chosen_logps[i], logp_tol),
                    ("logps/rejected", terms.rejected_logps[i], logp_tol),
                ):
                    _within(float(value), alone[key], tol, f"{preset} per pair {key}")
        for g, t in zip(grads, trl_grads, strict=True):
            _close(g, t, f"{preset} {name} LoRA gradients")

    # Conservative DPO: (1 - eps) x TRL's DPO on the pairs + eps x TRL's DPO on the swapped pairs.
    eps = 0.2
    policy, reference, tokens = scorer(batch)
    cdpo = preference_losses(policy, reference, tokens, DpoConfig(beta=0.1, label_smoothing=eps)).loss.mean()
    grads = torch.autograd.grad(cdpo, trainable)
    straight = _trl_run(trainer, _trl_inputs(batch, family), VARIANTS["sigmoid"])
    swapped = _trl_run(trainer, _trl_inputs(_swap(batch, len(pairs)), family), VARIANTS["sigmoid"])
    expected = (1 - eps) * straight[0] + eps * swapped[0]
    _close(torch.tensor(float(cdpo)), torch.tensor(expected), f"{preset} cdpo loss")
    for g, a, b in zip(grads, straight[2], swapped[2], strict=True):
        _close(g, (1 - eps) * a + eps * b, f"{preset} cdpo LoRA gradients")
    for what, (diff, allowed, size) in FIGURES.items():
        if what.startswith(preset):
            print(f"{what}: max |diff| {diff:.3g} (allowed {allowed:.3g}; values up to {size:.3g})")
