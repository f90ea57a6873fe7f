"""The training loop: setup → evaluate → train → save → evaluate, read top to bottom.

Run it with ``pg-tune train RECIPE [key.sub=value ...]``; the same command runs under
``accelerate launch -m pg_tune train RECIPE`` or ``torchrun -m pg_tune train RECIPE`` on many
processes. ``train()`` is the whole story in one screen; what it calls lives below it (one
accumulation window: ``train_step``) or in its own module: the run state a checkpoint saves
(``state``), the decisions (``policies``), checkpoints (``checkpoint``), resume (``resume``),
safe writes (``storage``), signals (``signals``). Writing ``summary.json`` and pushing to the Hub
belong to the command that called ``train()`` (``pg_tune.commands_train``).
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

from pg_tune.config.recipe import Recipe, TrainConfig
from pg_tune.config.schema import ConfigError
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.images import load_image
from pg_tune.data.loader import build_train_loader, prepare_feature_cache
from pg_tune.data.safe_collate import BAD_ROWS_KEY, SafeCollator, batch_rows
from pg_tune.data.sample import DataError, Sample
from pg_tune.evaluate.run import evaluate_samples
from pg_tune.models.paligemma import load_model, load_processor, resolve_dtype
from pg_tune.train import policies
from pg_tune.train.adapters import prepare_model, trainable_summary
from pg_tune.train.checkpoint import RECIPE_FILE, best_checkpoint, load_checkpoint, save_checkpoint
from pg_tune.train.logbook import MetricsLog
from pg_tune.train.loss import SuffixLoss
from pg_tune.train.optim import build_optimizer, build_scheduler
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
from pg_tune.train.signals import NonFiniteError, StopSignals, TrainingInterrupted
from pg_tune.train.state import TrainState
from pg_tune.train.storage import (
    atomic_folder,
    check_output_dir,
    remove_entries,
    remove_stale_temporaries,
)

FINAL_STATE_FILE = "final_state.json"
"""Written into ``output_dir`` after the adapter: the final ``TrainState``, how ``--resume`` knows a
run is finished (kept out of ``adapter/``, which is shared, as it names local paths)."""

CheckpointCallback = Callable[[int, Path, Accelerator], None]
"""Called on every rank after each checkpoint is on disk: (step, folder, accelerator)."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: TrainState
    metrics_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    is_main_process: bool = True
    best_checkpoint: Path | None = None
    stop_reason: str = ""
    """Why training ended: the planned steps ran, or early stopping (and why)."""
    bad_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    world_size: int = 1
    dtype: str = ""
    already_finished: bool = False
    """``--resume`` found the run finished: nothing was trained or evaluated this time."""
    model: Any = field(default=None, repr=False)
    """The trained peft model, for callers using pg_tune as a library."""

    @property
    def steps(self) -> int:
        return self.state.step

    @property
    def first_loss(self) -> float:
        return self.state.first_loss

    @property
    def last_loss(self) -> float:
        return self.state.last_loss

    @property
    def metrics_before(self) -> dict[str, float]:
        return self.state.metrics_before


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


