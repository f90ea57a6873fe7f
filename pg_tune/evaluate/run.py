"""Evaluating a model: load it (adapter, merged model or base), generate, score, write the outputs.

During training the loop calls ``evaluate_samples`` (each rank generates its shard, the texts are
gathered, every rank scores the same list). ``pg-tune eval`` calls ``evaluate_recipe``, which scores
every eval dataset of a recipe and writes ``metrics.json``, ``predictions.jsonl`` and an HTML report.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pg_tune.config.recipe import ModelConfig, Recipe
from pg_tune.data.sample import Sample
from pg_tune.evaluate.generate import Generated, generate, generate_with_logprobs
from pg_tune.evaluate.scoring import Scored, score_samples
from pg_tune.models.family import ModelFamily


def predict_texts(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    recipe: Recipe,
    family: ModelFamily,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> list[str]:
    """Generated text for every sample, in order; with an accelerator each rank decodes its shard."""
    generated = predict(model, processor, samples, recipe, family, accelerator, progress, logprobs=False)
    return [g.text for g in generated]


def _texts_only(model, processor, samples, family, **kwargs) -> list[Generated]:
    return [Generated(text, ()) for text in generate(model, processor, samples, family, **kwargs)]


def predict(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    recipe: Recipe,
    family: ModelFamily,
    accelerator: Accelerator | None = None,
    progress: bool = False,
    logprobs: bool = True,
) -> list[Generated]:
    """``predict_texts`` with each answer's token log-probabilities (detection scores) if ``logprobs``."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = list(range(rank, len(samples), world))
    run_generate = generate_with_logprobs if logprobs else _texts_only
    texts = run_generate(
        model,
        processor,
        [samples[i] for i in shard],
        family,
        batch_size=recipe.eval.batch_size,
        max_new_tokens=recipe.eval.max_new_tokens,
        max_new_tokens_per_task=recipe.eval.max_new_tokens_per_task,
        num_beams=recipe.eval.num_beams,
        max_text_length=recipe.data.max_text_length,
        progress=progress,
    )
    pairs = list(zip(shard, texts, strict=True))
    if world > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    predictions = dict(pairs)  # keyed by sample index: no duplicates, whatever the sharding
    return [predictions[i] for i in range(len(samples))]


def evaluate_samples(
    accelerator: Accelerator,
    model,
    processor,
    samples: Sequence[Sample],
    recipe: Recipe,
    family: ModelFamily,
) -> dict[str, float]:
    """Metrics over ``samples`` (at most ``eval.limit`` per eval dataset); every rank returns the same dict."""
    if recipe.eval.limit is not None:
        parts = getattr(samples, "parts", None) or [samples]
        samples = [s for part in parts for s in part[: recipe.eval.limit]]
    if not samples:
        return {}
    texts, logprobs = _predictions(
        model, processor, samples, recipe, family, accelerator, accelerator.is_local_main_process
    )
    return score_samples(samples, texts, family, logprobs).metrics


def _predictions(model, processor, samples, recipe, family, accelerator=None, progress=False):
    """Texts, and per-token log-probabilities when detections need a score (else None)."""
    if not any(s.task == "detect" for s in samples):
        return predict_texts(model, processor, samples, recipe, family, accelerator, progress), None
    generated = predict(model, processor, samples, recipe, family, accelerator, progress)
    return [g.text for g in generated], [g.scored_tokens() for g in generated]


# --- loading a model to evaluate ---------------------------------------------------------------


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    kind: str
    """``adapter`` (base + peft adapter), ``merged`` (a full checkpoint dir) or ``base``."""
    description: str


def _looks_like_path(ref: str) -> bool:
    return Path(ref).is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1


