"""``pg-tune compare RECIPE --models A,B,C [--steps N]``: the same fine-tune on several models.

Each model (a tiny preset, a hub id or a local checkpoint of any registered family) is trained on
the recipe's data with the recipe's batch size, LoRA rank and schedule (``--steps`` overrides
``train.max_steps`` for all alike) and evaluated before and after on the recipe's eval sets with the
same metrics. Each run is its own subprocess, so its peak memory is its own (CUDA:
``max_memory_allocated``; CPU: the process's peak RSS). Written to ``--out`` (default
``<output_dir>/compare``)::

    compare/
      runs/<model>/      each model's run folder (adapter, metrics.jsonl)
      results.json       everything below, one object per model
      table.md           metrics before -> after, samples/s, peak memory, trainable params, adapter size
      index.html         the same table and chart.svg in one page
      chart.svg          one bar chart per metric (before / after, on a shared labelled axis) and per cost

Throughput is the median of the loop's logged ``samples_per_s`` windows after the first step
(which includes warm-up). Example::

    pg-tune compare recipes/demo/shapes_tiny.yaml --models tiny-paligemma2,tiny-gemma3,tiny-smolvlm2 --steps 60
"""

from __future__ import annotations

import html
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Interrupted", "ModelRun", "check_models", "compare", "html_page", "markdown_table", "svg_chart"]


@dataclass
class ModelRun:
    """One model's fine-tune as measured by ``compare``."""

    model: str
    family: str = ""
    steps: int = 0
    seconds: float = 0.0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    samples_per_s: float = float("nan")
    peak_memory_gb: float = float("nan")
    memory_kind: str = ""
    trainable_params: int = 0
    total_params: int = 0
    adapter_bytes: int = 0
    run_dir: str = ""
    error: str | None = None


def _folder_name(model: str) -> str:
    return model.strip("/").replace("/", "--")


# ---- one model, in its own process ---------------------------------------------------------------


def check_models(models: list[str]) -> None:
    """Refuse, before anything trains, a list naming a model twice, two names that map to one run
    folder (``a/b`` and ``a--b``), or a name no model family answers to (``ConfigError``, one line)."""
    from pg_tune.config.schema import ConfigError
    from pg_tune.models.family import family_for, family_names, is_tiny_preset

    folders: dict[str, str] = {}
    for model in models:
        if model in folders.values():
            raise ConfigError(f"--models: {model!r} is given twice; name each model once")
        folder = _folder_name(model)
        if folder in folders:
            raise ConfigError(
                f"--models: {folders[folder]!r} and {model!r} would share the run folder runs/{folder}; "
                "name each model once, by one name"
            )
        folders[folder] = model
    for model in models:
        if is_tiny_preset(model) or Path(model).exists():
            if Path(model).is_file():
                raise ConfigError(
                    f"--models: {model!r}: a file, not a model folder (config.json, model.safetensors and the "
                    "processor files); nothing was trained"
                )
            family_for(model)  # a folder that is no model says why
            continue
        if "/" not in model:
            presets = sorted({p for name in family_names() for p in family_for(name).tiny_presets})
            raise ConfigError(
                f"--models: {model!r} is not a tiny preset ({', '.join(presets)}), a local model folder or a "
                "hub id OWNER/NAME; nothing was trained"
            )
        try:
            family_for(model)
        except FileNotFoundError:
            raise ConfigError(f"--models: {model!r}: no such folder (a hub id is OWNER/NAME)") from None
        except ValueError:
            raise ConfigError(
                f"--models: {model!r}: no model family: no cached config names one and the name matches none of "
                f"the families' hub ids ({', '.join(family_names())}); nothing was trained"
            ) from None


