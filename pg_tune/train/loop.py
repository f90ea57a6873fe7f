"""The training loop: setup → evaluate → train → save → evaluate, read top to bottom.

Run it with ``pg-tune train RECIPE [key.sub=value ...]``; the same command runs under
``accelerate launch -m pg_tune train RECIPE`` or ``torchrun -m pg_tune train RECIPE`` on many
processes. ``train()`` tells the whole story in one screen; one accumulation window is
``train_step``, whose forward and backward passes are the objective's: cross-entropy on the target
(``_sft_window``, ``train.objective: sft``) or DPO on answer pairs (``preference.preference_window``).
What they call lives in its own small module: the run state a checkpoint saves and
a resume restores (``state``), the decisions — evaluate, best, early stop, checkpoint, non-finite
(``policies``), checkpoints (``checkpoint``), resume (``resume``), the output folder, atomic writes
and a full disk (``storage``), evaluation with bad eval rows (``evaluation``), signals (``signals``),
the result (``result``). Writing ``summary.json`` and pushing to the Hub belong to the command that
called ``train()`` (``pg_tune.cli.train``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from pg_tune.config.recipe import DpoConfig, Recipe, TrainConfig
from pg_tune.config.schema import ConfigError
from pg_tune.data.bad_rows import BadRows, check_bad_share
from pg_tune.data.build import build_samples
from pg_tune.data.loader import build_train_loader, prepare_feature_cache
from pg_tune.data.safe_collate import BAD_ROWS_KEY, SafeCollator, batch_rows
from pg_tune.data.sample import DataError, Sample
from pg_tune.models import cpu_dtype
from pg_tune.models.family import ModelFamily, resolve_dtype
from pg_tune.train import policies
from pg_tune.train.adapters import prepare_model, trainable_summary
from pg_tune.train.checkpoint import RECIPE_FILE, best_checkpoint, load_checkpoint, save_checkpoint
from pg_tune.train.evaluation import evaluate_during_training, readable_eval_samples
from pg_tune.train.logbook import MetricsLog
from pg_tune.train.loss import SuffixLoss
from pg_tune.train.optim import build_optimizer, build_scheduler
from pg_tune.train.preference import (
    PreferenceLoss,
    WindowLoss,
    frozen_reference,
    pair_scorer,
    preference_window,
)
from pg_tune.train.result import TrainResult, finished_run, write_final_state
from pg_tune.train.resume import (
    capture_rng,
    check_fingerprint,
    check_recipe_changes,
    find_resume_checkpoint,
    restore_rng,
    rng_isolated,
    run_fingerprint,
    truncate_metrics_log,
)
from pg_tune.train.sharding import wrap_family_layers
from pg_tune.train.signals import NonFiniteError, StopSignals, TrainingInterrupted
from pg_tune.train.state import TrainState
from pg_tune.train.storage import (
    atomic_folder,
    check_output_dir,
    disk_full_guard,
    final_folder,
    hold_output_dir,
    remove_entries,
    remove_stale_temporaries,
)
from pg_tune.train.trackers import start_trackers

CheckpointCallback = Callable[[int, Path, Accelerator], None]
"""Called on every rank after each checkpoint is on disk: (step, folder, accelerator)."""


@dataclass
class _Run:
    """The prepared pieces that one optimizer step and one checkpoint need."""

    accelerator: Accelerator
    loss_module: Any
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    train_config: TrainConfig
    train_samples: Sequence[Sample]
    train_bad: BadRows
    """Rows dropped inside the collator (under ``stop`` the collator raises instead)."""
    peft_model: Any
    processor: Any
    loader: Any
    steps_per_epoch: int
    fingerprint: dict[str, Any]
    dpo: DpoConfig | None = None
    """The ``dpo`` section when ``train.objective`` is ``dpo``."""


def train(
    recipe: Recipe,
    resolved_recipe: dict[str, Any],
    family: ModelFamily,
    resume: str | None = None,
    *,
    overwrite: bool = False,
    on_checkpoint: Sequence[CheckpointCallback] = (),
) -> TrainResult:
    """Fine-tune as the recipe says, with the recipe model's ``family`` (``load_family``: its mask
    codec bound). ``resume`` (``auto`` or a path) continues a run; ``overwrite`` starts
    ``output_dir`` clean; a non-empty ``output_dir`` without either is refused. The main process
    holds ``output_dir``'s one-writer lock throughout (``pg_tune.train.lock``)."""
    command = "pg-tune train" + (f" --resume {resume}" if resume else " --overwrite" if overwrite else "")
    with hold_output_dir(Path(recipe.output_dir), command):
        return _train(recipe, resolved_recipe, family, resume, overwrite, on_checkpoint)


