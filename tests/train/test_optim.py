"""train.optimizer: torch AdamW and bitsandbytes' 8-bit AdamW (paged or not) all train."""

from __future__ import annotations

import pytest
import torch

from pg_tune.config.recipe import TrainConfig


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_optimizer_choices_step(name):
    from pg_tune.train.optim import build_optimizer

    param = torch.nn.Parameter(torch.ones(64, 64))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    optimizer = build_optimizer([param, frozen], TrainConfig(optimizer=name, lr=1e-2))
    assert [p for g in optimizer.param_groups for p in g["params"]] == [param]
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert float(param.detach().max()) < 1.0
