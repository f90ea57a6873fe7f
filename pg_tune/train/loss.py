"""The training loss: cross-entropy on supervised (suffix + eos) positions only.

PaliGemma's own ``forward`` applies the 257,216-wide LM head to every position, image tokens and
prompt included, although only the suffix is supervised. Here the head runs on the supervised
positions alone, in chunks whose logits are recomputed in the backward pass, so no fp32
full-vocabulary tensor larger than one chunk ever exists. The sum equals the reference loss times
the token count (a test pins this).

The module returns the *sum* of token losses and the token count; the training loop divides by the
global count of supervised tokens across accumulation steps and ranks (big_vision normalises per
token too, so a long answer is not worth less than a short one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pg_tune.data.collate import IGNORE_INDEX
from pg_tune.models.paligemma import base_model_of


def _head_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


class SuffixLoss(nn.Module):
    """Wraps a (peft) PaliGemma; ``forward(batch)`` returns ``(loss_sum, n_supervised_tokens)``.

    Wrapping makes the loss part of ``forward``, so DDP/FSDP see one module call per step.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        core = base_model_of(self.model)
        outputs = core.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"].to(core.dtype),
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            use_cache=False,
        )
        hidden = outputs.last_hidden_state[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        hidden, targets = hidden[mask], targets[mask]
        softcap = getattr(core.config.get_text_config(), "final_logit_softcapping", None)
        weight = core.lm_head.weight
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.chunk_size):
            h = hidden[start : start + self.chunk_size]
            t = targets[start : start + self.chunk_size]
            if torch.is_grad_enabled():
                total = total + checkpoint(_head_ce_sum, h, t, weight, softcap, use_reentrant=False)
            else:
                total = total + _head_ce_sum(h, t, weight, softcap)
        return total, mask.sum()