def _train(
    recipe: Recipe,
    resolved_recipe: dict[str, Any],
    family: ModelFamily,
    resume: str | None,
    overwrite: bool,
    on_checkpoint: Sequence[CheckpointCallback],
) -> TrainResult:
    started = time.time()
    output_dir = Path(recipe.output_dir)
    notes: list[str] = []
    resume_from = find_resume_checkpoint(resume, output_dir, notes) if resume else None
    accelerator = _accelerator(recipe)
    main, say = accelerator.is_main_process, accelerator.print
    _prepare_output_dir(accelerator, recipe, resume, overwrite)
    if resume and (finished := finished_run(output_dir, accelerator, resolved_recipe)):
        return finished
    if accelerator.device.type == "cpu" and (slow := cpu_dtype.recipe_note(recipe)):
        notes.append(f"warning: {slow}")
    state = _begin(accelerator, recipe, resolved_recipe, resume, resume_from, notes)
    state.tracker_run_ids = start_trackers(accelerator, recipe, resolved_recipe, state.tracker_run_ids)

    bad_rows, eval_bad = BadRows(recipe.data.on_bad_row), BadRows(recipe.data.on_bad_row)
    train_samples = build_samples(recipe.data.train, "train", bad_rows, seed=recipe.train.seed, family=family)
    check_bad_share(bad_rows, len(train_samples), recipe.data.max_bad_row_share, "data.train")
    eval_samples = build_samples(recipe.data.eval, "eval", bad_rows, seed=recipe.train.seed, family=family)
    eval_samples = readable_eval_samples(eval_samples, recipe.eval.limit, eval_bad)
    say(f"data: {len(train_samples)} train samples, {len(eval_samples)} eval samples; {bad_rows.report()}")
    if not train_samples:
        raise DataError("data.train produced no samples")
    run = _build_run(accelerator, recipe, family, train_samples, state, resume_from)
    log = MetricsLog(output_dir / "metrics.jsonl", enabled=main)
    best = policies.best_policy(recipe.eval)
    pending_rng = _restore(run, resume_from) if resume_from else None

    def evaluate(when: str) -> dict[str, float]:
        metrics = evaluate_during_training(
            accelerator,
            run.peft_model,
            run.processor,
            eval_samples,
            recipe,
            family,
            eval_bad,
            pair_scorer(run.accelerator.unwrap_model(run.loss_module), run.peft_model),
        )
        say(f"\neval {when}: {json.dumps(metrics)}")
        log.write({"step": state.step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    def checkpoint() -> Path:
        return _checkpoint(run, state, output_dir, resolved_recipe, best, on_checkpoint)

    if eval_samples and recipe.eval.before_training and not resume_from:
        state.metrics_before = evaluate("before training")

    # --- train -------------------------------------------------------------------------------
    if pending_rng is not None:
        restore_rng(pending_rng)  # batches are fetched RNG-neutrally: dropout continues exactly here
    stop_reason = f"trained the planned {state.total_steps} steps"
    progress = tqdm(
        total=state.total_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    samples_seen, window_start, last_saved = 0, time.time(), -1
    start = _Progress(state.step, state.nonfinite_skipped, sum(run.train_bad.counts.values()))
    run.loss_module.train()
    with StopSignals() as stop, contextlib.closing(progress):
        for window in _windows(run, state):
            step_result = train_step(run, window)
            if step_result is None:  # every row of the window failed to load (one process): skip it
                continue
            samples_seen += step_result.rows
            start.rows_read += step_result.rows
            state.truncated += step_result.truncated
            progress.update(1)
            if step_result.nonfinite:
                _on_nonfinite(
                    run, state, step_result, log, checkpoint, already_saved=last_saved == state.step
                )
                continue
            state.step += 1
            state.tokens_seen += step_result.tokens
            state.first_loss = step_result.loss if state.step == 1 else state.first_loss
            state.last_loss = step_result.loss
            if state.step % recipe.train.log_every == 0 or state.step in (1, state.total_steps):
                record = _step_record(run, state, step_result, samples_seen, time.time() - window_start)
                progress.set_postfix(loss=f"{step_result.loss:.4f}", lr=f"{record['lr']:.2e}")
                log.write(record)
                if recipe.logging.trackers:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                samples_seen, window_start = 0, time.time()
            # Evaluate before checkpointing, so the checkpoint records the metric that may make it the best.
            new_best, state.eval_metrics = False, {}
            if eval_samples and policies.should_evaluate(state.step, recipe.eval):
                new_best = policies.record_evaluation(state, evaluate(f"at step {state.step}"), best)
                if best and best.metric not in state.eval_metrics:
                    say(f"warning: eval.best_metric={best.metric!r} not among {sorted(state.eval_metrics)}")
            early_stop = policies.early_stop_reason(state, recipe.eval)
            stopping = _any_rank(accelerator, stop.received is not None)
            saved = None
            if policies.should_checkpoint(state, recipe.train, new_best, stopping):
                saved, last_saved = checkpoint(), state.step
            if stopping:
                raise TrainingInterrupted(stop.received or signal.SIGTERM, state.step, saved)
            if early_stop:
                stop_reason = early_stop
                say(f"\n{early_stop}")
                break
    bad = _finish_counts(run, state, bad_rows, eval_bad, recipe)
    short_of_plan = _check_trained(run, state, start, recipe)
    if (
        short_of_plan and stop_reason == f"trained the planned {state.total_steps} steps"
    ):  # not early stopping
        stop_reason = short_of_plan

    adapter_dir = _save_adapter(run, resolved_recipe, output_dir)
    metrics_after = evaluate("after training") if eval_samples else {}
    if recipe.logging.trackers:
        accelerator.log({f"eval/{k}": v for k, v in metrics_after.items()}, step=state.step)
        accelerator.end_training()
    result = TrainResult(
        output_dir,
        adapter_dir,
        state,
        metrics_after,
        time.time() - started,
        is_main_process=main,
        stop_reason=stop_reason,
        bad_rows=bad,
        world_size=accelerator.num_processes,
        dtype=str(resolve_dtype(recipe.model.dtype)),
        model=run.peft_model,
    )
    if main:
        result.best_checkpoint = best_checkpoint(output_dir / "checkpoints", best) if best else None
        if result.best_checkpoint:
            say(
                f"best checkpoint by {best.metric} ({best.mode}): {result.best_checkpoint} ({state.best_value})"
            )
        write_final_state(output_dir, result)
    return result


# --- one optimizer step ----------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    """Supervised tokens of the step over all ranks."""
    rows: int
    truncated: int
    batches: int
    """Micro-batches the window held (rows that failed to load included)."""
    nonfinite: bool = False
    sources: list[str] = field(default_factory=list)
    """The window's rows (every rank), when the step was non-finite."""
    metrics: dict[str, float] = field(default_factory=dict)
    """What the objective logs besides the loss (DPO: rewards and log-probabilities)."""


def train_step(run: _Run, window: list[dict[str, Any]]) -> StepResult | None:
    """Forward and backward over one accumulation window, then the optimizer step.

    Returns None when every row of the window failed to load (one process; under DDP that stops
    the run, a rank without rows cannot join the all-reduce). A non-finite loss or gradient norm
    leaves the weights untouched (``nonfinite=True``): the caller applies ``train.on_nonfinite``.
    """
    acc, cfg = run.accelerator, run.train_config
    fetched = len(window)
    for batch in window:
        for reason, message in batch.pop(BAD_ROWS_KEY, []):
            run.train_bad.bad(reason, message)
    window = [b for b in window if batch_rows(b)]
    empty_ranks = int(acc.reduce(torch.tensor(int(not window), device=acc.device), "sum"))
    if empty_ranks:
        if acc.num_processes > 1:
            raise DataError(
                f"every row of a {cfg.grad_accum}-batch window failed to load on {empty_ranks} rank(s): "
                f"{run.train_bad.report()}"
            )
        return None
    if cfg.objective == "dpo":
        forward = preference_window(acc, run.loss_module, window, run.dpo)
    else:
        forward = _sft_window(acc, run.loss_module, window)
    grad_norm = float(acc.clip_grad_norm_(run.trainable, cfg.max_grad_norm))
    result = StepResult(
        forward.loss,
        grad_norm,
        forward.tokens,
        rows=sum(len(b["sample_index"]) for b in window),
        truncated=sum(int(b["truncated"].sum()) for b in window),
        batches=fetched,
        metrics=forward.metrics,
    )
    if policies.is_nonfinite(result.loss, grad_norm, scaler_owns_inf=acc.scaler is not None):
        run.optimizer.zero_grad(set_to_none=True)
        local = [run.train_samples[int(i)].source for b in window for i in b["sample_index"]]
        result.nonfinite, result.sources = True, gather_object(local) if acc.num_processes > 1 else local
        return result
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return result


def _sft_window(acc: Accelerator, loss_module, window: list[dict[str, Any]]) -> WindowLoss:
    """Forward and backward of one accumulation window of cross-entropy on the targets."""
    # Normalise by the GLOBAL count of supervised tokens in this optimizer step (all micro-batches,
    # all ranks); DDP averages gradients over ranks, hence the world factor.
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), "sum"))
    scale = acc.num_processes / max(global_tokens, 1)
    loss_sum_all = torch.zeros((), device=acc.device)
    for i, batch in enumerate(window):
        with contextlib.nullcontext() if i == len(window) - 1 else acc.no_sync(loss_module):
            with acc.autocast():
                loss_sum, _ = loss_module(batch)
            acc.backward(loss_sum * scale)
        loss_sum_all += loss_sum.detach().float()
    loss = float(acc.reduce(loss_sum_all, "sum")) / max(global_tokens, 1)
    return WindowLoss(loss, global_tokens, {})


