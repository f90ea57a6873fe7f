"""The training loss: cross-entropy on supervised (suffix + eos) positions only.

PaliGemma's own ``forward`` applies the 257,216-wide LM head to every position, image tokens and
prompt included, although only the suffix is supervised, and keeps those fp32 logits (and their
gradient) alive for the backward pass. Here:

- the head runs on the supervised positions alone, in chunks of ``chunk_size`` rows, so no fp32
  full-vocabulary tensor larger than one chunk ever exists;
- each chunk is a fused linear + cross-entropy: the forward pass computes the loss AND the
  gradient with respect to the hidden states (softmax minus one-hot, times the head), then frees
  the logits. The backward pass only scales that stored gradient. Compared with checkpointed
  chunks this skips recomputing the 257,216-wide matmul and the log-softmax, a third of the head;
- label smoothing (``train.label_smoothing``, as ``torch.nn.functional.cross_entropy``'s
  ``label_smoothing``) is folded into the same fused loss and gradient;
- the frozen, tied embedding / head weight gets no gradient (it is only computed when the weight
  requires grad, e.g. a full fine-tune);
- the image features run without autograd when nothing in the vision tower and projector is
  trainable (with gradient checkpointing, transformers' ``enable_input_require_grads`` would
  otherwise make SigLIP build a graph and run its backward for nothing), or come precomputed from
  the feature cache (``batch["image_features"]``, see ``pg_tune.data.feature_cache``).

The module returns the *sum* of token losses and the token count; the training loop divides by the
global count of supervised tokens across accumulation steps and ranks (big_vision normalises per
token too, so a long answer is not worth less than a short one). ``sum / count`` equals
``model(**batch).loss`` to floating-point tolerance (``tests/train/test_loss.py``).

Preference tuning needs each answer's summed log-probability rather than one total:
``head_token_logprobs`` is the same fused head returning one log-probability per supervised row
(same chunks, same workspace, gradients made in forward); ``answer_logprobs`` sums them per
sequence (``pg_tune.train.preference``).
"""

from __future__ import annotations

import torch
from torch import nn

from pg_tune.data.collate import IGNORE_INDEX
from pg_tune.models import host_memory
from pg_tune.models.family import ModelFamily

# 256 rows x 257,216 fp32 logits = 263 MB: the largest full-vocabulary tensor the head creates.
DEFAULT_CHUNK_ROWS = 256


def _softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Turn ``logits`` into softmax probabilities in place; return each row's log-sum-exp.

    No second full-vocabulary buffer is allocated. On CPU the rows go a few at a time so each
    block (4 x 257,216 fp32 = 4 MB) stays in cache across the max / exp / sum / divide passes.
    """
    block = 4 if logits.device.type == "cpu" else logits.shape[0]
    lse = logits.new_empty(logits.shape[0])
    for start in range(0, logits.shape[0], block):
        rows = logits[start : start + block]
        row_max = rows.amax(dim=-1, keepdim=True)
        rows.sub_(row_max).exp_()
        total = rows.sum(dim=-1, keepdim=True)
        rows.div_(total)
        lse[start : start + block] = (row_max + total.log()).squeeze(-1)
    return lse


class LogitsWorkspace:
    """The head's full-vocabulary buffers, reused step after step: one per ``slot``.

    A fresh 80 x 257,216 fp32 tensor is a new memory mapping every step on CPU: its first write
    page-faults 82 MB, which made the head's forward matmul 40 % slower than the same-size backward
    one (67 vs 47 ms on bench-mini). Reusing the buffer removes that and the allocator churn. A
    low-precision head (bf16 weight) keeps a second slot for the matmul's own output and the
    gradient cast back to the weight's dtype, next to the fp32 logits.

    Where memory binds (glibc's mmap threshold fixed by ``pg_tune.models.host_memory`` for a
    QLoRA base or one of 1B+ parameters) the buffers are released after each head call instead
    (``settle``): at the PaliGemma 2 3B shape keeping them raised the peak RSS by 0.06 GB, and a
    fresh mapping's page faults do not show next to a 3B step.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def settle(self) -> None:
        """After a head call: keep the buffers for the next one, unless memory binds."""
        if host_memory.memory_binds():
            self._buffers.clear()

    def get(
        self, rows: int, cols: int, dtype: torch.dtype, device: torch.device, slot: str = "logits"
    ) -> torch.Tensor:
        need = rows * cols
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(slot, None)  # free the old buffer before allocating the larger one
            buf = None
            self._buffers[slot] = buf = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(rows, cols)


