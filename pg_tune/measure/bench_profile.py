"""Where one pg_tune training step spends its time: data, vision, decoder, head, backward, optimizer.

    python -m pg_tune.measure.bench --preset bench-mini --profile            # fp32
    python -m pg_tune.measure.bench --preset bench-mini --profile --dtype bfloat16
    python -m pg_tune.measure.bench --preset bench-mini --profile --ops 15   # + the top operators

The step is ``SuffixLoss``'s, taken apart: each part runs on its own and is timed with the wall clock
and with this process's CPU time (``--threads`` threads, synchronised on CUDA), medians over
``--steps`` steps after ``--warmup``. On a machine other jobs share, the CPU column is the one to
read: it counts the part's work, not the time it waited for a core.
The parts add up to the step (the sum is printed beside the whole step timed in one piece):

- data: the next batch from pg_tune's DataLoader (image decode and resize, tokenisation, collation);
- vision: the frozen image encoder and projector (``ModelFamily.image_features``, no autograd);
- decoder: the language model's forward to the last hidden states (``decoder_hidden``);
- head: the fused suffix-only LM head, forward and the gradient it makes at the same time;
- backward: autograd from the hidden states back through the decoder (LoRA gradients included);
- optimizer: gradient clipping, AdamW's step and zeroing the gradients.

``--ops N`` also profiles the timed steps with torch.profiler (set-up left out) and prints the top
N operators by self time, then every operator's self time summed by class (matrix products,
attention kernels, activations, softmax and exp, other ATen operators, and what runs outside ATen:
Python, autograd nodes, data loading), each class's share of the step.
"""

from __future__ import annotations

import itertools
import statistics

PARTS = ("data", "vision", "decoder", "head", "backward", "optimizer")