def _windows(run: _Run, state: TrainState) -> Iterator[list[dict[str, Any]]]:
    """Accumulation windows from the resumed position to the last step; ``state.epoch`` and
    ``state.epoch_batches`` follow. Fetching never moves the training's RNG (``rng_isolated``)."""
    loader = run.loader
    if state.epoch_batches >= len(loader):  # the checkpoint closed its epoch
        state.epoch, state.epoch_batches = state.epoch + 1, 0
    for epoch in range(state.epoch, math.ceil(state.total_steps / run.steps_per_epoch)):
        if state.step >= state.total_steps:
            return
        state.epoch = epoch
        loader.set_epoch(epoch)
        epoch_loader = loader
        if state.epoch_batches:  # the resumed epoch: skip the batches already seen (indices only)
            epoch_loader = run.accelerator.skip_first_batches(loader, state.epoch_batches)
            epoch_loader.set_epoch(epoch)
        batches = iter(epoch_loader)
        while state.step < state.total_steps:
            with rng_isolated():
                window = list(itertools.islice(batches, run.train_config.grad_accum))
            if not window:
                break
            state.epoch_batches += len(window)
            yield window
        state.epoch_batches = 0


def _step_record(
    run: _Run, state: TrainState, result: StepResult, samples: int, seconds: float
) -> dict[str, Any]:
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": result.loss,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": result.grad_norm,
        "samples_per_s": samples * run.accelerator.num_processes / max(seconds, 1e-9),
        "supervised_tokens": state.tokens_seen,
        **result.metrics,
    }
    if state.nonfinite_skipped:
        record["nonfinite_skipped"] = state.nonfinite_skipped
    return record


