"""AdamW with linear warm-up and a cosine (or linear / constant) decay, stepped per optimizer step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from pg_tune.config.recipe import TrainConfig


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: torch AdamW, or bitsandbytes' 8-bit AdamW (paged or not).

    8-bit states take 2 bytes per parameter instead of 8; with LoRA the states are small anyway,
    so this matters for full fine-tunes and ``modules_to_save`` (docs/performance.md).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(
            "no trainable parameters: no module matched the LoRA targets (lora.targets, lora.vision)"
        )
    if train.optimizer == "adamw":
        # foreach: one fused kernel per group instead of a Python loop over LoRA's many tiny tensors.
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, foreach=True)
    import bitsandbytes as bnb

    eight_bit = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    cls = eight_bit.get(train.optimizer)
    if cls is None:
        raise ValueError(
            f"train.optimizer: unknown optimizer {train.optimizer!r} (adamw, {', '.join(eight_bit)})"
        )
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> LambdaLR:
    warmup = int(round(train.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if train.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