def _measure(
    recipe_path: str, overrides: list[str], result_path: Path, trust_remote_code: bool, resume: bool = False
) -> None:
    """The child: train (``resume``: continue the run an interrupted compare left), then write what
    ``compare`` reports about this model."""
    import torch

    from pg_tune.config import load_recipe
    from pg_tune.models.family import load_family
    from pg_tune.train.loop import train

    recipe, resolved = load_recipe(recipe_path, overrides)
    recipe.model.trust_remote_code = trust_remote_code  # the command-line flag, never the recipe
    family = load_family(recipe.model.name_or_path, recipe.model.vae_path)
    result = train(recipe, resolved, family, resume="auto" if resume else None, overwrite=not resume)
    model = result.model
    records = [
        json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    windows = [r["samples_per_s"] for r in records if "samples_per_s" in r and r.get("step", 0) > 1]
    windows = windows or [r["samples_per_s"] for r in records if "samples_per_s" in r]
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated() / 1e9, "CUDA max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "peak RSS"  # KiB on Linux
    run = ModelRun(
        model=recipe.model.name_or_path,
        family=family.name,
        steps=result.steps,
        seconds=result.seconds,
        first_loss=result.first_loss,
        last_loss=result.last_loss,
        metrics_before=dict(result.metrics_before),
        metrics_after=dict(result.metrics_after),
        samples_per_s=statistics.median(windows) if windows else float("nan"),
        peak_memory_gb=peak,
        memory_kind=kind,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        adapter_bytes=sum(
            p.stat().st_size for p in Path(result.adapter_dir).glob("adapter_model*.safetensors")
        ),
        run_dir=str(recipe.output_dir),
    )
    result_path.write_text(json.dumps(asdict(run), indent=2))


def _model_args(overrides: list[str], model: str, run_dir: Path) -> list[str]:
    # compare's own settings come last so the user's overrides cannot point two models at one folder;
    # each model trains into run_dir/run, a folder compare owns.
    return [*overrides, f"model.name_or_path={model}", f"output_dir={run_dir / 'run'}"]


def _earlier_state(recipe_path: str, model: str, run_dir: Path, overrides: list[str]) -> str:
    """What an earlier compare left for this model with the same settings: ``finished`` (its result
    is kept), ``interrupted`` (its run resumes from its newest checkpoint) or ``none`` (train clean)."""
    import yaml

    from pg_tune.config import load_recipe

    written = run_dir / "run" / "recipe.yaml"
    if not written.is_file():
        return "none"
    _, resolved = load_recipe(recipe_path, _model_args(overrides, model, run_dir))
    if yaml.safe_load(written.read_text(encoding="utf-8")) != resolved:
        return "none"  # other settings: a new run
    if (run_dir / "compare_result.json").is_file():
        return "finished"
    checkpoints = run_dir / "run" / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(
        (p / "complete.json").is_file() for p in checkpoints.iterdir()
    )
    finished_run = (run_dir / "run" / "final_state.json").is_file()
    return "interrupted" if has_checkpoint and not finished_run else "none"


class Interrupted(Exception):
    """Ctrl-C during one model's run: that run has checkpointed (or stopped) and exited."""

    def __init__(self, model: str):
        super().__init__(model)
        self.model = model


def _run_one(
    recipe_path: str,
    model: str,
    run_dir: Path,
    overrides: list[str],
    trust_remote_code: bool,
    resume: bool = False,
) -> ModelRun:
    result_path = run_dir / "compare_result.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    args = _model_args(overrides, model, run_dir)
    flags = ["--trust-remote-code"] if trust_remote_code else []
    flags += ["--resume"] if resume else []
    cmd = [
        sys.executable,
        "-m",
        "pg_tune.measure.compare",
        "--child",
        str(result_path),
        *flags,
        recipe_path,
        *args,
    ]
    log_path = run_dir / "compare.log"
    with log_path.open("w") as log:
        # Its own session: a terminal's Ctrl-C reaches compare only, which forwards ONE SIGINT, so the
        # run finishes its step and checkpoints (a second SIGINT would stop it at once).
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
        )
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: stop it now
                proc.kill()
                proc.wait()
            raise Interrupted(model) from None
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return ModelRun(
            model=model, run_dir=str(run_dir), error=f"exit {proc.returncode}: {tail[0]} (see {log_path})"
        )
    return ModelRun(**json.loads(result_path.read_text()))


def compare(
    recipe_path: str | Path,
    models: list[str],
    steps: int | None = None,
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    trust_remote_code: bool = False,
    say=print,
) -> list[ModelRun]:
    """Fine-tune and evaluate each model alike; write the ``compare/`` folder; return the runs."""
    from pg_tune.config import load_recipe
    from pg_tune.data.validate import check_recipe_support
    from pg_tune.models.family import family_for

    overrides = list(overrides or [])
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    recipe, _ = load_recipe(str(recipe_path), overrides)
    check_models(models)
    for model in models:  # refuse what a family cannot do before training anything
        try:
            family = family_for(model)
        except (ValueError, OSError):
            continue  # an unknown model fails in its own run, shown in the table
        check_recipe_support(
            load_recipe(str(recipe_path), [*overrides, f"model.name_or_path={model}"])[0], family
        )
    out = Path(out_dir) if out_dir is not None else Path(recipe.output_dir) / "compare"
    runs = []
    for k, model in enumerate(models, start=1):
        run_dir = out / "runs" / _folder_name(model)
        earlier = _earlier_state(str(recipe_path), model, run_dir, overrides)
        if earlier == "finished":
            run = ModelRun(**json.loads((run_dir / "compare_result.json").read_text()))
            say(f"[{k}/{len(models)}] {model}: kept from the earlier compare ({run_dir})")
            runs.append(run)
            continue
        what = "resuming its interrupted run" if earlier == "interrupted" else "training"
        say(f"[{k}/{len(models)}] {model}: {what} ({run_dir})")
        try:
            run = _run_one(
                str(recipe_path),
                model,
                run_dir,
                overrides,
                trust_remote_code,
                resume=earlier == "interrupted",
            )
        except Interrupted:
            write_report(runs, out, str(recipe_path), recipe.lora.r, recipe.train.batch_size)
            raise
        say(
            f"[{k}/{len(models)}] {model}: "
            + (run.error or f"loss {run.first_loss:.3f} -> {run.last_loss:.3f}")
        )
        runs.append(run)
    write_report(runs, out, str(recipe_path), recipe.lora.r, recipe.train.batch_size)
    say(f"compare: {out / 'table.md'}, {out / 'index.html'}, {out / 'chart.svg'}")
    return runs