def _on_nonfinite(
    run: _Run, state: TrainState, result: StepResult, log: MetricsLog, checkpoint, already_saved: bool
) -> None:
    """``train.on_nonfinite``: skip the step (the data and LR schedule move on) or stop with a
    checkpoint of the last good state, naming the batch's rows."""
    what = (
        f"non-finite loss {result.loss} / gradient norm {result.grad_norm} at step {state.step + 1} "
        f"(epoch {state.epoch})"
    )
    if run.train_config.on_nonfinite == "skip":
        state.nonfinite_skipped += 1
        run.accelerator.print(
            f"\nwarning: {what}; step skipped ({state.nonfinite_skipped} so far); rows: {result.sources}"
        )
        run.scheduler.step()
        state.step += 1
        log.write({"step": state.step, "epoch": state.epoch, "nonfinite_skipped": state.nonfinite_skipped})
        return
    # The checkpoint holds the state before this window: its batches are to be seen again.
    state.epoch_batches -= result.batches
    saved = Path(run.accelerator.project_dir) / "checkpoints" / f"step-{state.step:07d}"
    if not already_saved:
        saved = checkpoint()
    raise NonFiniteError(
        f"{what}; the batch's rows: {', '.join(result.sources)}. Weights were not updated; the last good "
        f"state (step {state.step}) is checkpointed at {saved}. Fix or drop those rows, lower train.lr, "
        "or set train.on_nonfinite=skip"
    )