def _scratch(
    workspace: LogitsWorkspace | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    slot: str,
) -> torch.Tensor:
    """A full-vocabulary buffer: the workspace's ``slot`` when there is one, else a fresh tensor."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(*shape, dtype, device, slot)


def _chunk_loss_and_grads(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None,
    want_hidden_grad: bool,
    want_weight_grad: bool,
    workspace: LogitsWorkspace | None = None,
    label_smoothing: float = 0.0,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row cross-entropy of one chunk, and the gradients of ``sum(row_scale * loss)`` (of the
    plain sum without ``row_scale``); the logits never leave here.

    With label smoothing ``eps`` over ``V`` classes the target is ``(1 - eps) * one_hot + eps / V``
    (PyTorch's definition), so per row ``loss = lse - (1 - eps) * z[t] - eps * mean(z)`` and
    ``d loss / d z = softmax(z) - (1 - eps) * one_hot - eps / V``, ``z`` being the capped logits.
    """
    # At least fp32: bf16 logits over 257,216 classes lose the loss's precision.
    logits_dtype = torch.promote_types(weight.dtype, torch.float32)
    shape = (hidden.shape[0], weight.shape[0])
    logits = _scratch(workspace, shape, logits_dtype, hidden.device, "logits")
    low_logits = None  # the matmul's own output when the weight is bf16 / fp16
    if logits_dtype == weight.dtype:
        torch.mm(hidden.to(weight.dtype), weight.T, out=logits)
    else:
        low_logits = _scratch(workspace, shape, weight.dtype, hidden.device, "low")
        logits.copy_(torch.mm(hidden.to(weight.dtype), weight.T, out=low_logits))
    capped_tanh = None
    if softcap:
        logits.div_(softcap).tanh_()
        if want_hidden_grad or want_weight_grad:
            capped_tanh = _scratch(workspace, shape, logits.dtype, logits.device, "tanh").copy_(logits)
        logits.mul_(softcap)
    rows = torch.arange(targets.numel(), device=targets.device)
    target_logits = logits[rows, targets]
    if label_smoothing:
        # Read before the softmax overwrites the logits: -sum_j log p_j / V = lse - mean(z).
        mean_logits = logits.mean(dim=-1)
    lse = _softmax_in_place(logits)  # logits now hold the softmax
    if label_smoothing:
        loss = lse - (1.0 - label_smoothing) * target_logits - label_smoothing * mean_logits
    else:
        loss = lse - target_logits
    if not (want_hidden_grad or want_weight_grad):
        return loss, None, None
    grad_logits = logits
    if label_smoothing:
        grad_logits.sub_(label_smoothing / grad_logits.shape[-1])
        grad_logits[rows, targets] -= 1.0 - label_smoothing
    else:
        grad_logits[rows, targets] -= 1.0
    if capped_tanh is not None:
        # d(c * tanh(z / c)) / dz = 1 - tanh(z / c)^2
        grad_logits.mul_(capped_tanh.square_().neg_().add_(1.0))
        del capped_tanh
    if row_scale is not None:
        grad_logits.mul_(row_scale.to(grad_logits.dtype).unsqueeze(1))
    if low_logits is not None:
        grad_logits = low_logits.copy_(grad_logits)
    grad_hidden = (grad_logits @ weight).to(hidden.dtype) if want_hidden_grad else None
    grad_weight = (grad_logits.T @ hidden.to(weight.dtype)) if want_weight_grad else None
    return loss, grad_hidden, grad_weight


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(softcap(hidden @ weight.T), targets), with gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_rows, workspace, label_smoothing):
        want_hidden_grad = ctx.needs_input_grad[0]
        want_weight_grad = ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight_grad else None
        # The head runs in the weight's dtype whatever autocast says: the loss owns its precision.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, targets.numel(), chunk_rows):
                stop = start + chunk_rows
                loss, g_h, g_w = _chunk_loss_and_grads(
                    hidden[start:stop],
                    targets[start:stop],
                    weight,
                    softcap,
                    want_hidden_grad,
                    want_weight_grad,
                    workspace,
                    label_smoothing,
                )
                total += loss.sum()
                if g_h is not None:
                    grad_hidden[start:stop] = g_h
                if g_w is not None:
                    grad_weight += g_w
        if workspace is not None:
            workspace.settle()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        out_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        out_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return out_hidden, out_weight, None, None, None, None, None