# ---- the report ----------------------------------------------------------------------------------


def _metric_names(runs: list[ModelRun]) -> list[str]:
    names = {n for r in runs for n in (*r.metrics_before, *r.metrics_after) if not n.endswith("/count")}
    return sorted(names)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def _rows(runs: list[ModelRun]) -> tuple[list[str], list[list[str]]]:
    metrics = _metric_names(runs)
    header = ["model", "family", *[f"{m} before → after" for m in metrics], "loss first → last"]
    header += ["samples/s", "peak memory GB", "trainable params", "adapter MB"]
    rows = []
    for r in runs:
        if r.error:
            rows.append([r.model, r.family or "-", *(["failed"] * (len(header) - 3)), r.error])
            continue
        rows.append(
            [
                r.model,
                r.family,
                *[f"{_fmt(r.metrics_before.get(m))} → {_fmt(r.metrics_after.get(m))}" for m in metrics],
                f"{_fmt(r.first_loss, 2)} → {_fmt(r.last_loss, 2)}",
                _fmt(r.samples_per_s, 1),
                _fmt(r.peak_memory_gb, 2),
                f"{r.trainable_params:,}",
                _fmt(r.adapter_bytes / 1e6, 2),
            ]
        )
    return header, rows


def markdown_table(runs: list[ModelRun]) -> str:
    """The comparison as a markdown table, one row per model."""
    header, rows = _rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_COLOURS = ("#9ecae1", "#08519c")  # before, after