# --- setup, checkpoints, evaluation, the end ---------------------------------------------------------


def _begin(
    accelerator: Accelerator,
    recipe: Recipe,
    resolved_recipe: dict[str, Any],
    resume: str | None,
    resume_from: Path | None,
    notes: list[str],
) -> TrainState:
    """The state to start from (a checkpoint's, or a fresh one); refuse a resume whose recipe
    changes what is trained; write ``recipe.yaml``; drop log records a crash left behind."""
    output_dir, say = Path(recipe.output_dir), accelerator.print
    state = TrainState()
    if resume_from:
        state = TrainState.from_dict(json.loads((resume_from / "state.json").read_text()))
        stored = resume_from / RECIPE_FILE
        notes += check_recipe_changes(
            resume_from, json.loads(stored.read_text()) if stored.is_file() else None, resolved_recipe
        )
    if accelerator.is_main_process:
        with disk_full_guard(output_dir / "recipe.yaml"):
            (output_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
        say(yaml.safe_dump(resolved_recipe, sort_keys=False))
        for note in notes:
            say(note)
        # Log records after the checkpoint were written and then lost; with no checkpoint, all were.
        dropped = truncate_metrics_log(output_dir / "metrics.jsonl", state.step if resume_from else -1)
        if resume_from:
            say(f"resuming from {resume_from} (step {state.step}); dropped {dropped} later log records")
        elif resume:
            say(f"--resume {resume}: no checkpoint under {output_dir / 'checkpoints'}, starting from scratch")
    return state


def _build_run(
    accelerator: Accelerator,
    recipe: Recipe,
    family: ModelFamily,
    train_samples: Sequence[Sample],
    state: TrainState,
    resume_from: Path | None,
) -> _Run:
    """Model with adapters, loader, optimizer and schedule, prepared by Accelerate."""
    processor = family.load_processor(recipe.model)
    # A quantized base cannot be moved after loading: each rank loads its own copy onto its device.
    quantized = recipe.quantization.mode != "none"
    device_map = {"": accelerator.device} if quantized and accelerator.device.type != "cpu" else None
    model = family.load_model(recipe.model, recipe.quantization, device_map=device_map)
    family.check_context(model.config, processor, recipe.data.max_text_length)  # image tokens included
    reference = frozen_reference(model, recipe, accelerator)  # DPO with full / partial: a frozen copy
    set_seed(recipe.train.seed)  # after the base is built, so adapters and shuffling follow the recipe's seed
    model = prepare_model(model, recipe, family)
    accelerator.print(trainable_summary(model))
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
    loader = build_train_loader(train_samples, processor, recipe, family, feature_cache)
    # Rows whose image fails to load mid-training are dropped and counted (skip) or named (stop).
    loader.collate_fn = SafeCollator(loader.collate_fn, recipe.data.on_bad_row)
    wrap_family_layers(accelerator, model, family)  # FSDP: each decoder / vision layer its own unit
    if recipe.train.objective == "dpo":
        loss_module = PreferenceLoss(model, family, reference)
    else:
        loss_module = SuffixLoss(model, family, label_smoothing=recipe.train.label_smoothing)
    loss_module, optimizer, loader = accelerator.prepare(
        loss_module, build_optimizer(model.parameters(), recipe.train), loader
    )
    steps_per_epoch = math.ceil(len(loader) / recipe.train.grad_accum)
    state.total_steps = _total_steps(recipe.train, steps_per_epoch)
    state.data_layout = [accelerator.num_processes, recipe.train.batch_size, recipe.train.grad_accum]
    train_bad = BadRows("skip")
    train_bad.counts.update(state.bad_rows_in_training)
    peft_model = accelerator.unwrap_model(loss_module).model
    return _Run(
        accelerator,
        loss_module,
        optimizer,
        build_scheduler(optimizer, recipe.train, state.total_steps),
        [p for p in peft_model.parameters() if p.requires_grad],
        recipe.train,
        train_samples,
        train_bad,
        peft_model,
        processor,
        loader,
        steps_per_epoch,
        fingerprint,
        recipe.dpo if recipe.train.objective == "dpo" else None,
    )


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (all ranks must agree to stop)."""
    return int(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum")) > 0


def _mixed_precision(recipe: Recipe) -> str:
    choice = recipe.train.mixed_precision
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _accelerator(recipe: Recipe) -> Accelerator:
    return Accelerator(
        mixed_precision=_mixed_precision(recipe),
        log_with=list(recipe.logging.trackers) or None,
        project_dir=recipe.output_dir,
        # The shuffling order of epoch e is a function of (seed + e) alone, so a resumed run can
        # rebuild it and skip the batches already seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
    )


def _total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    if total < 1:
        raise ConfigError(
            f"train.max_steps: must be >= 1 (or unset to train train.epochs={cfg.epochs} epochs), got {cfg.max_steps}"
        )
    return total


def _prepare_output_dir(
    accelerator: Accelerator, recipe: Recipe, resume: str | None, overwrite: bool
) -> None:
    """Every rank checks before anyone writes; the main process then clears what --overwrite removes."""
    output_dir = Path(recipe.output_dir)
    to_remove = check_output_dir(output_dir, resume, overwrite, extra=(recipe.logging.project,))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if to_remove:
            accelerator.print(f"--overwrite: removing {', '.join(str(p) for p in to_remove)}")
            remove_entries(to_remove)
        remove_stale_temporaries(output_dir)
        remove_stale_temporaries(output_dir / "checkpoints")
    accelerator.wait_for_everyone()


def _restore(run: _Run, checkpoint: Path) -> dict[str, Any] | None:
    """Load weights, optimizer, scheduler and scaler; returns this rank's RNG state to restore
    when training starts."""
    acc = run.accelerator
    loaded = load_checkpoint(checkpoint, run.peft_model, run.optimizer, run.scheduler, acc.scaler)
    processes = (loaded.state.get("data_layout") or [acc.num_processes])[0]
    if processes != acc.num_processes:
        acc.print(
            f"warning: the checkpoint was written by {processes} processes, this run has "
            f"{acc.num_processes}: the data position in the epoch is approximate"
        )
    if not loaded.rng_states:
        return None
    return loaded.rng_states[min(acc.process_index, len(loaded.rng_states) - 1)]


def _checkpoint(
    run: _Run,
    state: TrainState,
    output_dir: Path,
    resolved_recipe: dict[str, Any],
    best,
    on_checkpoint: Sequence[CheckpointCallback],
) -> Path:
    acc = run.accelerator
    rng = [capture_rng()]
    rng_states = gather_object(rng) if acc.num_processes > 1 else rng
    state.bad_rows_in_training = dict(run.train_bad.counts)
    path = output_dir / "checkpoints" / f"step-{state.step:07d}"
    if acc.is_main_process:
        save_checkpoint(
            output_dir / "checkpoints",
            state.step,
            run.peft_model,
            run.optimizer,
            run.scheduler,
            state.to_dict(),
            run.train_config.keep_last,
            scaler=acc.scaler,
            rng_states=rng_states,
            fingerprint=run.fingerprint,
            recipe=resolved_recipe,
            best=best,
        )
    acc.wait_for_everyone()
    for callback in on_checkpoint:
        callback(state.step, path, acc)
    return path


@dataclass
class _Progress:
    """Where this process's training started, to tell what it did itself."""

    step: int
    nonfinite_skipped: int
    bad_rows: int
    rows_read: int = 0
    """Rows of the windows that reached a forward pass (this rank)."""


def _check_trained(run: _Run, state: TrainState, start: _Progress, recipe: Recipe) -> str | None:
    """Refuse to save a run that trained nothing, or that read more bad rows than
    ``data.max_bad_row_share`` allows (a ``DataError`` on every rank: no adapter is written).
    Returns the stop reason of a run that took fewer steps than planned (windows with no readable row)."""
    acc = run.accelerator
    good = int(acc.reduce(torch.tensor(start.rows_read, device=acc.device), "sum"))
    bad = sum(run.train_bad.counts.values()) - start.bad_rows  # gathered over ranks by _finish_counts
    steps = state.step - start.step
    updates = steps - (state.nonfinite_skipped - start.nonfinite_skipped)
    if steps and not updates:
        raise DataError(
            f"trained nothing: every one of the {steps} optimizer steps was non-finite and skipped "
            "(train.on_nonfinite=skip); no adapter was written. Lower train.lr, or find the rows with "
            "train.on_nonfinite=stop (it names them)"
        )
    if not steps and state.step < state.total_steps:  # (a resume at the last step has nothing to do)
        raise DataError(
            f"trained nothing: all {bad} training rows read were bad ({run.train_bad.summary()}); no adapter "
            "was written. Fix or remove those rows (pg-tune data validate lists them all)"
        )
    limit = recipe.data.max_bad_row_share
    if bad > limit * (bad + good):
        raise DataError(
            f"training: {bad} of {bad + good} ({100 * bad / (bad + good):.0f}%) of the training rows read were "
            f"bad (over data.max_bad_row_share={limit:g}): {run.train_bad.summary()}; no adapter was written. "
            "Fix or remove those rows (pg-tune data validate lists them all), or raise data.max_bad_row_share "
            "if dropping that many is intended"
        )
    if state.step < state.total_steps:
        return (
            f"trained {state.step} of the planned {state.total_steps} steps: windows without a readable row "
            f"were skipped ({run.train_bad.summary()})"
        )
    return None


def _finish_counts(
    run: _Run, state: TrainState, bad_rows: BadRows, eval_bad: BadRows, recipe: Recipe
) -> dict:
    acc = run.accelerator
    if state.truncated:
        acc.print(
            f"note: {state.truncated} training rows had their suffix truncated to data.max_text_length="
            f"{recipe.data.max_text_length}"
        )
    training_counts: Counter[str] = Counter()
    per_rank = (
        gather_object([dict(run.train_bad.counts)]) if acc.num_processes > 1 else [run.train_bad.counts]
    )
    for counts in per_rank:
        training_counts.update(counts)
    run.train_bad.counts = training_counts
    acc.print(f"data (build): {bad_rows.report()}\ndata (during training): {run.train_bad.report()}")
    if eval_bad.counts:
        acc.print(f"data (eval): {eval_bad.report()}")
    if state.nonfinite_skipped:
        acc.print(
            f"note: {state.nonfinite_skipped} optimizer steps skipped for a non-finite loss or gradient norm"
        )
    return {"build": dict(bad_rows.counts), "training": dict(training_counts), "eval": dict(eval_bad.counts)}


def _adapter_state_for_saving(accelerator: Accelerator, loss_module) -> dict[str, torch.Tensor] | None:
    """Under FSDP or DeepSpeed the parameters are sharded: gather a full state dict (every rank
    takes part) so the main process writes a normal PEFT adapter. ``None`` means "read the model"."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    state = accelerator.get_state_dict(loss_module)  # keys of the SuffixLoss wrapper: "model.<peft key>"
    return {k.removeprefix("model."): v for k, v in state.items()} if state is not None else None


def _save_adapter(run: _Run, resolved_recipe: dict[str, Any], output_dir: Path) -> Path:
    """The final adapter, written atomically like a checkpoint (a full disk leaves no half-written
    folder beside a valid-looking one)."""
    accelerator = run.accelerator
    adapter_dir = final_folder(output_dir, str(resolved_recipe.get("method", "lora")))
    accelerator.wait_for_everyone()
    full_state = _adapter_state_for_saving(accelerator, run.loss_module)  # a collective under FSDP/ZeRO-3
    if accelerator.is_main_process:
        with atomic_folder(adapter_dir) as tmp:
            run.peft_model.save_pretrained(tmp, state_dict=full_state)
            run.processor.save_pretrained(tmp)
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
    accelerator.wait_for_everyone()
    return adapter_dir
