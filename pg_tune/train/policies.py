"""The loop's decisions, each a small function of the run state: when to evaluate, what counts as a
better evaluation, when to checkpoint, when to stop early, what a non-finite step is.

Early stopping (``eval.patience``): the run stops cleanly after ``patience`` evaluations in a row that
did not beat the best ``eval.best_metric`` by more than ``eval.min_delta``. "Better by more than
``min_delta``" is also what makes a checkpoint the best one, so the kept best checkpoint and the
patience count always agree.
"""

from __future__ import annotations

import math

from pg_tune.config.recipe import EvalConfig, TrainConfig
from pg_tune.train.checkpoint import BestPolicy, is_better
from pg_tune.train.state import TrainState


def best_policy(eval_config: EvalConfig) -> BestPolicy | None:
    if not eval_config.best_metric:
        return None
    return BestPolicy(eval_config.best_metric, eval_config.best_mode, eval_config.min_delta)


def should_evaluate(step: int, eval_config: EvalConfig) -> bool:
    return bool(eval_config.every) and step % eval_config.every == 0


def record_evaluation(state: TrainState, metrics: dict[str, float], best: BestPolicy | None) -> bool:
    """Store this step's metrics; True when they make a new best (and reset the patience count)."""
    state.eval_metrics = metrics
    if best is None or best.metric not in metrics:
        return False
    value = metrics[best.metric]
    if is_better(value, state.best_value, best):
        state.best_value, state.best_step, state.evals_without_improvement = value, state.step, 0
        return True
    state.evals_without_improvement += 1
    return False


def early_stop_reason(state: TrainState, eval_config: EvalConfig) -> str | None:
    """Why the run should stop now (``eval.patience`` evaluations without improvement), or None."""
    patience = eval_config.patience
    if not patience or state.evals_without_improvement < patience:
        return None
    return (
        f"early stopping at step {state.step}: {eval_config.best_metric} did not improve by more than "
        f"eval.min_delta={eval_config.min_delta} in {patience} evaluation(s) "
        f"(best {state.best_value} at step {state.best_step})"
    )


def should_checkpoint(state: TrainState, train_config: TrainConfig, new_best: bool, stopping: bool) -> bool:
    save_every = train_config.save_every
    return bool(save_every and state.step % save_every == 0) or new_best or stopping


def is_nonfinite(loss: float, grad_norm: float, scaler_owns_inf: bool) -> bool:
    """A step that must not reach the weights. Under fp16 the gradient scaler owns inf gradients
    (it skips the step and lowers the scale); only a non-finite loss counts there."""
    return not math.isfinite(loss) or (not scaler_owns_inf and not math.isfinite(grad_norm))
