"""The ``pg-tune eval`` and ``pg-tune predict`` subcommands (parsers and handlers).

pg-tune eval RECIPE [--model DIR|ID] [--out DIR] [key.sub=value ...]
    evaluate every ``data.eval`` dataset; write metrics.json, predictions.jsonl, report/index.html
pg-tune eval --predictions predictions.jsonl [--out DIR]
    recompute the metrics of a saved predictions file, without loading a model
pg-tune predict --model DIR|ID --image PATH --prompt "detect cat" [--draw out.png] [--vae-path vae-oid.npz]
    print the raw generated text and the parsed boxes/masks as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pg_tune.config import ConfigError, load_recipe
from pg_tune.data.sample import DataError


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    from pg_tune.evaluate.report import COUNT_SUFFIXES

    print(title)
    for name, value in metrics.items():
        shown = str(int(value)) if name.endswith(COUNT_SUFFIXES) else f"{value:.4f}"
        print(f"  {name + ':':<28} {shown}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from pg_tune.evaluate.scoring import load_mask_codec

    try:
        if args.predictions:
            if args.recipe or args.model:
                raise ConfigError(
                    "--predictions recomputes metrics from a file: give no recipe or --model with it"
                )
            from pg_tune.evaluate.predictions import rescore
            from pg_tune.evaluate.report import write_report

            path = Path(args.predictions)
            overall, per_dataset = rescore(path, load_mask_codec(args.vae_path))
            out_dir = Path(args.out) if args.out else path.parent / "rescored"
            out_dir.mkdir(parents=True, exist_ok=True)
            summary = {"predictions": str(path), "metrics": overall.metrics, "datasets": per_dataset,
                       "notes": overall.notes}  # fmt: skip
            (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            index = write_report(
                out_dir / "report",
                title=f"pg_tune evaluation (re-scored from {path.name})",
                metrics_by_dataset=per_dataset or {"all": overall.metrics},
                records=overall.records,
                notes=overall.notes,
                mask_codec=load_mask_codec(args.vae_path),
                limit=args.report_limit,
            )
            _print_metrics(f"{path}: {len(overall.records)} predictions", overall.metrics)
            for note in overall.notes:
                print(f"note: {note}")
            print(f"metrics: {out_dir / 'metrics.json'}\nreport:  {index}")
            return 0
        if not args.recipe:
            raise ConfigError("pg-tune eval needs a RECIPE (or --predictions FILE)")
        from pg_tune.evaluate.run import evaluate_recipe

        recipe, _ = load_recipe(args.recipe, args.overrides)
        out_dir = Path(args.out) if args.out else Path(recipe.output_dir) / "eval"
        outcome = evaluate_recipe(
            recipe, args.model, out_dir, args.vae_path, args.report_limit,
            trust_remote_code=args.trust_remote_code, base=args.base,
        )  # fmt: skip
    except (OSError, ValueError) as e:  # missing/unloadable model or file: one line, no traceback
        if isinstance(e, (ConfigError, DataError)):
            raise
        print(f"pg-tune: error: {e}", file=sys.stderr)
        return 2
    for name, metrics in outcome.per_dataset.items():
        _print_metrics(name, metrics)
    for note in outcome.notes:
        print(f"note: {note}")
    print(f"metrics:     {out_dir / 'metrics.json'}")
    print(f"predictions: {out_dir / 'predictions.jsonl'}")
    print(f"report:      {out_dir / 'report' / 'index.html'}")
    return 0


def predict_one(
    model_ref: str,
    image_path: str,
    prompt: str,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    vae_path: str | None = None,
    draw_path: str | None = None,
    trust_remote_code: bool = False,
    base: str | None = None,
) -> dict[str, Any]:
    """Generate for one image and prompt; returns the raw text and the parsed objects (JSON-ready)."""
    from pycocotools import mask as mask_utils

    from pg_tune.codecs import parse_detections
    from pg_tune.data.images import load_image
    from pg_tune.data.sample import Sample
    from pg_tune.evaluate.generate import generate
    from pg_tune.evaluate.run import load_for_eval
    from pg_tune.evaluate.scoring import detections_json, load_mask_codec

    image = load_image(image_path, image_path)
    codec = load_mask_codec(vae_path)
    loaded = load_for_eval(model_ref, trust_remote_code=trust_remote_code, base=base)
    sample = Sample(image=image, prefix=prompt, suffix="", source=image_path, task="caption")
    text = generate(
        loaded.model, loaded.processor, [sample], max_new_tokens=max_new_tokens, num_beams=num_beams
    )[0]
    detections = parse_detections(text, image.size)
    objects = detections_json(detections)
    notes = []
    for obj, det in zip(objects, detections, strict=True):
        if det.seg is None:
            continue
        if codec is None:
            continue
        mask = codec.decode_mask(det.seg, det.box, image.size)
        rle = mask_utils.encode(mask.astype("uint8", order="F"))
        obj["mask"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii"), "area": int(mask.sum())}
    if codec is None and any(d.seg is not None for d in detections):
        notes.append("masks not decoded: pass --vae-path vae-oid.npz (big_vision's mask VQ-VAE); boxes only")
    if draw_path:
        from pg_tune.evaluate.report import draw_annotations

        draw_annotations(image, [], objects, codec, max_side=None).save(draw_path)
    return {"model": loaded.description, "prompt": prompt, "prediction": text, "image_size": list(image.size),
            "objects": objects, "notes": notes}  # fmt: skip


def _cmd_predict(args: argparse.Namespace) -> int:
    try:
        result = predict_one(
            args.model, args.image, args.prompt, args.max_new_tokens, args.num_beams, args.vae_path, args.draw,
            trust_remote_code=args.trust_remote_code, base=args.base,
        )  # fmt: skip
    except (OSError, ValueError) as e:  # missing/unloadable model or file: one line, no traceback
        if isinstance(e, (ConfigError, DataError)):
            raise
        print(f"pg-tune: error: {e}", file=sys.stderr)
        return 2
    print(result["prediction"])
    print(json.dumps(result, indent=2))
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if args.draw:
        print(f"drawn: {args.draw}", file=sys.stderr)
    return 0


def add_remote_code_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run the Python code a model folder or hub repo ships (auto_map); "
        "never set by a recipe or an adapter folder",
    )


def add_model_trust_arguments(p: argparse.ArgumentParser) -> None:
    add_remote_code_argument(p)
    p.add_argument(
        "--base",
        help="with an adapter --model: the base you expect; refused if the adapter's "
        "adapter_config.json names another (default: the base it names, checked against the recipe)",
    )


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a recipe's eval datasets, or re-score predictions")
    p.add_argument("recipe", nargs="?", help="recipe whose data.eval datasets are evaluated")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.limit=50")
    p.add_argument("--model", help="adapter dir (RUN/adapter), merged model dir, hub id or tiny preset; "
                   "default: the recipe's model")  # fmt: skip
    p.add_argument("--predictions", help="re-score this predictions.jsonl without loading a model")
    p.add_argument("--out", help="output folder (default: OUTPUT_DIR/eval, or PREDICTIONS_DIR/rescored)")
    p.add_argument(
        "--vae-path", help="big_vision's vae-oid.npz, to score referring segmentation by mask mIoU"
    )
    p.add_argument("--report-limit", type=int, default=200, help="samples shown per dataset and task")
    add_model_trust_arguments(p)
    p.set_defaults(func=_cmd_eval)


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="run a model on one image and prompt")
    p.add_argument("--model", required=True, help="adapter dir, merged model dir, hub id or tiny preset")
    p.add_argument("--image", required=True)
    p.add_argument(
        "--prompt", required=True, help='e.g. "caption en", "detect cat ; dog", "segment left cat"'
    )
    p.add_argument("--draw", help="write the image with the parsed boxes/masks drawn to this PNG")
    p.add_argument("--vae-path", help="big_vision's vae-oid.npz; without it masks are not decoded")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    add_model_trust_arguments(p)
    p.set_defaults(func=_cmd_predict)
