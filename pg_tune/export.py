"""Merged-weight export: a training run's adapter folded into a full-precision base.

Run it with ``pg-tune export RUN_DIR --out DIR [--dtype bf16|fp16|fp32]``. The output folder loads
with the model family's classes alone (PaliGemma: ``PaliGemmaForConditionalGeneration`` /
``PaliGemmaProcessor.from_pretrained(DIR)``): safetensors shards, ``config.json``,
``generation_config.json``, processor/tokenizer files and a ``README.md`` model card.

The adapter is always merged into a freshly loaded fp32 base, never into 4-bit weights: merging
into a quantized base rounds the LoRA update into the quantization grid and degrades outputs, even
when training was QLoRA. A parity check runs before anything is written: on a few samples the
merged model's logits must match the unmerged base + adapter (both fp32) within
``PARITY_ATOL + PARITY_RTOL * max|logit|``. The cost of casting to the export dtype, and for a QLoRA
run the gap between the quantized model that was trained and the merged full-precision one, are
measured and reported (not enforced: they are the expected price of those choices).

A ``full`` or ``partial`` run (``method: full|partial``) has no adapter: it saved a complete model
folder (``RUN/model``) that loads with transformers alone. Exporting it only casts that folder to
``--dtype`` (the cast's logit change is measured and reported) and adds the model card.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pg_tune.config.recipe import Recipe, parse_recipe
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.sample import DataError, Sample
from pg_tune.model_source import adapter_base
from pg_tune.models.family import ModelFamily, family_for

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-4
"""fp32 merge vs fp32 base + adapter: only the summation order differs ((W + sBA)x vs Wx + sB(Ax))."""
REPORT_NAME = "export_report.json"


class ExportError(RuntimeError):
    """The run folder cannot be exported, or the merged model does not match base + adapter."""


@dataclass
class Run:
    """A training run folder as ``pg_tune.train.loop.train`` writes it."""

    run_dir: Path
    recipe: Recipe
    resolved: dict[str, Any]
    adapter_dir: Path
    """``RUN/adapter`` for a LoRA run; for a full or partial run the complete model, ``RUN/model``."""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_full_model(self) -> bool:
        """A ``full`` / ``partial`` run: ``adapter_dir`` holds a complete model, not an adapter."""
        return self.recipe.method != "lora"


def read_run(run_dir: str | Path) -> Run:
    """Read a run folder's recipe, summary and adapter (or model) location; errors name the missing file."""
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if (run_dir / "model" / "config.json").is_file() and not adapter_dir.is_dir():
        adapter_dir = run_dir / "model"  # a full or partial run: a complete model folder
        required_files = [adapter_dir / "config.json"]
        if not any(adapter_dir.glob("*.safetensors")):
            raise ExportError(f"{run_dir}: not a finished training run (no weights in {adapter_dir})")
    else:
        required_files = [adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"]
    for required in required_files:
        if not required.is_file():
            raise ExportError(f"{run_dir}: not a finished training run ({required} is missing)")
    recipe_path = next(
        (p for p in (run_dir / "recipe.yaml", adapter_dir / "recipe.yaml") if p.is_file()), None
    )
    if recipe_path is None:
        raise ExportError(f"{run_dir}: recipe.yaml is missing (looked in the run folder and adapter/)")
    resolved = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    recipe = parse_recipe(resolved)
    # The base comes from the recipe, which must name the one the adapter was trained on (a full or
    # partial run's folder is the whole model: no base to check).
    if recipe.method == "lora":
        adapter_base(adapter_dir, recipe.model.name_or_path, f"{recipe_path} (model.name_or_path)")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return Run(run_dir, recipe, resolved, adapter_dir, summary)


def parity_samples(run: Run, processor, count: int) -> list[Sample]:
    """The first ``count`` eval (else train) samples of the run's recipe; synthetic shapes if the
    recipe's data is not reachable from this machine."""
    entries = run.recipe.data.eval or run.recipe.data.train
    try:
        samples = build_samples(entries, "eval", BadRows("skip"), seed=run.recipe.train.seed)[:count]
    except (DataError, OSError) as e:
        print(f"parity: the recipe's data is not readable here ({e}); using synthetic shapes")
        samples = []
    if not samples:
        from pg_tune.data.formats import BuildContext
        from pg_tune.data.formats.shapes import ShapesOptions, build

        size = processor.image_processor.size["height"]
        samples = build(
            ShapesOptions(num_samples=count, image_size=size), BuildContext("eval", BadRows("skip"))
        )
    return samples


@torch.no_grad()
def text_logits(
    model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], family: ModelFamily | None = None
) -> list[torch.Tensor]:
    """fp32 logits on each row's text positions (bos, prefix, suffix, eos), one tensor a row."""
    model.eval()
    family = family if family is not None else family_for(model)
    param = next(model.parameters())
    image_token_id = family.unwrap(model).config.image_token_id
    out = []
    for batch in batches:
        # Single unpadded rows whose image tokens come first: keep what follows them (the logits of
        # image positions mean nothing).
        n_text = int((batch["input_ids"][0] != image_token_id).sum())
        inputs = family.generation_inputs(batch, _float_dtype(model))
        logits = model(
            **{k: v.to(param.device) for k, v in inputs.items()},
            logits_to_keep=n_text,
            use_cache=False,
        ).logits
        out.append(logits[0].float().cpu())
    return out


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def compare_logits(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> dict[str, float]:
    """Max and mean absolute logit difference, the reference's logit scale and top-1 agreement."""
    diffs = [(a - b).abs() for a, b in zip(reference, other, strict=True)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other, strict=True))
    positions = sum(a.shape[0] for a in reference)
    return {
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": float(torch.cat([d.flatten() for d in diffs]).mean()),
        "max_abs_logit": max(float(a.abs().max()) for a in reference),
        "top1_agreement": agree / positions,
        "positions": positions,
    }


