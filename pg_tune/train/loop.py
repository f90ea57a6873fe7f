"""The training loop: setup → evaluate → train → save → evaluate, read top to bottom.

Run it with ``pg-tune train RECIPE [key.sub=value ...]``; the same command runs under
``accelerate launch -m pg_tune train RECIPE`` or ``torchrun -m pg_tune train RECIPE`` on many
processes. Pieces it calls (loss, checkpoints, metrics log, generation) live in their own modules.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pg_tune.config.recipe import Recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.loader import build_train_loader
from pg_tune.evaluate.run import evaluate_samples
from pg_tune.models.paligemma import load_model, load_processor, resolve_dtype
from pg_tune.train.adapters import prepare_model, trainable_summary
from pg_tune.train.checkpoint import save_checkpoint
from pg_tune.train.logbook import MetricsLog
from pg_tune.train.loss import SuffixLoss
from pg_tune.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    model: Any = field(default=None, repr=False)
    """The trained peft model, for callers using pg_tune as a library."""


def _mixed_precision(recipe: Recipe) -> str:
    choice = recipe.train.mixed_precision
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def train(recipe: Recipe, resolved_recipe: dict[str, Any]) -> TrainResult:
    started = time.time()
    # --- setup -------------------------------------------------------------------------------
    output_dir = Path(recipe.output_dir)
    trackers = list(recipe.logging.trackers)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(recipe),
        log_with=trackers or None,
        project_dir=str(output_dir),
    )
    main = accelerator.is_main_process
    say = accelerator.print
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
        say(yaml.safe_dump(resolved_recipe, sort_keys=False))
    if trackers:
        accelerator.init_trackers(
            recipe.logging.project,
            config=_flat_scalars(resolved_recipe),
            init_kwargs={
                "wandb": {
                    "name": recipe.logging.run_name,
                    "dir": str(output_dir),
                    "mode": recipe.logging.wandb_mode,
                }
            },
        )

    bad_rows = BadRows(recipe.data.on_bad_row)
    train_samples = build_samples(recipe.data.train, "train", bad_rows, seed=recipe.train.seed)
    eval_samples = build_samples(recipe.data.eval, "eval", bad_rows, seed=recipe.train.seed)
    say(f"data: {len(train_samples)} train samples, {len(eval_samples)} eval samples; {bad_rows.report()}")
    if not train_samples:
        raise ValueError("data.train produced no samples")

    processor = load_processor(recipe.model)
    model = load_model(recipe.model, recipe.quantization)
    set_seed(recipe.train.seed)  # after the base is built, so adapters and shuffling follow the recipe's seed
    model = prepare_model(model, recipe)
    say(trainable_summary(model))

    train_loader = build_train_loader(train_samples, processor, recipe)
    loss_module = SuffixLoss(model)
    optimizer = build_optimizer(model.parameters(), recipe.train)
    loss_module, optimizer, train_loader = accelerator.prepare(loss_module, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.grad_accum)
    total_steps = recipe.train.max_steps or recipe.train.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    peft_model = accelerator.unwrap_model(loss_module).model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    log = MetricsLog(output_dir / "metrics.jsonl", enabled=main)

    # --- evaluate the base -------------------------------------------------------------------
    metrics_before: dict[str, float] = {}
    if eval_samples and recipe.eval.before_training:
        metrics_before = evaluate_samples(accelerator, peft_model, processor, eval_samples, recipe)
        say(f"eval before training: {json.dumps(metrics_before)}")
        log.write({"step": 0, **{f"eval/{k}": v for k, v in metrics_before.items()}})

    # --- train -------------------------------------------------------------------------------
    step, first_loss, last_loss = 0, math.nan, math.nan
    samples_seen, tokens_seen, truncated = 0, 0, 0
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process)
    window_start = time.time()
    loss_module.train()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        batches = iter(train_loader)
        while step < total_steps:
            window = list(itertools.islice(batches, recipe.train.grad_accum))
            if not window:
                break
            # Normalise by the GLOBAL count of supervised tokens in this optimizer step (all
            # micro-batches, all ranks); DDP averages gradients over ranks, hence the world factor.
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            global_tokens = int(
                accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum")
            )
            scale = accelerator.num_processes / max(global_tokens, 1)
            step_loss_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(window):
                sync = i == len(window) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(loss_module):
                    with accelerator.autocast():
                        loss_sum, _ = loss_module(batch)
                    accelerator.backward(loss_sum * scale)
                step_loss_sum += loss_sum.detach().float()
                samples_seen += batch["input_ids"].shape[0]
                truncated += int(batch["truncated"].sum())
            grad_norm = accelerator.clip_grad_norm_(trainable, recipe.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += global_tokens
            loss_value = float(accelerator.reduce(step_loss_sum, "sum")) / max(global_tokens, 1)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite loss {loss_value} at step {step} (epoch {epoch})")
            first_loss = loss_value if step == 1 else first_loss
            last_loss = loss_value
            progress.update(1)
            if step % recipe.train.log_every == 0 or step == 1 or step == total_steps:
                elapsed = max(time.time() - window_start, 1e-9)
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": samples_seen * accelerator.num_processes / elapsed,
                    "supervised_tokens": tokens_seen,
                }
                progress.set_postfix(
                    loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}"
                )
                log.write(record)
                if trackers:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                samples_seen, window_start = 0, time.time()
            if recipe.train.save_every and step % recipe.train.save_every == 0 and main:
                save_checkpoint(
                    output_dir / "checkpoints",
                    step,
                    peft_model,
                    optimizer,
                    scheduler,
                    {"step": step, "epoch": epoch},
                    recipe.train.keep_last,
                )
            if recipe.eval.every and step % recipe.eval.every == 0 and eval_samples:
                metrics = evaluate_samples(accelerator, peft_model, processor, eval_samples, recipe)
                say(f"\neval at step {step}: {json.dumps(metrics)}")
                log.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        if step >= total_steps:
            break
    progress.close()
    if truncated:
        say(
            f"note: {truncated} training rows had their suffix truncated to data.max_text_length="
            f"{recipe.data.max_text_length}"
        )

    # --- save --------------------------------------------------------------------------------
    adapter_dir = output_dir / "adapter"
    accelerator.wait_for_everyone()
    if main:
        peft_model.save_pretrained(adapter_dir)
        processor.save_pretrained(adapter_dir)
        (adapter_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))

    # --- evaluate the adapted model ------------------------------------------------------------
    metrics_after: dict[str, float] = {}
    if eval_samples:
        metrics_after = evaluate_samples(accelerator, peft_model, processor, eval_samples, recipe)
        say(f"eval after training: {json.dumps(metrics_after)}")
        log.write({"step": step, **{f"eval/{k}": v for k, v in metrics_after.items()}})
    if trackers:
        accelerator.log({f"eval/{k}": v for k, v in metrics_after.items()}, step=step)
        accelerator.end_training()
    result = TrainResult(
        output_dir,
        adapter_dir,
        step,
        first_loss,
        last_loss,
        metrics_before,
        metrics_after,
        time.time() - started,
        model=peft_model,
    )
    if main:
        (output_dir / "summary.json").write_text(
            json.dumps(
                {
                    "steps": step,
                    "first_loss": first_loss,
                    "last_loss": last_loss,
                    "metrics_before": metrics_before,
                    "metrics_after": metrics_after,
                    "seconds": result.seconds,
                    "world_size": accelerator.num_processes,
                    "dtype": str(resolve_dtype(recipe.model.dtype)),
                },
                indent=2,
            )
        )
    return result
