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
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from pg_tune.config.recipe import Recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.loader import build_train_loader, prepare_feature_cache
from pg_tune.data.safe_collate import BAD_ROWS_KEY, SafeCollator, batch_rows
from pg_tune.data.sample import DataError
from pg_tune.evaluate.run import evaluate_samples
from pg_tune.hub import push_from_training
from pg_tune.models.family import family_for, resolve_dtype
from pg_tune.train.adapters import prepare_model, trainable_summary
from pg_tune.train.checkpoint import BestPolicy, best_checkpoint, load_checkpoint, read_state, save_checkpoint
from pg_tune.train.logbook import MetricsLog
from pg_tune.train.loss import SuffixLoss
from pg_tune.train.optim import build_optimizer, build_scheduler
from pg_tune.train.resume import (
    capture_rng,
    check_fingerprint,
    find_resume_checkpoint,
    restore_rng,
    run_fingerprint,
    truncate_metrics_log,
)
from pg_tune.train.signals import (
    NonFiniteError,
    StopSignals,
    TrainingInterrupted,
    maybe_kill_after_checkpoint,
)


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
    is_main_process: bool = True
    best_checkpoint: Path | None = None
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


def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _tracker_run_ids(accelerator: Accelerator, trackers: list[str]) -> dict[str, str]:
    ids = {}
    if "wandb" in trackers and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        if getattr(run, "id", None):
            ids["wandb"] = run.id
    return ids