def train(
    recipe: Recipe,
    resolved_recipe: dict[str, Any],
    resume: str | None = None,
    *,
    overwrite: bool = False,
    on_checkpoint: Sequence[CheckpointCallback] = (),
) -> TrainResult:
    """Fine-tune as the recipe says. ``resume`` (``auto`` or a path) continues a run; ``overwrite``
    starts ``output_dir`` clean; a non-empty ``output_dir`` without either is refused."""
    started = time.time()
    output_dir = Path(recipe.output_dir)
    notes: list[str] = []
    resume_from = find_resume_checkpoint(resume, output_dir, notes) if resume else None
    accelerator = _accelerator(recipe)
    main, say = accelerator.is_main_process, accelerator.print
    _prepare_output_dir(accelerator, recipe, resume, overwrite)
    if resume and (finished := _finished_run(output_dir, accelerator, resolved_recipe)):
        return finished
    state = (
        TrainState.from_dict(json.loads((resume_from / "state.json").read_text()))
        if resume_from
        else TrainState()
    )
    if resume_from:
        stored_recipe = resume_from / RECIPE_FILE
        notes += check_recipe_changes(
            resume_from,
            json.loads(stored_recipe.read_text()) if stored_recipe.is_file() else None,
            resolved_recipe,
        )
    if main:
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
    state.tracker_run_ids = _start_trackers(accelerator, recipe, resolved_recipe, state.tracker_run_ids)

    bad_rows, eval_bad = BadRows(recipe.data.on_bad_row), BadRows(recipe.data.on_bad_row)
    train_samples = build_samples(recipe.data.train, "train", bad_rows, seed=recipe.train.seed)
    eval_samples = build_samples(recipe.data.eval, "eval", bad_rows, seed=recipe.train.seed)
    eval_samples = _readable_eval_samples(eval_samples, recipe.eval.limit, eval_bad)
    say(f"data: {len(train_samples)} train samples, {len(eval_samples)} eval samples; {bad_rows.report()}")
    if eval_bad.counts:
        say(f"data (eval images): {eval_bad.report()}")
    if not train_samples:
        raise DataError("data.train produced no samples")

    processor = load_processor(recipe.model)
    # A quantized base cannot be moved after loading: each rank loads its own copy onto its device.
    quantized = recipe.quantization.mode != "none"
    device_map = {"": accelerator.device} if quantized and accelerator.device.type != "cpu" else None
    model = load_model(recipe.model, recipe.quantization, device_map=device_map)
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
            feature_cache = prepare_feature_cache(train_samples, model, processor, recipe)
    train_loader = build_train_loader(train_samples, processor, recipe, feature_cache=feature_cache)
    # Rows whose image fails to load mid-training are dropped and counted (skip) or named (stop).
    train_loader.collate_fn = SafeCollator(train_loader.collate_fn, recipe.data.on_bad_row)
    loss_module, optimizer, train_loader = accelerator.prepare(
        SuffixLoss(model), build_optimizer(model.parameters(), recipe.train), train_loader
    )
    steps_per_epoch = math.ceil(len(train_loader) / recipe.train.grad_accum)
    state.total_steps = _total_steps(recipe.train, steps_per_epoch)
    scheduler = build_scheduler(optimizer, recipe.train, state.total_steps)
    peft_model = accelerator.unwrap_model(loss_module).model
    train_bad = BadRows("skip")
    train_bad.counts.update(state.bad_rows_in_training)
    run = _Run(
        accelerator,
        loss_module,
        optimizer,
        scheduler,
        [p for p in peft_model.parameters() if p.requires_grad],
        recipe.train,
        train_samples,
        train_bad,
    )
    state.data_layout = [accelerator.num_processes, recipe.train.batch_size, recipe.train.grad_accum]
    log = MetricsLog(output_dir / "metrics.jsonl", enabled=main)
    best = policies.best_policy(recipe.eval)
    pending_rng = _restore(run, resume_from, state) if resume_from else None
    evaluate = lambda: _evaluate(accelerator, peft_model, processor, eval_samples, recipe, eval_bad)  # noqa: E731

    def checkpoint() -> Path:
        return _checkpoint(
            run, state, output_dir, peft_model, fingerprint, resolved_recipe, best, on_checkpoint
        )

    if eval_samples and recipe.eval.before_training and not resume_from:
        state.metrics_before = evaluate()
        say(f"eval before training: {json.dumps(state.metrics_before)}")
        log.write({"step": 0, **{f"eval/{k}": v for k, v in state.metrics_before.items()}})

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
    loss_module.train()
    with StopSignals() as stop, contextlib.closing(progress):
        for window in _windows(run, train_loader, state, steps_per_epoch):
            step_result = train_step(run, window)
            if step_result is None:  # every row of the window failed to load (one process): skip it
                continue
            samples_seen += step_result.rows
            state.truncated += step_result.truncated
            if step_result.nonfinite:
                _on_nonfinite(
                    run, state, step_result, log, checkpoint, already_saved=last_saved == state.step
                )
                progress.update(1)
                continue
            state.step += 1
            state.tokens_seen += step_result.tokens
            state.first_loss = step_result.loss if state.step == 1 else state.first_loss
            state.last_loss = step_result.loss
            progress.update(1)
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
                metrics = evaluate()
                say(f"\neval at step {state.step}: {json.dumps(metrics)}")
                log.write({"step": state.step, **{f"eval/{k}": v for k, v in metrics.items()}})
                new_best = policies.record_evaluation(state, metrics, best)
                if best and best.metric not in metrics:
                    say(f"warning: eval.best_metric={best.metric!r} not among {sorted(metrics)}")
            early_stop = policies.early_stop_reason(state, recipe.eval)
            stopping = (
                int(
                    accelerator.reduce(
                        torch.tensor(int(stop.received is not None), device=accelerator.device), "sum"
                    )
                )
                > 0
            )
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

    adapter_dir = _save_adapter(
        accelerator, loss_module, peft_model, processor, resolved_recipe, output_dir, state
    )
    metrics_after: dict[str, float] = {}
    if eval_samples:
        metrics_after = evaluate()
        say(f"eval after training: {json.dumps(metrics_after)}")
        log.write({"step": state.step, **{f"eval/{k}": v for k, v in metrics_after.items()}})
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
        model=peft_model,
    )
    if main:
        result.best_checkpoint = best_checkpoint(output_dir / "checkpoints", best) if best else None
        if result.best_checkpoint:
            say(
                f"best checkpoint by {best.metric} ({best.mode}): {result.best_checkpoint} ({state.best_value})"
            )
        _write_final_state(output_dir, result)
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
    # Normalise by the GLOBAL count of supervised tokens in this optimizer step (all micro-batches,
    # all ranks); DDP averages gradients over ranks, hence the world factor.
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), "sum"))
    scale = acc.num_processes / max(global_tokens, 1)
    loss_sum_all = torch.zeros((), device=acc.device)
    for i, batch in enumerate(window):
        with contextlib.nullcontext() if i == len(window) - 1 else acc.no_sync(run.loss_module):
            with acc.autocast():
                loss_sum, _ = run.loss_module(batch)
            acc.backward(loss_sum * scale)
        loss_sum_all += loss_sum.detach().float()
    grad_norm = float(acc.clip_grad_norm_(run.trainable, cfg.max_grad_norm))
    loss = float(acc.reduce(loss_sum_all, "sum")) / max(global_tokens, 1)
    result = StepResult(
        loss,
        grad_norm,
        global_tokens,
        rows=sum(b["input_ids"].shape[0] for b in window),
        truncated=sum(int(b["truncated"].sum()) for b in window),
        batches=fetched,
    )
    if policies.is_nonfinite(loss, grad_norm, scaler_owns_inf=acc.scaler is not None):
        run.optimizer.zero_grad(set_to_none=True)
        local = [run.train_samples[int(i)].source for b in window for i in b["sample_index"]]
        result.nonfinite, result.sources = True, gather_object(local) if acc.num_processes > 1 else local
        return result
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return result