def _say(label: str, numbers: dict[str, float]) -> None:
    print(
        f"{label}: max |Δlogit| {numbers['max_abs_diff']:.3g}, mean {numbers['mean_abs_diff']:.3g} "
        f"(logit scale {numbers['max_abs_logit']:.3g}), top-1 agreement {100 * numbers['top1_agreement']:.2f}% "
        f"over {numbers['positions']} positions"
    )


def _load_with_adapter(run: Run, quantized: bool, device: str) -> torch.nn.Module:
    import peft

    model_config = run.recipe.model
    if not quantized:
        model_config = dataclasses.replace(model_config, dtype="float32")
    base = family_for(model_config.name_or_path).load_model(
        model_config, run.recipe.quantization if quantized else None
    )
    if not quantized:
        base = base.to(device)
    return peft.PeftModel.from_pretrained(base, run.adapter_dir, is_trainable=False)


def export_merged(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bf16",
    num_samples: int = 4,
    device: str | None = None,
    max_shard_size: str = "5GB",
    trust_remote_code: bool = False,
    parity: str = "module",
) -> dict[str, Any]:
    """Merge the run's adapter into a full-precision base, check parity, save a loadable folder.

    ``parity="module"`` (default) streams the merge shard by shard with a per-module check
    (``pg_tune.merge``); ``"full"`` loads the whole model and compares logits as described above.
    Returns (and writes to ``export_report.json``) the parity numbers.
    """
    from pg_tune.model_card import build_model_card

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    run = read_run(run_dir)
    run.recipe.model.trust_remote_code = trust_remote_code  # the --trust-remote-code flag only
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir}: exists and is not empty; choose a new --out folder")
    if parity not in ("module", "full"):
        raise ExportError(f"--parity {parity!r}: choose module or full")
    if parity == "module" and not run.is_full_model:  # full/partial runs have no adapter to merge
        from pg_tune.merge import MergeError, stream_export

        try:
            return stream_export(run, out_dir, dtype, EXPORT_DTYPES[dtype])
        except MergeError as e:
            raise ExportError(str(e)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family = family_for(run.recipe.model.name_or_path)
    processor = family.load_processor(
        dataclasses.replace(run.recipe.model, name_or_path=str(run.adapter_dir))
    )
    samples = parity_samples(run, processor, num_samples)
    mask_codec = family.load_mask_codec(run.recipe.model.vae_path)
    collator = family.collator(processor, run.recipe.data.max_text_length, train=True, mask_codec=mask_codec)
    batches = [collator([(i, s)]) for i, s in enumerate(samples)]
    if run.is_full_model:
        return _export_full_model(run, out_dir, dtype, batches, processor, device, max_shard_size, family)

    # 1. base + adapter, unmerged, fp32: the reference.
    model = _load_with_adapter(run, quantized=False, device=device)
    reference = text_logits(model, batches)
    with model.disable_adapter():
        # How much the adapter moves the logits: the parity check means something only if this is
        # far above its tolerance.
        adapter_effect = compare_logits(reference, text_logits(model, batches))
    # 2. merged in fp32, compared with the reference: this is the check that can fail.
    merged = model.merge_and_unload(safe_merge=True)
    del model
    parity = compare_logits(reference, text_logits(merged, batches))
    tolerance = PARITY_ATOL + PARITY_RTOL * parity["max_abs_logit"]
    parity["tolerance"] = tolerance
    _say("parity (merged fp32 vs base + adapter fp32)", parity)
    if not parity["max_abs_diff"] <= tolerance:
        raise ExportError(
            f"merged model differs from base + adapter by {parity['max_abs_diff']:.3g} > tolerance "
            f"{tolerance:.3g}; nothing was written"
        )
    print(f"parity: OK (tolerance {tolerance:.3g} = {PARITY_ATOL:g} + {PARITY_RTOL:g} x logit scale)")
    _say("adapter effect (base alone vs base + adapter)", adapter_effect)
    report: dict[str, Any] = {
        "dtype": dtype,
        "samples": len(batches),
        "parity_fp32": parity,
        "adapter_effect": adapter_effect,
    }
    # 3. the export dtype's rounding, measured on the weights as saved.
    merged = merged.to(EXPORT_DTYPES[dtype])
    if dtype != "fp32":
        report["cast"] = compare_logits(reference, text_logits(merged, batches))
        _say(f"cast to {dtype} vs base + adapter fp32", report["cast"])
    # 4. save: weights + config + generation config, then the processor files.
    merged.config.name_or_path = run.recipe.model.name_or_path
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)
    del merged
    gc.collect()
    # 5. QLoRA: how far the model that was trained (4/8-bit base + adapter) is from what was exported.
    if run.recipe.quantization.mode != "none":
        qmodel = _load_with_adapter(run, quantized=True, device=device)
        report["quantized_vs_merged"] = compare_logits(reference, text_logits(qmodel, batches))
        report["quantization"] = run.recipe.quantization.mode
        _say(
            f"QLoRA gap ({run.recipe.quantization.mode} base + adapter, as trained, vs merged fp32)",
            report["quantized_vs_merged"],
        )
        del qmodel
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    (out_dir / "README.md").write_text(build_model_card(run, kind="merged", export_report=report))
    print(f"exported to {out_dir}")
    return report


def _export_full_model(
    run: Run,
    out_dir: Path,
    dtype: str,
    batches: list[dict[str, torch.Tensor]],
    processor: Any,
    device: str,
    max_shard_size: str,
    family: Any,
) -> dict[str, Any]:
    """A full / partial run's model folder, cast to ``dtype``: nothing to merge, the cast measured."""
    from pg_tune.model_card import build_model_card

    model = family.model_class.from_pretrained(run.adapter_dir, dtype=torch.float32).to(device)
    reference = text_logits(model, batches)
    report: dict[str, Any] = {"dtype": dtype, "samples": len(batches), "method": run.recipe.method}
    model = model.to(EXPORT_DTYPES[dtype])
    if dtype != "fp32":
        report["cast"] = compare_logits(reference, text_logits(model, batches))
        _say(f"cast to {dtype} vs the trained fp32 weights", report["cast"])
    model.config.name_or_path = run.recipe.model.name_or_path
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)
    del model
    gc.collect()
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    (out_dir / "README.md").write_text(build_model_card(run, kind="merged", export_report=report))
    print(f"exported to {out_dir}")
    return report