def _nice_top(value: float) -> float:
    """The axis top: ``value`` rounded up to one significant digit (2.7 -> 3, 12 -> 20, 0.75 -> 0.8)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return math.ceil(round(value / scale, 9)) * scale


def _bar_panel(
    title: str,
    labels: list[str],
    series: list[tuple[str, list[float]]],
    x0: float,
    y0: float,
    top: float,
    digits: int,
) -> str:
    """One grouped bar chart at (x0, y0), 260 x 170 px, on a labelled axis from 0 to ``top``.

    Each bar carries its value as the table prints it (``digits`` decimals); a value that prints as
    zero (or is missing) draws no bar, and a panel whose values all print as zero draws none at all.
    """
    width, height, top_pad, bottom, left = 260.0, 170.0, 30.0, 40.0, 34.0
    plot = height - top_pad - bottom
    shown = [[_fmt(v, digits) for v in vs] for _, vs in series]
    zero = _fmt(0.0, digits)
    parts = [
        f'<g data-title="{html.escape(title)}" transform="translate({x0:.0f},{y0:.0f})">',
        f'<text x="{width / 2:.0f}" y="14" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
    ]
    if all(text in (zero, "-") for texts in shown for text in texts):
        parts.append(
            f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="11" fill="#555">'
            f"{zero} for every model (nothing to draw)</text></g>"
        )
        return "".join(parts)
    parts.append(
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{height - bottom}" stroke="#444"/>'
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 6}" y2="{height - bottom}" stroke="#444"/>'
    )
    for fraction in (0.0, 0.5, 1.0):
        y = height - bottom - plot * fraction
        parts.append(
            f'<line x1="{left - 3}" y1="{y:.1f}" x2="{width - 6}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text class="tick" x="{left - 5}" y="{y + 3:.1f}" text-anchor="end" font-size="9">'
            f"{top * fraction:g}</text>"
        )
    group = (width - left - 10) / max(len(labels), 1)
    bar = group * 0.8 / max(len(series), 1)
    for i, label in enumerate(labels):
        gx = left + 4 + i * group + group * 0.1
        for j, (name, vs) in enumerate(series):
            v, text = vs[i], shown[j][i]
            h = 0.0 if text in (zero, "-") else plot * min(max(v / top, 0.0), 1.0)
            x = gx + j * bar
            if h > 0:
                parts.append(
                    f'<rect class="bar" x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar:.1f}" '
                    f'height="{h:.1f}" fill="{_COLOURS[j % 2] if len(series) > 1 else _COLOURS[1]}">'
                    f"<title>{html.escape(label)} {html.escape(name)}: {text}</title></rect>"
                )
            parts.append(
                f'<text class="value" x="{x + bar / 2:.1f}" y="{height - bottom - h - 2:.1f}" '
                f'text-anchor="middle" font-size="8">{text}</text>'
            )
        parts.append(
            f'<text x="{gx + group * 0.4:.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">'
            f"{html.escape(label[-18:])}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def svg_chart(runs: list[ModelRun]) -> str:
    """Bar charts: each metric before and after per model, on one shared axis (0 to 1 when every
    metric is a fraction), then samples/s, peak memory and trainable params on their own axes."""
    ok = [r for r in runs if not r.error]
    labels = [r.model for r in ok]
    metrics = _metric_names(ok)
    values = [v for r in ok for m in metrics for v in (r.metrics_before.get(m), r.metrics_after.get(m))]
    values = [v for v in values if v is not None and v == v]
    shared_top = 1.0 if all(0 <= v <= 1 for v in values) else _nice_top(max(values, default=1.0))
    panels = [
        (
            m,
            [
                ("before", [r.metrics_before.get(m, float("nan")) for r in ok]),
                ("after", [r.metrics_after.get(m, float("nan")) for r in ok]),
            ],
            shared_top,
            3,
        )
        for m in metrics
    ]
    for title, numbers, digits in (
        ("samples/s", [r.samples_per_s for r in ok], 1),
        ("peak memory GB", [r.peak_memory_gb for r in ok], 2),
        ("trainable params (M)", [r.trainable_params / 1e6 for r in ok], 3),
    ):
        finite = [v for v in numbers if v == v]
        panels.append((title, [("", numbers)], _nice_top(max(finite, default=1.0)), digits))
    per_row = 3
    rows = (len(panels) + per_row - 1) // per_row
    body = "".join(
        _bar_panel(title, labels, series, 270 * (k % per_row), 180 * (k // per_row) + 20, top, digits)
        for k, (title, series, top, digits) in enumerate(panels)
    )
    legend = (
        f'<rect x="10" y="4" width="10" height="10" fill="{_COLOURS[0]}"/><text x="24" y="13" font-size="11">before</text>'
        f'<rect x="80" y="4" width="10" height="10" fill="{_COLOURS[1]}"/><text x="94" y="13" font-size="11">after</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{270 * per_row}" height="{180 * rows + 30}" '
        f'font-family="sans-serif">{legend}{body}</svg>'
    )


def html_page(runs: list[ModelRun], recipe_path: str, rank: int, batch_size: int) -> str:
    """A self-contained page: the settings, the table and the chart."""
    header, rows = _rows(runs)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    steps = sorted({r.steps for r in runs if not r.error})
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>pg-tune compare</title>'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,th{text-align:left}</style>"
        "</head><body>"
        f"<h1>pg-tune compare: {html.escape(recipe_path)}</h1>"
        f"<p>Same data, steps ({', '.join(map(str, steps)) or '-'}), batch size {batch_size} and LoRA rank {rank} "
        "for every model; the same eval sets and metrics before and after.</p>"
        f'<table id="compare"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<h2>Chart</h2><div id="chart">{svg_chart(runs)}</div></body></html>\n'
    )


def write_report(runs: list[ModelRun], out: Path, recipe_path: str, rank: int, batch_size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    (out / "table.md").write_text(markdown_table(runs))
    (out / "chart.svg").write_text(svg_chart(runs))
    (out / "index.html").write_text(html_page(runs, recipe_path, rank, batch_size))


def _child(argv: list[str]) -> int:
    """``python -m pg_tune.measure.compare --child RESULT [--trust-remote-code] [--resume] RECIPE ...``"""
    from pg_tune.train.signals import TrainingStopped

    result_path, rest = Path(argv[0]), argv[1:]
    trusted = "--trust-remote-code" in rest[:2]
    resume = "--resume" in rest[:2]
    rest = [a for a in rest[:2] if a not in ("--trust-remote-code", "--resume")] + rest[2:]
    try:
        _measure(rest[0], rest[1:], result_path, trusted, resume)
    except TrainingStopped as e:  # Ctrl-C forwarded by compare: the step finished and was checkpointed
        print(f"pg-tune: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    else:
        print(__doc__)
