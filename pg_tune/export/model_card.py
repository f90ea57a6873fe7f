"""README.md model cards for adapters and merged exports, with Hub metadata in the YAML header.

The header is built with huggingface_hub's ``ModelCardData`` (the Hub reads ``base_model``,
``library_name``, ``tags``, ``datasets``, ``pipeline_tag`` from it); the body states how the
weights were made: eval metrics before/after training, export parity numbers, and the resolved
recipe. The Hub token is never part of a recipe, so the recipe can be printed in full.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData

from pg_tune.models.family import ModelFamily, is_tiny_preset

if TYPE_CHECKING:
    from pg_tune.export.run import Run

DEFAULT_TAGS = ["pg_tune", "image-text-to-text"]


def base_model_id(run: Run, override: str | None = None) -> str | None:
    """The base's Hub id for the card: ``hub.base_model`` if set, else ``model.name_or_path`` when it
    is a Hub id (not a local folder or a built-in tiny preset)."""
    if override:
        return override
    name = run.recipe.model.name_or_path
    if is_tiny_preset(name) or Path(name).exists() or name.count("/") != 1:
        return None
    return name


def _metrics_table(summary: dict[str, Any]) -> str:
    before, after = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    names = sorted(n for n in set(before) | set(after) if not n.endswith("/count"))
    if not names:
        return "No evaluation data was configured for this run.\n"
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [f"| {n} | {fmt(before.get(n))} | {fmt(after.get(n))} |" for n in names]
    return "| metric | before training | after training |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def _parity_text(report: dict[str, Any]) -> str:
    def line(label: str, r: dict[str, Any]) -> str:
        return (
            f"| {label} | {r['max_abs_diff']:.3g} | {r['mean_abs_diff']:.3g} | "
            f"{100 * r['top1_agreement']:.2f}% |"
        )

    if "parity_modules" in report:
        return _module_parity_text(report)
    p = report["parity_fp32"]
    rows = (
        [line("base alone (adapter effect)", report["adapter_effect"])] if "adapter_effect" in report else []
    )
    rows.append(line("merged (fp32) vs base + adapter (fp32)", p))
    if "cast" in report:
        rows.append(line(f"merged, saved as {report['dtype']}", report["cast"]))
    if "quantized_vs_merged" in report:
        rows.append(
            line(f"{report['quantization']} base + adapter (as trained)", report["quantized_vs_merged"])
        )
    return (
        f"Logits on {report['samples']} samples ({p['positions']} text positions), compared with the "
        f"fp32 base + adapter; logit scale {p['max_abs_logit']:.3g}. The fp32 merge must stay within "
        f"{p['tolerance']:.3g}.\n\n| model | max abs diff | mean abs diff | top-1 agreement |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def _module_parity_text(report: dict[str, Any]) -> str:
    """The streamed export's per-module check (``pg_tune.export.stream``)."""
    m = report["parity_modules"]
    worst = m["worst"] or {}
    text = (
        f"Each of the {m['modules_merged']} merged linear layers was checked on random inputs: merged "
        f"`W'x` against `Wx + s·B(Ax)` in fp32"
        + (
            f"; worst {worst['max_abs_diff']:.3g} against a tolerance of {worst['tolerance']:.3g} "
            f"(`{worst['module']}`)"
            if worst
            else ""
        )
        + ".\n"
    )
    if m.get("cast_worst_rel"):
        text += (
            f"Saving as {report['dtype']} changes a merged layer's output by at most "
            f"{m['cast_worst_rel']['rel']:.3g} of its scale.\n"
        )
    return text


def _method_tags(method: str, kind: str) -> list[str]:
    if method != "lora":
        return [f"{method}-finetune"]
    return ["lora"] if kind == "adapter" else ["merged-lora"]


def build_model_card(
    run: Run,
    family: ModelFamily,
    kind: Literal["adapter", "merged"],
    export_report: dict[str, Any] | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
) -> str:
    """The README.md text of an adapter repo (``library_name: peft``) or a merged export."""
    base = base_model_id(run, base_model)
    data = ModelCardData(
        base_model=base,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="image-text-to-text",
        tags=list(
            dict.fromkeys(
                DEFAULT_TAGS[:1]
                + list(family.hub_tags)
                + DEFAULT_TAGS[1:]
                + _method_tags(run.recipe.method, kind)
                + (tags or [])
            )
        ),
        datasets=list(datasets or []) or None,
    )
    recipe = run.recipe
    title = repo_id or run.run_dir.name
    base_text = f"`{base}`" if base else f"`{recipe.model.name_or_path}` (a local or built-in base)"
    method = "QLoRA" if recipe.quantization.mode != "none" else "LoRA"
    if recipe.method == "lora" and recipe.lora.use_dora:
        method = "DoRA" if recipe.quantization.mode == "none" else "QDoRA"
    if recipe.method == "full":
        method = "full fine-tuning" + (", vision encoder included" if recipe.full.vision else "")
    elif recipe.method == "partial":
        method = f"partial fine-tuning of {', '.join(recipe.partial.groups)}"
    if recipe.quantization.mode != "none":
        method += f" ({recipe.quantization.mode} {recipe.quantization.bnb_4bit_quant_type} base)"
    if kind == "adapter":
        usage = family.usage_snippet(base, repo_id or "ADAPTER_DIR", merged=False)
    else:
        usage = family.usage_snippet(base, repo_id or "EXPORT_DIR", merged=True)
    steps = run.summary.get("steps")
    parts = [
        f"# {title}\n",
        f"{'A LoRA adapter' if kind == 'adapter' else 'Merged weights' if recipe.method == 'lora' else 'Weights'}"
        f" for {base_text}, fine-tuned with "
        f"pg_tune ({method}" + (f", {steps} optimizer steps" if steps else "") + ").\n",
        "## Usage\n",
        usage,
        "## Evaluation\n",
        _metrics_table(run.summary),
    ]
    if export_report and ("parity_fp32" in export_report or "parity_modules" in export_report):
        parts += ["## Export parity\n", _parity_text(export_report)]
    elif export_report and "cast" in export_report:  # a full / partial run: nothing merged, only cast
        c = export_report["cast"]
        parts += [
            "## Export\n",
            f"Saved as {export_report['dtype']}: max |Δlogit| {c['max_abs_diff']:.3g} (mean "
            f"{c['mean_abs_diff']:.3g}) against the trained fp32 weights, top-1 agreement "
            f"{100 * c['top1_agreement']:.2f}% over {c['positions']} positions.\n",
        ]
    parts += [
        "## Training recipe\n",
        "The resolved recipe (defaults filled in) this model was trained with:\n",
        "```yaml\n" + yaml.safe_dump(run.resolved, sort_keys=False) + "```\n",
    ]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(parts))
    return str(card)
