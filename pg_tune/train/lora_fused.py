"""LoRA's forward and backward in one autograd node per adapted layer (``LoraDelta``).

peft's vanilla LoRA layer computes ``result + lora_B(lora_A(x)) * scaling``: three full-size
tensors per layer and step (``lora_B``'s output, its scaled copy, the sum), each a pass over memory,
and autograd then takes ``lora_B``'s weight gradient as ``grad.T @ lora_A_out``, a
``[out, tokens] x [tokens, r]`` product that MKL runs at a few GFLOP/s (6.2 ms for 1,024 x 1,184 x 8
on one core, against 0.5 ms for the same numbers as ``(lora_A_out.T @ grad).T``).

``LoraDelta`` adds ``scaling * (x @ A.T) @ B.T`` to the base layer's output with one ``addmm`` (in
place where the output is a plain ``nn.Linear``'s in the LoRA compute dtype), saves only ``x``
(shared with the base layer) and the rank-``r`` product, and computes the gradients in the fast
orientation. The numbers are the same up to floating-point rounding (one fused multiply-add
instead of three roundings; ``tests/train/test_lora_fused.py`` checks loss and gradients against
peft's own path): ``docs/performance.md`` has what it buys.

The compute dtype follows ``UpcastLoraA`` (``pg_tune.train.adapters``): autocast's dtype under
autocast, else the LoRA weight's (fp32); a bf16 or 4-bit base's input is cast inside the product,
so only the input itself is saved, in the model's dtype.

Only peft's vanilla path is replaced: a layer that is merged, has adapters disabled, is called with
extra arguments (``adapter_names`` for mixed batches), runs a variant (DoRA) or has a LoRA bias
keeps peft's own forward. The swap changes the module's class only (``peft_model.modules()`` are
still peft's ``LoraLayer``s): same parameters, same state dict, same saved adapter.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a LoRA product runs in: autocast's under autocast (as ``nn.Linear`` there), else the
    adapter weight's (fp32)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class LoraDelta(torch.autograd.Function):
    """``result + scaling * (x @ A.T) @ B.T`` as one node; ``x`` is the adapter's input (after
    dropout), ``result`` the base layer's output."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling: float, in_place: bool):
        dtype = lora_compute_dtype(x, weight_a)
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1])
            low_rank = torch.mm(rows.to(dtype), weight_a.to(dtype).T)  # [tokens, r]
            flat = result.reshape(-1, result.shape[-1])
            if in_place and flat.dtype == dtype and result.is_contiguous():
                flat.addmm_(low_rank, weight_b.to(dtype).T, alpha=scaling)
                ctx.mark_dirty(result)
                out = result
            else:
                total = torch.promote_types(result.dtype, dtype)
                out = torch.addmm(flat.to(total), low_rank.to(total), weight_b.to(total).T, alpha=scaling)
                out = out.to(result.dtype).view(result.shape)
        ctx.compute_dtype, ctx.scaling = dtype, scaling
        ctx.save_for_backward(x, low_rank, weight_a, weight_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, low_rank, weight_a, weight_b = ctx.saved_tensors
        dtype, scaling = ctx.compute_dtype, ctx.scaling
        grads = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_low_rank = torch.mm(grads, weight_b.to(dtype)).mul_(scaling)  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(grad_low_rank, weight_a.to(dtype)).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_a = torch.mm(grad_low_rank.T, x.reshape(-1, x.shape[-1]).to(dtype)).to(weight_a.dtype)
        if ctx.needs_input_grad[3]:
            # [r, tokens] x [tokens, out], transposed: the fast orientation of grad.T @ low_rank.
            grad_b = torch.mm(low_rank.T, grads).T.mul(scaling).to(weight_b.dtype)
        grad_result = grad if ctx.needs_input_grad[0] else None
        return grad_result, grad_x, grad_a, grad_b, None, None


class FusedLoraForward:
    """Mixed in before a peft LoRA layer class: the vanilla path through ``LoraDelta``, anything
    else through peft's own ``forward``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or not self._fusable():
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            dropout = self.lora_dropout[name]
            adapter_input = x if isinstance(dropout, nn.Identity) else dropout(x)
            result = LoraDelta.apply(
                result,
                adapter_input,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                type(self.base_layer) is nn.Linear,  # only a plain nn.Linear's fresh output, in place
            )
        return result

    def _fusable(self) -> bool:
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if (
                name in self.lora_variant
                or self.lora_B[name].bias is not None
                or self.lora_A[name].bias is not None
            ):
                return False
        return True


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedLoraForward, cls), {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def _fusable_classes() -> tuple[type, ...]:
    """peft's vanilla linear LoRA layers: plain, and on bitsandbytes' 4-bit / 8-bit bases."""
    from peft.tuners.lora import bnb  # defines its classes only where bitsandbytes imports
    from peft.tuners.lora.layer import Linear

    return (Linear, *(getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)))


def fuse_lora_layers(peft_model: nn.Module) -> int:
    """Give every vanilla linear LoRA layer ``LoraDelta``'s forward (a class swap: same parameters
    and state dict). Returns the layers changed."""
    classes = _fusable_classes()
    changed = 0
    for module in peft_model.modules():
        cls = type(module)
        if cls in classes:
            module.__class__ = _fused_class(cls)
            changed += 1
    return changed
