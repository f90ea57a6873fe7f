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
from pathlib import Path
from typing import Any

import torch

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.sample import DataError, Sample
from pg_tune.export.model_card import build_model_card
from pg_tune.export.run import REPORT_NAME, ExportError, Run, read_run, run_family
from pg_tune.export.staging import StagedExport
from pg_tune.export.stream import MergeError, stream_export
from pg_tune.models.family import ModelFamily

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-4
"""fp32 merge vs fp32 base + adapter: only the summation order differs ((W + sBA)x vs Wx + sB(Ax))."""


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
    model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], family: ModelFamily
) -> list[torch.Tensor]:
    """fp32 logits on each row's text positions (bos, prefix, suffix, eos), one tensor a row."""
    model.eval()
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


def _load_with_adapter(run: Run, family: ModelFamily, quantized: bool, device: str) -> torch.nn.Module:
    import peft

    model_config = run.recipe.model
    if not quantized:
        model_config = dataclasses.replace(model_config, dtype="float32")
    base = family.load_model(model_config, run.recipe.quantization if quantized else None)
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
    """``pg-tune export``: read the run folder, resolve its model family once (``run_family``), then
    ``export_run``. Returns (and writes to ``export_report.json``) the parity numbers."""
    _check_choices(dtype, parity)
    run = read_run(run_dir)
    run.recipe.model.trust_remote_code = trust_remote_code  # the --trust-remote-code flag only
    return export_run(run, run_family(run), out_dir, dtype, num_samples, device, max_shard_size, parity)


def _check_choices(dtype: str, parity: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if parity not in ("module", "full"):
        raise ExportError(f"--parity {parity!r}: choose module or full")


def export_run(
    run: Run,
    family: ModelFamily,
    out_dir: str | Path,
    dtype: str = "bf16",
    num_samples: int = 4,
    device: str | None = None,
    max_shard_size: str = "5GB",
    parity: str = "module",
) -> dict[str, Any]:
    """Merge the run's adapter into a full-precision base, check parity, save a loadable folder.

    ``parity="module"`` (default) streams the merge shard by shard with a per-module check
    (``pg_tune.export.stream``); ``"full"`` loads the whole model and compares logits as described above.
    ``family`` is the run's model family (``run_family``). Returns (and writes to
    ``export_report.json``) the parity numbers.
    """
    _check_choices(dtype, parity)
    if parity == "module" and not run.is_full_model:  # full/partial runs have no adapter to merge
        try:
            return stream_export(run, out_dir, dtype, EXPORT_DTYPES[dtype], family)
        except MergeError as e:
            raise ExportError(str(e)) from None
    # Written into OUT.partial (marked and locked, pg_tune.export.staging), renamed at the end.
    staging = StagedExport(out_dir)
    try:
        report = _export_whole_model(run, family, staging.path, dtype, num_samples, device, max_shard_size)
        staging.finish()
    except BaseException as e:
        staging.discard(e)
        raise
    print(f"exported to {out_dir}")
    return report


def _export_whole_model(
    run: Run,
    family: ModelFamily,
    out_dir: Path,
    dtype: str,
    num_samples: int,
    device: str | None,
    max_shard_size: str,
) -> dict[str, Any]:
    """``--parity full`` (and full / partial runs): the whole model loaded, logits compared, saved
    into ``out_dir`` (the staging folder)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = family.load_processor(
        dataclasses.replace(run.recipe.model, name_or_path=str(run.adapter_dir))
    )
    samples = parity_samples(run, processor, num_samples)
    collator = family.collator(processor, run.recipe.data.max_text_length, train=True)
    batches = [collator([(i, s)]) for i, s in enumerate(samples)]
    if run.is_full_model:
        return _export_full_model(run, out_dir, dtype, batches, processor, device, max_shard_size, family)

    # 1. base + adapter, unmerged, fp32: the reference.
    model = _load_with_adapter(run, family, quantized=False, device=device)
    reference = text_logits(model, batches, family)
    with model.disable_adapter():
        # How much the adapter moves the logits: the parity check means something only if this is
        # far above its tolerance.
        adapter_effect = compare_logits(reference, text_logits(model, batches, family))
    # 2. merged in fp32, compared with the reference: this is the check that can fail.
    merged = model.merge_and_unload(safe_merge=True)
    del model
    parity = compare_logits(reference, text_logits(merged, batches, family))
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
        report["cast"] = compare_logits(reference, text_logits(merged, batches, family))
        _say(f"cast to {dtype} vs base + adapter fp32", report["cast"])
    # 4. save: weights + config + generation config, then the processor files.
    merged.config.name_or_path = run.recipe.model.name_or_path
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)
    del merged
    gc.collect()
    # 5. QLoRA: how far the model that was trained (4/8-bit base + adapter) is from what was exported.
    if run.recipe.quantization.mode != "none":
        qmodel = _load_with_adapter(run, family, quantized=True, device=device)
        report["quantized_vs_merged"] = compare_logits(reference, text_logits(qmodel, batches, family))
        report["quantization"] = run.recipe.quantization.mode
        _say(
            f"QLoRA gap ({run.recipe.quantization.mode} base + adapter, as trained, vs merged fp32)",
            report["quantized_vs_merged"],
        )
        del qmodel
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    (out_dir / "README.md").write_text(build_model_card(run, family, kind="merged", export_report=report))
    return report


def _export_full_model(
    run: Run,
    out_dir: Path,
    dtype: str,
    batches: list[dict[str, torch.Tensor]],
    processor: Any,
    device: str,
    max_shard_size: str,
    family: ModelFamily,
) -> dict[str, Any]:
    """A full / partial run's model folder, cast to ``dtype``: nothing to merge, the cast measured."""

    model = family.model_class.from_pretrained(run.adapter_dir, dtype=torch.float32).to(device)
    reference = text_logits(model, batches, family)
    report: dict[str, Any] = {"dtype": dtype, "samples": len(batches), "method": run.recipe.method}
    model = model.to(EXPORT_DTYPES[dtype])
    if dtype != "fp32":
        report["cast"] = compare_logits(reference, text_logits(model, batches, family))
        _say(f"cast to {dtype} vs the trained fp32 weights", report["cast"])
    model.config.name_or_path = run.recipe.model.name_or_path
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(out_dir)
    del model
    gc.collect()
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    (out_dir / "README.md").write_text(build_model_card(run, family, kind="merged", export_report=report))
    return report