def head_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    workspace: LogitsWorkspace | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Summed token cross-entropy of ``softcap(hidden @ weight.T)`` against ``targets`` (fp32).

    ``hidden`` is ``[rows, hidden_size]`` (supervised positions only), ``weight`` the
    ``[vocab, hidden_size]`` head. Differentiable in ``hidden`` (and ``weight`` if it requires grad).
    ``workspace`` (optional) holds the logits buffer between calls. ``label_smoothing`` is
    ``torch.nn.functional.cross_entropy``'s (uniform over the head's whole vocabulary).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    return _FusedHeadCrossEntropy.apply(
        hidden,
        weight,
        targets,
        float(softcap) if softcap else None,
        chunk_rows,
        workspace,
        float(label_smoothing),
    )


class _FusedHeadTokenLogprobs(torch.autograd.Function):
    """Per row, log p(target) under softcap(hidden @ weight.T), the logits never kept.

    Forward computes each row's log-probability and, when only ``hidden`` needs a gradient (LoRA,
    partial: the head is frozen), each row's gradient with respect to its hidden state; backward then
    only scales those rows by the upstream gradient. When the head weight needs a gradient too (a full
    fine-tune's tied head), that gradient mixes the rows with weights known only in backward, so
    backward recomputes the logits chunk by chunk instead (one more pair of head matmuls).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_rows, workspace):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        precompute = want_hidden_grad and not want_weight_grad
        logprobs = torch.empty(
            targets.numel(), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device
        )
        grad_hidden = torch.empty_like(hidden) if precompute else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, targets.numel(), chunk_rows):
                stop = start + chunk_rows
                loss, g_h, _ = _chunk_loss_and_grads(
                    hidden[start:stop], targets[start:stop], weight, softcap, precompute, False, workspace
                )
                logprobs[start:stop] = -loss
                if g_h is not None:
                    grad_hidden[start:stop] = g_h
        if workspace is not None:
            workspace.settle()
        ctx.softcap, ctx.chunk_rows, ctx.workspace = softcap, chunk_rows, workspace
        if want_weight_grad:
            ctx.save_for_backward(hidden, weight, targets)
        else:
            ctx.save_for_backward(grad_hidden)
        return logprobs

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[1]:
            (grad_hidden,) = ctx.saved_tensors
            if grad_hidden is None:
                return None, None, None, None, None, None
            # d log p / d h = -(d CE / d h): the stored CE gradient, scaled per row.
            return (
                grad_hidden * (-grad_output).to(grad_hidden.dtype).unsqueeze(1),
                None,
                None,
                None,
                None,
                None,
            )
        hidden, weight, targets = ctx.saved_tensors
        want_hidden_grad = ctx.needs_input_grad[0]
        out_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        out_weight = torch.zeros_like(weight, dtype=torch.float32)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, targets.numel(), ctx.chunk_rows):
                stop = start + ctx.chunk_rows
                _, g_h, g_w = _chunk_loss_and_grads(
                    hidden[start:stop],
                    targets[start:stop],
                    weight,
                    ctx.softcap,
                    want_hidden_grad,
                    True,
                    ctx.workspace,
                    row_scale=-grad_output[start:stop],
                )
                if g_h is not None:
                    out_hidden[start:stop] = g_h
                out_weight += g_w
        if ctx.workspace is not None:
            ctx.workspace.settle()
        return out_hidden, out_weight.to(weight.dtype), None, None, None, None


def head_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    workspace: LogitsWorkspace | None = None,
) -> torch.Tensor:
    """``log softmax(softcap(hidden @ weight.T))[row, target]`` for every row (fp32), through the same
    fused, chunked head as ``head_cross_entropy_sum``: no full-vocabulary tensor beyond one chunk.

    Differentiable in ``hidden`` (and ``weight`` if it requires grad).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if targets.numel() == 0:
        return hidden.sum(dim=-1) * 0.0
    return _FusedHeadTokenLogprobs.apply(
        hidden, weight, targets, float(softcap) if softcap else None, chunk_rows, workspace
    )