def load_for_eval(
    model_ref: str | None,
    family: ModelFamily,
    recipe: Recipe | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    base: str | None = None,
) -> LoadedModel:
    """Load what ``--model`` names, ready for generation (eval mode, on ``device``).

    - a folder with ``adapter_config.json``: a peft adapter on the base its ``adapter_config.json``
      names (``base_model_name_or_path``), refused if ``base`` (``--base``) or the recipe's
      ``model.name_or_path`` names another (``pg_tune.models.source.adapter_base``); nothing else in
      the folder (its ``recipe.yaml``) chooses what is loaded. The processor comes from the adapter
      folder when saved there;
    - a folder with ``config.json`` (a merged model or a base checkpoint), a hub id or a tiny preset
      name: loaded as is with the recipe's dtype;
    - None: the recipe's own ``model``.

    ``family`` is the family of what is loaded (``family_for(model_ref)``: an adapter's is its base's).
    ``trust_remote_code`` (the ``--trust-remote-code`` flag) applies to every model loaded here.
    """
    from pg_tune.models.source import adapter_base

    load_model, load_processor = family.load_model, family.load_processor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_config = recipe.model if recipe is not None else ModelConfig()
    model_config = dataclasses.replace(model_config, trust_remote_code=trust_remote_code)
    if base is not None and (model_ref is None or not (Path(model_ref) / "adapter_config.json").is_file()):
        raise ValueError(
            "--base applies to an adapter folder given with --model (one with adapter_config.json)"
        )
    if model_ref is not None and not Path(model_ref).exists() and _looks_like_path(model_ref):
        raise FileNotFoundError(f"--model {model_ref}: no such folder (a hub id is OWNER/NAME)")
    if model_ref is None:
        if recipe is None:
            raise ValueError("nothing to evaluate: give a recipe or --model")
        model, processor = load_model(model_config), load_processor(model_config)
        kind, description = "base", f"base model {model_config.name_or_path}"
    elif (Path(model_ref) / "adapter_config.json").is_file():
        import peft

        adapter_dir = Path(model_ref)
        if base is not None:
            expected, expected_from = base, "--base"
        elif recipe is not None:
            expected, expected_from = recipe.model.name_or_path, "the recipe's model.name_or_path"
        else:
            expected, expected_from = None, ""
        base_config = dataclasses.replace(
            model_config, name_or_path=adapter_base(adapter_dir, expected, expected_from)
        )
        # On stderr: stdout stays the prediction/metrics a script may parse.
        print(
            f"loading base {base_config.name_or_path} (from {adapter_dir / 'adapter_config.json'})",
            file=sys.stderr,
        )
        model = peft.PeftModel.from_pretrained(load_model(base_config), adapter_dir, is_trainable=False)
        has_processor = (adapter_dir / "tokenizer_config.json").is_file()
        processor = (
            load_processor(dataclasses.replace(base_config, name_or_path=str(adapter_dir)))
            if has_processor
            else None
        )
        processor = processor or load_processor(base_config)
        kind, description = "adapter", f"adapter {adapter_dir} on base {base_config.name_or_path}"
    else:
        ref_config = dataclasses.replace(model_config, name_or_path=model_ref, revision=None)
        model, processor = load_model(ref_config), load_processor(ref_config)
        kind = "merged" if (Path(model_ref) / "config.json").is_file() else "base"
        description = f"{kind} model {model_ref}"
    model.to(device).eval()
    return LoadedModel(model, processor, kind, description)


# --- pg-tune eval ------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    """Over all eval samples together, exactly as the training loop computes them."""
    per_dataset: dict[str, dict[str, float]]
    out_dir: Path
    notes: list[str] = field(default_factory=list)


def dataset_name(index: int, entry) -> str:
    options = entry.options
    detail = getattr(options, "path", None) or getattr(options, "name", None) or ""
    return f"eval[{index}] {entry.format}" + (f" {Path(str(detail)).name}" if detail else "")


def evaluate_recipe(
    recipe: Recipe,
    family: ModelFamily,
    model_ref: str | None,
    out_dir: str | Path,
    report_limit: int = 200,
    progress: bool = True,
    trust_remote_code: bool = False,
    base: str | None = None,
) -> EvalOutcome:
    """Evaluate every ``data.eval`` dataset of ``recipe`` and write the outputs into ``out_dir``.

    ``metrics.json``: ``{"model", "metrics" (all samples), "datasets" {name: metrics}, "notes"}``;
    ``predictions.jsonl``: one record per sample (``data_formats/predictions.md``);
    ``report/index.html``: summary and gallery, worst samples first. ``family`` is the family of the
    model evaluated (``model_ref``, else the recipe's model), its mask codec bound: it renders the
    prompts and parses the answers.
    """
    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.build import build_samples
    from pg_tune.evaluate.predictions import write_predictions
    from pg_tune.evaluate.report import write_report

    if not recipe.data.eval:
        raise ValueError("data.eval: the recipe names no eval dataset to evaluate")
    started = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad_rows = BadRows(recipe.data.on_bad_row)
    datasets: list[tuple[str, list[Sample]]] = []
    for index, entry in enumerate(recipe.data.eval):
        samples = build_samples([entry], "eval", bad_rows, seed=recipe.train.seed, family=family)
        if recipe.eval.limit is not None:
            samples = samples[: recipe.eval.limit]
        datasets.append((dataset_name(index, entry), samples))
    loaded = load_for_eval(model_ref, family, recipe, trust_remote_code=trust_remote_code, base=base)

    all_samples: list[Sample] = []
    all_texts: list[str] = []
    all_logprobs: list = []
    dataset_of: list[str] = []
    per_dataset: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for name, samples in datasets:
        if not samples:
            notes.append(f"{name}: no samples")
            continue
        texts, logprobs = _predictions(
            loaded.model, loaded.processor, samples, recipe, family, progress=progress
        )
        scored = score_samples(samples, texts, family, logprobs)
        per_dataset[name] = scored.metrics
        notes += [f"{name}: {n}" for n in scored.notes]
        all_samples += samples
        all_texts += texts
        all_logprobs += logprobs or [None] * len(texts)
        dataset_of += [name] * len(samples)
    overall: Scored = score_samples(all_samples, all_texts, family, all_logprobs)
    for record, name in zip(overall.records, dataset_of, strict=True):
        record["dataset"] = name
    summary = {
        "model": loaded.description,
        "metrics": overall.metrics,
        "datasets": per_dataset,
        "notes": notes,
        "num_samples": len(all_samples),
        "bad_rows": bad_rows.report(),
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_predictions(out_dir / "predictions.jsonl", overall.records)
    write_report(
        out_dir / "report",
        title=f"pg_tune evaluation: {loaded.description}",
        metrics_by_dataset=per_dataset,
        records=overall.records,
        images=[s.image for s in all_samples],
        notes=notes,
        mask_codec=family.mask_codec,
        limit=report_limit,
    )
    return EvalOutcome(overall.metrics, per_dataset, out_dir, notes)
