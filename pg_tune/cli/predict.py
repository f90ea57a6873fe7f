"""``pg-tune predict --model DIR|ID --image PATH --prompt "detect cat" [--draw out.png] [--vae-path vae-oid.npz]``:
print the raw generated text and the parsed boxes/masks as JSON (``pg_tune.evaluate.predict``)."""

from __future__ import annotations

import argparse
import json
import sys

from pg_tune.cli.args import add_model_trust_arguments
from pg_tune.config import ConfigError
from pg_tune.data.sample import DataError


def _cmd_predict(args: argparse.Namespace) -> int:
    try:
        from pg_tune.evaluate.predict import predict_one
        from pg_tune.models.family import load_family

        family = load_family(args.model, args.vae_path)
        result = predict_one(
            args.model, family, args.image, args.prompt, args.task, args.max_new_tokens, args.num_beams,
            args.draw, trust_remote_code=args.trust_remote_code, base=args.base,
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a model on one image and prompt")
    p.add_argument("--model", required=True, help="adapter dir, merged model dir, hub id or tiny preset")
    p.add_argument("--image", required=True)
    p.add_argument(
        "--prompt", required=True, help='e.g. "caption en", "detect cat ; dog", "segment left cat"'
    )
    p.add_argument(
        "--task",
        help="how to read the answer (detect, refer_detect, refer_segment, caption, vqa, docvqa, ocr); "
        "default: from the prompt (detect ..., segment ..., else text)",
    )
    p.add_argument("--draw", help="write the image with the parsed boxes/masks drawn to this PNG")
    p.add_argument("--vae-path", help="big_vision's vae-oid.npz; without it masks are not decoded")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    add_model_trust_arguments(p)
    p.set_defaults(func=_cmd_predict)