def _windows(run: _Run, loader, state: TrainState, steps_per_epoch: int) -> Iterator[list[dict[str, Any]]]:
    """Accumulation windows from the resumed position to the last step; ``state.epoch`` and
    ``state.epoch_batches`` follow. Fetching never moves the training's RNG (``rng_isolated``)."""
    if state.epoch_batches >= len(loader):  # the checkpoint closed its epoch
        state.epoch, state.epoch_batches = state.epoch + 1, 0
    for epoch in range(state.epoch, math.ceil(state.total_steps / steps_per_epoch)):
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


def _finished_run(
    output_dir: Path, accelerator: Accelerator, resolved_recipe: dict[str, Any]
) -> TrainResult | None:
    """A run whose adapter was saved at its end, for the same length: ``--resume`` has nothing left
    to do (with a larger ``train.max_steps``/``epochs`` it continues from the newest checkpoint)."""
    path = output_dir / FINAL_STATE_FILE
    if not path.is_file() or not (output_dir / "adapter").is_dir():
        return None
    finished_recipe = yaml.safe_load((output_dir / "adapter" / "recipe.yaml").read_text()) or {}
    length = lambda r: {k: r.get("train", {}).get(k) for k in ("max_steps", "epochs")}  # noqa: E731
    if length(finished_recipe) != length(resolved_recipe):
        return None
    saved = json.loads(path.read_text())
    state = TrainState.from_dict(saved["state"])
    accelerator.print(
        f"--resume: this run already finished at step {state.step} ({saved.get('stop_reason', '')}); adapter: "
        f"{output_dir / 'adapter'}. Nothing to do; use --overwrite to train it again"
    )
    best = saved.get("best_checkpoint")
    return TrainResult(
        output_dir,
        output_dir / "adapter",
        state,
        saved.get("metrics_after", {}),
        is_main_process=accelerator.is_main_process,
        best_checkpoint=Path(best) if best else None,
        stop_reason=saved.get("stop_reason", ""),
        bad_rows=saved.get("bad_rows", {}),
        world_size=saved.get("world_size", 1),
        dtype=saved.get("dtype", ""),
        already_finished=True,
    )


def _write_final_state(output_dir: Path, result: TrainResult) -> None:
    final = {
        "state": result.state.to_dict(),
        "metrics_after": result.metrics_after,
        "stop_reason": result.stop_reason,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "bad_rows": result.bad_rows,
        "world_size": result.world_size,
        "dtype": result.dtype,
    }
    tmp = output_dir / f".tmp-{FINAL_STATE_FILE}"
    tmp.write_text(json.dumps(final, indent=2))
    tmp.replace(output_dir / FINAL_STATE_FILE)