def profile_pg_tune(
    args, samples, device: str, family, profiler=None
) -> dict[str, list[tuple[float, float]]]:
    """Per-part (wall, CPU) seconds of each timed step (and ``step``: the whole step in one piece).
    CPU seconds (all threads of this process) are the part's work whatever else runs here.
    ``profiler`` (a ``torch.profiler.profile``) is started at the first timed step and stopped after
    the last, so it sees the steps and not the set-up or the warm-up."""
    import torch

    from pg_tune.data.collate import IGNORE_INDEX
    from pg_tune.data.loader import build_train_loader
    from pg_tune.measure.bench_setup import base_model, bench_recipe, step_mark
    from pg_tune.train.adapters import prepare_model
    from pg_tune.train.loss import SuffixLoss, head_cross_entropy_sum
    from pg_tune.train.optim import build_optimizer

    recipe = bench_recipe(args)
    model, processor = base_model(args, device, family)
    model = prepare_model(model, recipe, family)
    loader = build_train_loader(samples, processor, recipe, family)
    loss_module = SuffixLoss(model, family).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe.train)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    core = family.unwrap(model)
    batches = _endless(loader)
    times: dict[str, list[tuple[float, float]]] = {part: [] for part in (*PARTS, "step")}

    def clock() -> tuple[float, float]:
        return step_mark(device)

    def took(a, b) -> tuple[float, float]:
        return b[0] - a[0], b[1] - a[1]

    for step in range(args.warmup + args.steps):
        if profiler is not None and step == args.warmup:
            profiler.start()
        # The step in parts.
        t0 = clock()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        t1 = clock()
        with autocast:
            features = family.image_features(core, batch)
            t2 = clock()
            hidden = family.decoder_hidden(core, batch, features)
            t3 = clock()
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            weight, softcap = family.head(core)
            total = head_cross_entropy_sum(
                hidden[:, :-1][mask], weight, targets[mask], softcap, workspace=loss_module.workspace
            )
        t4 = clock()
        (total / mask.sum()).backward()
        t5 = clock()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t6 = clock()
        # The same step in one piece, as pg_tune.measure.bench times it.
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with autocast:
            loss_sum, count = loss_module(batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t7 = clock()
        if step >= args.warmup:
            for part, seconds in zip(PARTS, itertools.pairwise((t0, t1, t2, t3, t4, t5, t6)), strict=True):
                times[part].append(took(*seconds))
            times["step"].append(took(t6, t7))
    if profiler is not None:
        profiler.stop()
    return times


def top_operators(args, samples, device: str, family, count: int) -> str:
    """torch.profiler's table of the ``count`` operators with the most self time over the timed
    steps, then the self times summed by operator class (``operator_classes``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities)
    profile_pg_tune(args, samples, device, family, profiler=prof)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    # Each timed step runs twice: in parts, then in one piece.
    passes = 2 * args.steps
    totals = [(e.key, getattr(e, key)) for e in events]
    return (
        events.table(sort_by=key, row_limit=count) + "\n" + format_classes(operator_classes(totals), passes)
    )


MATRIX_PRODUCTS = frozenset(
    f"aten::{name}"
    for name in (
        *("mm", "addmm", "addmm_", "bmm", "baddbmm", "_addmm_activation"),
        *("mkldnn_convolution", "convolution_backward", "_convolution", "cudnn_convolution"),
    )
)
ACTIVATIONS = frozenset(
    f"aten::{name}{suffix}"
    for name in ("gelu", "silu", "tanh", "sigmoid")
    for suffix in ("", "_", "_backward")
)
SOFTMAX_AND_EXP = frozenset(
    f"aten::{name}"
    for name in (
        *("exp", "exp_", "amax", "logsumexp", "log", "log_"),
        *("_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data"),
    )
)
CLASSES = (
    "matrix products",
    "attention kernels",
    "activations (GELU, SiLU, tanh)",
    "softmax and exp",
    "other ATen operators",
    "outside ATen (Python, autograd nodes, data)",
)


def operator_class(name: str) -> str:
    """The class of one profiler entry, by its name."""
    if name in MATRIX_PRODUCTS:
        return CLASSES[0]
    if "scaled_dot_product" in name or "flash_attention" in name:
        return CLASSES[1]
    if name in ACTIVATIONS:
        return CLASSES[2]
    if name in SOFTMAX_AND_EXP:
        return CLASSES[3]
    if name.startswith("aten::"):
        return CLASSES[4]
    return CLASSES[5]


def operator_classes(self_times: list[tuple[str, float]]) -> dict[str, float]:
    """Self time (the profiler's unit) summed per class, every class present, in ``CLASSES``'
    order. Self times do not overlap, so the classes add up to the profiled time."""
    totals = dict.fromkeys(CLASSES, 0.0)
    for name, self_time in self_times:
        totals[operator_class(name)] += self_time
    return totals


def format_classes(totals: dict[str, float], passes: int) -> str:
    """The class table: time per step (``passes`` steps profiled; times in microseconds) and share."""
    whole = sum(totals.values()) or 1.0
    lines = [f"{'operator class':<45} {'ms/step':>9} {'share':>7}", "-" * 63]
    for name, total in totals.items():
        lines.append(f"{name:<45} {total / 1e3 / max(passes, 1):9.1f} {100 * total / whole:6.1f}%")
    return "\n".join(lines)


def format_profile(times: dict[str, list[tuple[float, float]]], batch_size: int) -> str:
    """The breakdown: median wall and CPU ms per part, each part's share of the CPU sum, and the
    whole step."""
    wall = {part: statistics.median(w for w, _ in times[part]) for part in (*PARTS, "step")}
    cpu = {part: statistics.median(c for _, c in times[part]) for part in (*PARTS, "step")}
    total_wall, total_cpu = sum(wall[p] for p in PARTS), sum(cpu[p] for p in PARTS)
    lines = [f"{'part':<10} {'wall ms':>9} {'CPU ms':>9} {'CPU share':>10}", "-" * 41]
    for part in PARTS:
        lines.append(
            f"{part:<10} {1e3 * wall[part]:9.1f} {1e3 * cpu[part]:9.1f} {100 * cpu[part] / total_cpu:9.1f}%"
        )
    lines.append(f"{'sum':<10} {1e3 * total_wall:9.1f} {1e3 * total_cpu:9.1f}")
    lines.append(
        f"{'step':<10} {1e3 * wall['step']:9.1f} {1e3 * cpu['step']:9.1f}"
        f"   (timed in one piece; {batch_size / wall['step']:.2f} samples/s wall)"
    )
    return "\n".join(lines)


def _endless(loader):
    while True:
        yield from loader