def supervised_rows(
    last_hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states whose next token is supervised, those tokens, and each one's batch row.

    Position t predicts token t + 1, so row ``r``'s states ``[:, :-1]`` are kept where
    ``labels[:, 1:]`` is not ``IGNORE_INDEX``.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return last_hidden[:, :-1][mask], targets[mask], mask.nonzero()[:, 0]


def answer_logprobs(
    model: nn.Module,
    family: ModelFamily,
    batch: dict[str, torch.Tensor],
    image_features: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    workspace: LogitsWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its supervised tokens (target + end token) and their
    count: ``([rows], [rows])``. ``image_features`` are placed at the image tokens of every row."""
    core = family.unwrap(model)
    last_hidden = family.decoder_hidden(core, batch, image_features)
    hidden, targets, row_of = supervised_rows(last_hidden, batch["labels"])
    weight, softcap = family.head(core)
    token_logprobs = head_token_logprobs(hidden, weight, targets, softcap, chunk_size, workspace)
    rows = batch["labels"].shape[0]
    sums = token_logprobs.new_zeros(rows).index_add(0, row_of, token_logprobs)
    counts = torch.bincount(row_of, minlength=rows)
    return sums, counts


class SuffixLoss(nn.Module):
    """Wraps a (peft) model; ``forward(batch)`` returns ``(loss_sum, n_supervised_tokens)``.

    Wrapping makes the loss part of ``forward``, so DDP/FSDP see one module call per step.
    ``batch`` is the family collator's output; with the feature cache it carries ``image_features``
    instead of (or besides) ``pixel_values`` and the image encoder is skipped. Everything
    model-specific comes from the model's ``family``: its image features, the decoder's hidden
    states, the head weight and soft-cap.
    """

    def __init__(
        self,
        model: nn.Module,
        family: ModelFamily,
        chunk_size: int = DEFAULT_CHUNK_ROWS,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.family = family
        self.label_smoothing = label_smoothing
        self.workspace = LogitsWorkspace()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.family.unwrap(self.model)
        if "image_features" in batch:
            features = batch["image_features"].to(core.dtype)
        else:
            features = self.family.image_features(core, batch)
        last_hidden = self.family.decoder_hidden(core, batch, features)
        hidden, targets, _ = supervised_rows(last_hidden, batch["labels"])
        weight, softcap = self.family.head(core)
        total = head_cross_entropy_sum(
            hidden, weight, targets, softcap, self.chunk_size, self.workspace, self.label_smoothing
        )
        return total, torch.tensor(targets.numel(), device=targets.device)