def _start_trackers(
    accelerator: Accelerator, recipe: Recipe, resolved_recipe: dict[str, Any], run_ids: dict[str, str]
) -> dict[str, str]:
    """Start wandb/tensorboard; a resumed wandb run continues under its id. Returns the run ids."""
    trackers = list(recipe.logging.trackers)
    if not trackers:
        return {}
    init_kwargs: dict[str, Any] = {}
    if "wandb" in trackers:
        init_kwargs["wandb"] = {
            "name": recipe.logging.run_name,
            "dir": recipe.output_dir,
            "mode": recipe.logging.wandb_mode,
        }
        if run_id := run_ids.get("wandb"):
            init_kwargs["wandb"].update(id=run_id, resume="allow")
    accelerator.init_trackers(
        recipe.logging.project, config=_flat_scalars(resolved_recipe), init_kwargs=init_kwargs
    )
    ids = {}
    if "wandb" in trackers and accelerator.is_main_process:
        wandb_run = accelerator.get_tracker("wandb", unwrap=True)
        if getattr(wandb_run, "id", None):
            ids["wandb"] = wandb_run.id
    return ids


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


def _restore(run: _Run, checkpoint: Path, state: TrainState) -> dict[str, Any] | None:
    """Load weights, optimizer, scheduler and scaler; returns this rank's RNG state to restore
    when training starts."""
    acc = run.accelerator
    peft_model = acc.unwrap_model(run.loss_module).model
    loaded = load_checkpoint(checkpoint, peft_model, run.optimizer, run.scheduler, acc.scaler)
    stored_layout = loaded.state.get("data_layout") or state.data_layout
    if stored_layout[0] != state.data_layout[0]:
        acc.print(
            f"warning: the checkpoint was written by {stored_layout[0]} processes, this run has "
            f"{state.data_layout[0]}: the data position in the epoch is approximate"
        )
    if not loaded.rng_states:
        return None
    return loaded.rng_states[min(acc.process_index, len(loaded.rng_states) - 1)]


def _checkpoint(
    run: _Run,
    state: TrainState,
    output_dir: Path,
    peft_model,
    fingerprint: dict[str, Any],
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
            peft_model,
            run.optimizer,
            run.scheduler,
            state.to_dict(),
            run.train_config.keep_last,
            scaler=acc.scaler,
            rng_states=rng_states,
            fingerprint=fingerprint,
            recipe=resolved_recipe,
            best=best,
        )
    acc.wait_for_everyone()
    for callback in on_checkpoint:
        callback(state.step, path, acc)
    return path


def _readable_eval_samples(samples: Sequence[Sample], limit: int | None, bad: BadRows) -> Sequence[Sample]:
    """The eval samples evaluation will use (``eval.limit`` per dataset), with every image opened
    once now: under ``data.on_bad_row=skip`` an unreadable one is dropped and counted (the next
    sample takes its place), under ``stop`` the run stops here, before training, naming the row."""
    parts = getattr(samples, "parts", None) or [samples]
    kept_parts = []
    for part in parts:
        kept: list[Sample] = []
        for sample in part:
            if limit is not None and len(kept) >= limit:
                break
            try:
                load_image(sample.image, sample.source)
            except DataError as e:
                bad.bad(getattr(e, "reason", "bad_image"), str(e))
                continue
            kept.append(sample)
        kept_parts.append(kept)
    return _EvalSamples(kept_parts)


class _EvalSamples(list):
    """A flat list of eval samples that keeps its datasets apart (``parts``) for ``eval.limit``."""

    def __init__(self, parts: list[list[Sample]]):
        super().__init__(s for part in parts for s in part)
        self.parts = parts


def _evaluate(accelerator, model, processor, samples, recipe: Recipe, bad: BadRows) -> dict[str, float]:
    """Evaluate; an image that became unreadable since the run started is dropped and counted under
    ``skip`` (then evaluation runs again without it), named under ``stop``."""
    while True:
        try:
            return evaluate_samples(accelerator, model, processor, samples, recipe)
        except DataError:
            if bad.policy == "stop" or accelerator.num_processes > 1:
                raise
            before = sum(bad.counts.values())
            samples = _readable_eval_samples(samples, recipe.eval.limit, bad)
            if sum(bad.counts.values()) == before:
                raise


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


def _save_adapter(
    accelerator, loss_module, peft_model, processor, resolved_recipe, output_dir: Path, state
) -> Path:
    """The final adapter, written atomically like a checkpoint (a full disk leaves no half-written
    folder beside a valid-looking one)."""
    adapter_dir = output_dir / "adapter"
    accelerator.wait_for_everyone()
    full_state = _adapter_state_for_saving(accelerator, loss_module)  # a collective under FSDP/ZeRO-3
    if accelerator.is_main_process:
        with atomic_folder(adapter_dir) as tmp:
            peft_model.save_pretrained(tmp, state_dict=full_state)
            processor.save_pretrained(tmp)
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved_recipe, sort_keys=False))
    accelerator.wait_for_everyone()
    return adapter_dir