def _adapter_state_for_saving(accelerator: Accelerator, loss_module) -> dict[str, torch.Tensor] | None:
    """Under FSDP or DeepSpeed the parameters are sharded: gather a full state dict (every rank
    takes part) so the main process writes a normal PEFT adapter. ``None`` means "read the model"."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    state = accelerator.get_state_dict(loss_module)  # keys of the SuffixLoss wrapper: "model.<peft key>"
    return {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None


def train(recipe: Recipe, resolved_recipe: dict[str, Any], resume: str | None = None) -> TrainResult:
    """Fine-tune as the recipe says; ``resume`` (``auto`` or a path) continues from a checkpoint."""
    started = time.time()
    # --- setup -------------------------------------------------------------------------------
    output_dir = Path(recipe.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    resume_from = find_resume_checkpoint(resume, output_dir) if resume else None
    resumed = read_state(resume_from) if resume_from else {}
    trackers = list(recipe.logging.trackers)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(recipe),
        log_with=trackers or None,
        project_dir=str(output_dir),
        # The shuffling order of epoch e is a function of (seed + e) alone, so a resumed run can
        # rebuild it and skip the batches already seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
    )
    main = accelerator.is_main_process
    say = accelerator.print
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
        say(yaml.safe_dump(resolved_recipe, sort_keys=False))
        if resume_from:
            dropped = truncate_metrics_log(output_dir / "metrics.jsonl", resumed["step"])
            say(f"resuming from {resume_from} (step {resumed['step']}); dropped {dropped} later log records")
        elif resume:
            say(f"--resume {resume}: no checkpoint under {checkpoints_dir}, starting from scratch")
    if trackers:
        init_kwargs: dict[str, Any] = {}
        if "wandb" in trackers:
            init_kwargs["wandb"] = {
                "name": recipe.logging.run_name,
                "dir": str(output_dir),
                "mode": recipe.logging.wandb_mode,
            }
            if run_id := resumed.get("tracker_run_ids", {}).get("wandb"):
                init_kwargs["wandb"].update(id=run_id, resume="allow")
        accelerator.init_trackers(
            recipe.logging.project, config=_flat_scalars(resolved_recipe), init_kwargs=init_kwargs
        )
    tracker_run_ids = _tracker_run_ids(accelerator, trackers)

    bad_rows = BadRows(recipe.data.on_bad_row)
    family = family_for(recipe.model.name_or_path)
    train_samples = build_samples(recipe.data.train, "train", bad_rows, seed=recipe.train.seed, family=family)
    eval_samples = build_samples(recipe.data.eval, "eval", bad_rows, seed=recipe.train.seed, family=family)
    say(f"data: {len(train_samples)} train samples, {len(eval_samples)} eval samples; {bad_rows.report()}")
    if not train_samples:
        raise ValueError("data.train produced no samples")

    processor = family.load_processor(recipe.model)
    # A quantized base cannot be moved after loading: each rank loads (and quantizes) its own
    # copy straight onto its own device.
    quantized = recipe.quantization.mode != "none"
    device_map = {"": accelerator.device} if quantized and accelerator.device.type != "cpu" else None
    model = family.load_model(recipe.model, recipe.quantization, device_map=device_map)
    set_seed(recipe.train.seed)  # after the base is built, so adapters and shuffling follow the recipe's seed
    model = prepare_model(model, recipe)
    say(trainable_summary(model))
    fingerprint = run_fingerprint(recipe, model)
    if resume_from:
        stored = json.loads(fp.read_text()) if (fp := resume_from / "fingerprint.json").is_file() else None
        check_fingerprint(resume_from, stored, fingerprint)

    feature_cache = None
    if recipe.data.feature_cache:
        if not quantized:
            model.to(accelerator.device)
        with accelerator.main_process_first():  # one rank writes the cache, the others then read it
            feature_cache = prepare_feature_cache(train_samples, model, processor, recipe, family)
    train_loader = build_train_loader(train_samples, processor, recipe, feature_cache, family)
    # Rows whose image fails to load mid-training are dropped and counted (skip) or named (stop).
    train_loader.collate_fn = SafeCollator(train_loader.collate_fn, recipe.data.on_bad_row)
    loss_module = SuffixLoss(model, family=family)
    optimizer = build_optimizer(model.parameters(), recipe.train)
    loss_module, optimizer, train_loader = accelerator.prepare(loss_module, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.grad_accum)
    total_steps = recipe.train.max_steps or recipe.train.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    peft_model = accelerator.unwrap_model(loss_module).model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    log = MetricsLog(output_dir / "metrics.jsonl", enabled=main)
    best = BestPolicy(recipe.eval.best_metric, recipe.eval.best_mode) if recipe.eval.best_metric else None

    # --- restore -------------------------------------------------------------------------------
    pending_rng = None
    if resume_from:
        loaded = load_checkpoint(resume_from, peft_model, optimizer, scheduler, accelerator.scaler)
        if loaded.rng_states:
            rank = accelerator.process_index
            pending_rng = loaded.rng_states[rank if rank < len(loaded.rng_states) else 0]
        if resumed.get("total_steps") != total_steps:
            say(
                f"warning: the checkpoint's run had {resumed.get('total_steps')} steps, this one has {total_steps}"
            )
        layout = (accelerator.num_processes, recipe.train.batch_size, recipe.train.grad_accum)
        if tuple(resumed.get("data_layout", layout)) != layout:
            say(
                f"warning: (processes, batch_size, grad_accum) was {resumed['data_layout']}, now {layout}: "
                "the data position in the epoch is approximate"
            )

    # --- evaluate the base -------------------------------------------------------------------
    metrics_before: dict[str, float] = resumed.get("metrics_before", {})
    if eval_samples and recipe.eval.before_training and not resume_from:
        metrics_before = evaluate_samples(accelerator, peft_model, processor, eval_samples, recipe)
        say(f"eval before training: {json.dumps(metrics_before)}")
        log.write({"step": 0, **{f"eval/{k}": v for k, v in metrics_before.items()}})

    # --- train -------------------------------------------------------------------------------
    step = resumed.get("step", 0)
    first_loss, last_loss = resumed.get("first_loss", math.nan), resumed.get("last_loss", math.nan)
    tokens_seen, truncated = resumed.get("tokens_seen", 0), resumed.get("truncated", 0)
    nonfinite_skipped = resumed.get("nonfinite_skipped", 0)
    best_value = resumed.get("best_value")
    train_bad = BadRows("skip")  # rows dropped inside the collator; under "stop" the collator raises
    train_bad.counts.update(resumed.get("bad_rows_in_training", {}))
    start_epoch, skip_batches = resumed.get("epoch", 0), resumed.get("epoch_batches", 0)
    if skip_batches >= len(train_loader):
        start_epoch, skip_batches = start_epoch + 1, 0
    samples_seen = 0
    last_saved = -1

    def checkpoint_now(epoch: int, epoch_batches: int, eval_metrics: dict[str, float]) -> Path | None:
        nonlocal last_saved
        rng = [capture_rng()]
        rng_states = gather_object(rng) if accelerator.num_processes > 1 else rng
        path = None
        if main:
            state = {
                "epoch": epoch,
                "epoch_batches": epoch_batches,
                "total_steps": total_steps,
                "tokens_seen": tokens_seen,
                "truncated": truncated,
                "nonfinite_skipped": nonfinite_skipped,
                "first_loss": first_loss,
                "last_loss": last_loss,
                "best_value": best_value,
                "eval_metrics": eval_metrics,
                "metrics_before": metrics_before,
                "tracker_run_ids": tracker_run_ids,
                "bad_rows_in_training": dict(train_bad.counts),
                "data_layout": [accelerator.num_processes, recipe.train.batch_size, recipe.train.grad_accum],
            }
            path = save_checkpoint(
                checkpoints_dir,
                step,
                peft_model,
                optimizer,
                scheduler,
                state,
                recipe.train.keep_last,
                scaler=accelerator.scaler,
                rng_states=rng_states,
                fingerprint=fingerprint,
                best=best,
            )
        accelerator.wait_for_everyone()
        last_saved = step
        maybe_kill_after_checkpoint(step)
        push_from_training(output_dir, recipe, accelerator, step=step)
        return path or checkpoints_dir / f"step-{step:07d}"

    progress = tqdm(
        total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process
    )
    window_start = time.time()
    loss_module.train()
    with StopSignals() as stop:
        for epoch in range(start_epoch, math.ceil(total_steps / steps_per_epoch)):
            if step >= total_steps:
                break
            train_loader.set_epoch(epoch)
            loader, epoch_batches = train_loader, 0
            if epoch == start_epoch and skip_batches:
                loader = accelerator.skip_first_batches(train_loader, skip_batches)
                loader.set_epoch(epoch)
                epoch_batches = skip_batches
            batches = iter(loader)
            while step < total_steps:
                window = list(itertools.islice(batches, recipe.train.grad_accum))
                if not window:
                    break
                epoch_batches += len(window)
                if pending_rng is not None:
                    # Restored after the resumed loader has started, so dropout and every other
                    # random draw continue exactly where the checkpointed run left them.
                    restore_rng(pending_rng)
                    pending_rng = None
                for batch in window:
                    for reason, message in batch.pop(BAD_ROWS_KEY, []):
                        train_bad.bad(reason, message)
                window = [b for b in window if batch_rows(b)]
                empty_ranks = int(
                    accelerator.reduce(torch.tensor(int(not window), device=accelerator.device), "sum")
                )
                if empty_ranks:
                    if accelerator.num_processes > 1:
                        raise DataError(
                            f"every row of a {recipe.train.grad_accum}-batch window failed to load on "
                            f"{empty_ranks} rank(s) at step {step + 1}: {train_bad.report()}"
                        )
                    continue
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
                grad_norm = float(accelerator.clip_grad_norm_(trainable, recipe.train.max_grad_norm))
                loss_value = float(accelerator.reduce(step_loss_sum, "sum")) / max(global_tokens, 1)
                # Under fp16 the gradient scaler owns inf gradients (it skips the step, lowers the scale).
                grad_bad = accelerator.scaler is None and not math.isfinite(grad_norm)
                if not math.isfinite(loss_value) or grad_bad:
                    optimizer.zero_grad(set_to_none=True)
                    local = [train_samples[int(i)].source for b in window for i in b["sample_index"]]
                    sources = gather_object(local) if accelerator.num_processes > 1 else local
                    what = f"non-finite loss {loss_value} / gradient norm {grad_norm} at step {step + 1} (epoch {epoch})"
                    if recipe.train.on_nonfinite == "skip":
                        nonfinite_skipped += 1
                        say(f"\nwarning: {what}; step skipped ({nonfinite_skipped} so far); rows: {sources}")
                        scheduler.step()  # the schedule follows the data position, update or not
                        step += 1
                        progress.update(1)
                        log.write({"step": step, "epoch": epoch, "nonfinite_skipped": nonfinite_skipped})
                        continue
                    saved = (
                        checkpoint_now(epoch, epoch_batches - len(window), {}) if last_saved != step else None
                    )
                    saved = saved or checkpoints_dir / f"step-{step:07d}"
                    progress.close()
                    raise NonFiniteError(
                        f"{what}; the batch's rows: {', '.join(sources)}. Weights were not updated; the last good "
                        f"state (step {step}) is checkpointed at {saved}. Fix or drop those rows, lower train.lr, "
                        "or set train.on_nonfinite=skip"
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += global_tokens
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
                        "grad_norm": grad_norm,
                        "samples_per_s": samples_seen * accelerator.num_processes / elapsed,
                        "supervised_tokens": tokens_seen,
                    }
                    if nonfinite_skipped:
                        record["nonfinite_skipped"] = nonfinite_skipped
                    progress.set_postfix(
                        loss=f"{loss_value:.4f}",
                        lr=f"{record['lr']:.2e}",
                        sps=f"{record['samples_per_s']:.1f}",
                    )
                    log.write(record)
                    if trackers:
                        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    samples_seen, window_start = 0, time.time()
                # Evaluate before checkpointing, so the checkpoint records the metric that may make it the best.
                eval_metrics: dict[str, float] = {}
                new_best = False
                if recipe.eval.every and step % recipe.eval.every == 0 and eval_samples:
                    eval_metrics = evaluate_samples(accelerator, peft_model, processor, eval_samples, recipe)
                    say(f"\neval at step {step}: {json.dumps(eval_metrics)}")
                    log.write({"step": step, **{f"eval/{k}": v for k, v in eval_metrics.items()}})
                    if best and best.metric in eval_metrics:
                        new_best = _better(eval_metrics[best.metric], best_value, best.mode)
                        best_value = eval_metrics[best.metric] if new_best else best_value
                    elif best:
                        say(f"warning: eval.best_metric={best.metric!r} not among {sorted(eval_metrics)}")
                stop_votes = torch.tensor(int(stop.received is not None), device=accelerator.device)
                stopping = int(accelerator.reduce(stop_votes, "sum")) > 0
                if (recipe.train.save_every and step % recipe.train.save_every == 0) or new_best or stopping:
                    saved = checkpoint_now(epoch, epoch_batches, eval_metrics)
                if stopping:
                    progress.close()
                    raise TrainingInterrupted(stop.received or signal.SIGTERM, step, saved)
    progress.close()
    if truncated:
        say(
            f"note: {truncated} training rows had their suffix truncated to data.max_text_length="
            f"{recipe.data.max_text_length}"
        )
    training_counts: Counter[str] = Counter()
    for counts in (
        gather_object([dict(train_bad.counts)]) if accelerator.num_processes > 1 else [train_bad.counts]
    ):
        training_counts.update(counts)
    train_bad.counts = training_counts
    say(f"data (build): {bad_rows.report()}\ndata (during training): {train_bad.report()}")
    if nonfinite_skipped:
        say(f"note: {nonfinite_skipped} optimizer steps skipped for a non-finite loss or gradient norm")

    # --- save --------------------------------------------------------------------------------
    adapter_dir = output_dir / "adapter"
    accelerator.wait_for_everyone()
    full_state = _adapter_state_for_saving(accelerator, loss_module)  # a collective under FSDP/ZeRO-3
    if main:
        peft_model.save_pretrained(adapter_dir, state_dict=full_state)
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
        is_main_process=main,
        model=peft_model,
    )
    if best and main:
        result.best_checkpoint = best_checkpoint(checkpoints_dir, best)
        if result.best_checkpoint:
            say(f"best checkpoint by {best.metric} ({best.mode}): {result.best_checkpoint} ({best_value})")
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
                    "nonfinite_skipped": nonfinite_skipped,
                    "bad_rows": {"build": dict(bad_rows.counts), "training": dict(train_bad.counts)},
                    "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
                    "best_value": best_value,
                },
                indent=2,
            )
        )
    push_from_training(output_dir, recipe, accelerator)
    return result
