"""Preference tuning (``train.objective: dpo``): answer log-probabilities, the reference, the loss.

One optimizer step over ``B`` pairs per micro-batch, in the order the code runs:

1. The family's ``collator.preference_batch`` lays out ``2B`` training rows (the chosen answers,
   then the rejected ones) and the ``B`` images once.
2. ``PreferenceLoss.forward``: the image features are computed once per pair (no autograd when the
   vision side is frozen) and placed in both of its rows; the decoder runs on the ``2B`` rows and
   each answer's log-probability is the SUM of its target tokens' log-probabilities through the
   fused suffix-only head (``pg_tune.train.loss.answer_logprobs``: no full-vocabulary logits at
   every position).
3. The reference, in the same call, under ``no_grad``: for LoRA (and QLoRA) the same base with the
   adapter switched off (peft's ``disable_adapter``), so no second copy exists; for ``full`` /
   ``partial`` a frozen copy of the base made before training (``frozen_reference``: one more set of
   weights in the model dtype, no gradients or optimizer state; ``pg-tune plan`` counts it). When
   the vision side is frozen the reference reuses the policy's image features (the same tensors);
   otherwise (``lora.vision``, a trained projector) it encodes the images itself.
4. ``preference_losses``: per pair, with ``m`` the reward margin
   ``(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))``: ``sigmoid`` (DPO)
   ``-(1-ε)·log σ(β·m) - ε·log σ(-β·m)`` (ε = ``dpo.label_smoothing``: conservative DPO),
   ``hinge`` ``relu(1 - β·m)``, ``ipo`` ``(m' - 1/(2β))²`` with ``m'`` the margin of the per-token
   mean log-ratios (TRL's form). ``dpo.sft_weight`` adds RPO's term, the chosen answers' mean token
   negative log-likelihood.
5. ``preference_window``: the step's loss is the mean over every pair of the step (all
   micro-batches, all ranks; the RPO term the mean over all chosen tokens), so 2 ranks × batch 4
   train as 1 × 8; it logs ``rewards/{chosen,rejected,margin,accuracy}`` and ``logps/{chosen,rejected}``
   (TRL's names and definitions: reward = β × log-ratio, accuracy = reward(c) > reward(r)).

``evaluate_pairs`` scores eval pairs the same way (``preference/accuracy``, ``margin``, ``loss``,
``logp_accuracy``, ``count``); ``pg_tune.train.evaluation`` calls it beside the task metrics.
TRL's ``DPOTrainer`` is the reference implementation (``tests/train/test_preference_trl.py``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pg_tune.config.recipe import DpoConfig, Recipe
from pg_tune.config.schema import ConfigError
from pg_tune.data.collate import IGNORE_INDEX
from pg_tune.data.sample import Sample
from pg_tune.models.family import ModelFamily
from pg_tune.train.loss import DEFAULT_CHUNK_ROWS, LogitsWorkspace, answer_logprobs


def frozen_reference(model: nn.Module, recipe: Recipe, accelerator) -> nn.Module | None:
    """The reference model a DPO run keeps besides the policy, on this rank's device: None for LoRA
    (the adapter is switched off instead) and for SFT; for ``full`` / ``partial`` a frozen copy of the
    base as loaded, in eval mode (no dropout). Call it before the method unfreezes anything. Under
    FSDP / DeepSpeed the copy would sit whole on every rank beside the sharded policy: refused."""
    from accelerate.utils import DistributedType

    if recipe.train.objective != "dpo" or recipe.method == "lora":
        return None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            "train.objective=dpo with method full/partial keeps a frozen reference copy, which is not sharded "
            "under FSDP / DeepSpeed; use method=lora (its reference is the adapter switched off) or DDP"
        )
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference.to(accelerator.device)


def pair_scorer(loss_module: nn.Module, model: nn.Module) -> PreferenceLoss:
    """What scores eval pairs: a DPO run's own ``PreferenceLoss``, or for an SFT run (``SuffixLoss``)
    the trained model against its base (LoRA: the adapter switched off; full / partial: none)."""
    if isinstance(loss_module, PreferenceLoss):
        return loss_module
    return PreferenceLoss(model, loss_module.family)


class PreferenceLoss(nn.Module):
    """Wraps the (peft) model; ``forward(batch)`` on a preference batch returns ``(policy, reference,
    tokens)``: each row's summed answer log-probability under the trained model and the reference
    (None when there is none: an SFT run of ``full`` / ``partial``), and its supervised-token count.

    Wrapping makes both passes part of one ``forward``, so DDP sees one module call per micro-batch.
    The frozen copy (``reference``) is held outside the module tree: DDP must not wrap or broadcast
    it, and checkpoints save the policy only.
    """

    def __init__(
        self,
        model: nn.Module,
        family: ModelFamily,
        reference: nn.Module | None = None,
        chunk_size: int = DEFAULT_CHUNK_ROWS,
    ):
        super().__init__()
        self.model = model
        self.family = family
        self._reference = (reference,)  # a tuple: not registered as a submodule
        self.chunk_size = chunk_size
        self.workspace = LogitsWorkspace()

    @property
    def has_reference(self) -> bool:
        return self._reference[0] is not None or _is_peft(self.model)

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        core = self.family.unwrap(self.model)
        features = self._image_features(core, batch)
        policy, tokens = self._logprobs(self.model, batch, features)
        with torch.no_grad():
            # A frozen vision side gives the reference the very same features: encode once per pair.
            shared = features if self.family.vision_frozen(core) else None
            reference = self._reference_logprobs(batch, shared)
        return policy, reference, tokens

    def _image_features(self, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of the batch's ``B`` images (once per pair), as ``decoder_hidden`` consumes them."""
        if "image_features" in batch:
            return batch["image_features"].to(core.dtype)
        return self.family.image_features(core, batch)

    def _logprobs(self, model: nn.Module, batch, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rows B..2B-1 hold the same images as rows 0..B-1, in the same order (``pair_rows``); the
        # features' first dimension is per image or per image token, so repeating it serves both.
        both = torch.cat([features, features], dim=0)
        return answer_logprobs(model, self.family, batch, both, self.chunk_size, self.workspace)

    def _reference_logprobs(self, batch, shared_features: torch.Tensor | None) -> torch.Tensor | None:
        reference = self._reference[0]
        if reference is None and not _is_peft(self.model):
            return None
        model = reference if reference is not None else self.model
        switch_off = self.model.disable_adapter() if reference is None else contextlib.nullcontext()
        with switch_off:
            features = shared_features
            if features is None:
                features = self._image_features(self.family.unwrap(model), batch)
            logprobs, _ = self._logprobs(model, batch, features)
        return logprobs


def _is_peft(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


# --- the loss --------------------------------------------------------------------------------------


@dataclass
class PairTerms:
    """Per pair (``B`` values each) what the loss and the logs need."""

    loss: torch.Tensor
    """The preference loss of each pair (differentiable)."""
    chosen_nll: torch.Tensor
    """Minus the chosen answer's summed log-probability (differentiable; RPO's term)."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def preference_losses(
    policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, dpo: DpoConfig
) -> PairTerms:
    """The ``dpo.loss`` of each of the ``B`` pairs from the ``2B`` answers' summed log-probabilities
    (chosen answers first) and token counts; see the module docstring for the formulas."""
    pairs = policy.shape[0] // 2
    chosen_ratio = policy[:pairs] - reference[:pairs]
    rejected_ratio = policy[pairs:] - reference[pairs:]
    margin = chosen_ratio - rejected_ratio
    beta = dpo.beta
    if dpo.loss == "sigmoid":
        eps = dpo.label_smoothing
        loss = -F.logsigmoid(beta * margin)
        if eps:
            loss = (1.0 - eps) * loss - eps * F.logsigmoid(-beta * margin)
    elif dpo.loss == "hinge":
        loss = torch.relu(1.0 - beta * margin)
    else:  # ipo, on per-token mean log-ratios (TRL's form, confirmed with the IPO authors there)
        lengths = tokens.to(policy.dtype).clamp(min=1.0)
        mean_margin = chosen_ratio / lengths[:pairs] - rejected_ratio / lengths[pairs:]
        loss = (mean_margin - 1.0 / (2.0 * beta)) ** 2
    return PairTerms(
        loss=loss,
        chosen_nll=-policy[:pairs],
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
        chosen_logps=policy[:pairs].detach(),
        rejected_logps=policy[pairs:].detach(),
    )


# --- one optimizer step -------------------------------------------------------------------------


@dataclass
class WindowLoss:
    """What one accumulation window's forward and backward passes give the loop."""

    loss: float
    tokens: int
    """Supervised tokens of the step over all ranks (chosen and rejected answers)."""
    metrics: dict[str, float]


PAIR_LOGS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


def preference_window(
    accelerator, loss_module: nn.Module, window: list[dict[str, Any]], dpo: DpoConfig
) -> WindowLoss:
    """Forward and backward of one accumulation window of preference batches (no optimizer step).

    The loss is the mean over every pair of the step, all micro-batches and ranks together (and the
    RPO term the mean over all their chosen tokens); DDP averages gradients over ranks, hence the
    world factor, as in the SFT step.
    """
    acc = accelerator
    local = torch.tensor(
        [
            [b["labels"].shape[0] // 2 for b in window],
            [int((b["labels"][: b["labels"].shape[0] // 2, 1:] != IGNORE_INDEX).sum()) for b in window],
            [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window],
        ],
        device=acc.device,
    ).sum(dim=1)
    global_pairs, global_chosen_tokens, global_tokens = (int(v) for v in acc.reduce(local, "sum"))
    world = acc.num_processes
    objective_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    pair_sums = torch.zeros(len(PAIR_LOGS), device=acc.device, dtype=torch.float64)
    for i, batch in enumerate(window):
        with contextlib.nullcontext() if i == len(window) - 1 else acc.no_sync(loss_module):
            with acc.autocast():
                policy, reference, tokens = loss_module(batch)
            terms = preference_losses(policy, reference, tokens, dpo)
            objective = terms.loss.sum() / max(global_pairs, 1)
            if dpo.sft_weight:
                objective = objective + dpo.sft_weight * terms.chosen_nll.sum() / max(global_chosen_tokens, 1)
            acc.backward(objective * world)
        objective_sum += objective.detach().double()
        margin = terms.chosen_rewards - terms.rejected_rewards
        pair_sums += torch.stack(
            [
                terms.chosen_rewards.double().sum(),
                terms.rejected_rewards.double().sum(),
                margin.double().sum(),
                (margin > 0).double().sum(),
                terms.chosen_logps.double().sum(),
                terms.rejected_logps.double().sum(),
            ]
        )
    means = acc.reduce(pair_sums, "sum") / max(global_pairs, 1)
    return WindowLoss(
        loss=float(acc.reduce(objective_sum, "sum")),
        tokens=global_tokens,
        metrics={name: float(value) for name, value in zip(PAIR_LOGS, means, strict=True)},
    )


# --- evaluation on held-out pairs -----------------------------------------------------------------


def evaluate_pairs(
    accelerator,
    scorer: PreferenceLoss,
    processor,
    samples: Sequence[Sample],
    recipe: Recipe,
    family: ModelFamily,
) -> dict[str, float]:
    """``preference/*`` metrics over eval pairs (every rank returns the same dict): ``accuracy`` (the
    reward of the chosen answer is higher: TRL's ``rewards/accuracies``), ``margin`` (mean reward
    margin), ``loss`` (the recipe's ``dpo`` loss), ``logp_accuracy`` (the model alone gives the chosen
    answer the higher log-probability) and ``count``. Without a reference (an SFT run of ``full`` /
    ``partial``) only ``logp_accuracy`` and ``count``."""
    if not samples:
        return {}
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, len(samples), world))
    collator = family.collator(
        processor, recipe.data.max_text_length, train=True, pad_to_multiple_of=recipe.data.pad_to_multiple_of
    )
    size = recipe.eval.batch_size
    model = scorer.model
    was_training = model.training
    model.eval()
    rows: list[tuple[int, list[float]]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(shard), size):
                indices = shard[start : start + size]
                batch = collator.preference_batch([(i, samples[i]) for i in indices])
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with accelerator.autocast():
                    policy, reference, tokens = scorer(batch)
                rows += zip(indices, _pair_values(policy, reference, tokens, recipe.dpo), strict=True)
    finally:
        if was_training:
            model.train()
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    values = [v for _, v in sorted(dict(rows).items())]
    count = len(values)
    metrics = {"preference/logp_accuracy": sum(v[0] for v in values) / count}
    if scorer.has_reference:
        metrics["preference/accuracy"] = sum(v[1] for v in values) / count
        metrics["preference/margin"] = sum(v[2] for v in values) / count
        metrics["preference/loss"] = sum(v[3] for v in values) / count
    metrics["preference/count"] = float(count)
    return dict(sorted(metrics.items()))


def _pair_values(policy, reference, tokens, dpo: DpoConfig) -> list[list[float]]:
    """Per pair: [logp accuracy, reward accuracy, reward margin, loss] (the last three NaN without a
    reference)."""
    pairs = policy.shape[0] // 2
    logp_right = (policy[:pairs] > policy[pairs:]).double()
    if reference is None:
        nan = torch.full_like(logp_right, math.nan)
        return torch.stack([logp_right, nan, nan, nan], dim=1).tolist()
    terms = preference_losses(policy.float(), reference.float(), tokens, dpo)
    margin = (terms.chosen_rewards - terms.rejected_rewards).double()
    return torch.stack([logp_right, (margin > 0).double(), margin, terms.loss.double()], dim=1).tolist()
