"""``pg-tune serve MODEL [--host 127.0.0.1] [--port 8000]``: the model behind an OpenAI-compatible API
and a web playground (``pg_tune.serve``).

MODEL is a training run folder, an adapter folder, a merged export, a full / partial run's
``model/``, a hub id or a tiny preset. The model family is resolved once here and passed on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pg_tune.cli.args import add_model_trust_arguments

MB = 2**20


def _cmd_serve(args: argparse.Namespace) -> int:
    from pg_tune.evaluate.run import load_for_eval
    from pg_tune.export.run import ExportError
    from pg_tune.models.family import load_family
    from pg_tune.serve.app import ServeSettings, build_app
    from pg_tune.serve.batcher import Batcher
    from pg_tune.serve.engine import Engine, resolve_model
    from pg_tune.serve.images import ImagePolicy
    from pg_tune.serve.requests import Limits
    from pg_tune.serve.server import api_key_from, bound_socket, check_exposure, make_server

    _log_to_stderr(args.log_level)
    try:
        api_key = api_key_from(args.api_key)
        check_exposure(args.host, api_key)  # before anything heavy loads
        images_dir = Path(args.images_dir) if args.images_dir else None
        if images_dir is not None and not images_dir.is_dir():
            raise ValueError(f"--images-dir {images_dir}: no such folder")
        limits = Limits(
            max_body_bytes=int(args.max_body_mb * MB),
            max_image_bytes=int(args.max_image_mb * MB),
            max_image_pixels=args.max_image_pixels,
            max_tokens=args.max_tokens,
        )
        served = resolve_model(args.model, args.served_model_name)
        vae_path = args.vae_path or (served.recipe.model.vae_path if served.recipe is not None else None)
        family = load_family(served.ref, vae_path)
        loaded = load_for_eval(
            served.ref, family, served.recipe, device=args.device,
            trust_remote_code=args.trust_remote_code, base=args.base,
        )  # fmt: skip
        engine = Engine(loaded.model, loaded.processor, family, args.max_prompt_tokens)
        batcher = Batcher(engine.run, args.max_batch, args.max_wait_ms / 1000, args.max_queue)
        settings = ServeSettings(
            served.name,
            limits,
            ImagePolicy(images_dir, args.allow_remote_images),
            api_key,
            args.request_timeout,
        )
        app = build_app(engine, batcher, settings)
        sock = bound_socket(args.host, args.port)
    except (OSError, ValueError, ExportError) as e:
        print(f"pg-tune serve: error: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(
        f"serving {served.name} ({family.name}: {loaded.description}) at http://{where}:{port}\n"
        f"  playground: http://{where}:{port}/   OpenAI API: http://{where}:{port}/v1   "
        f"API key: {'required' if api_key else 'none (loopback only)'}\n"
        f"  batching: up to {args.max_batch} requests, waiting up to {args.max_wait_ms:g} ms; "
        f"queue {args.max_queue}; timeout {args.request_timeout:g} s",
        flush=True,
    )
    make_server(app, host, port, args.request_timeout, args.log_level).run(sockets=[sock])
    return 0


def _log_to_stderr(level: str) -> None:
    logger = logging.getLogger("pg_tune.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a web playground"
    )
    p.add_argument(
        "model",
        help="a training run folder, adapter folder, merged export, full/partial run's model/, hub id or tiny preset",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; beyond loopback an API key is required"
    )
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start)")
    p.add_argument(
        "--api-key",
        help="clients must send 'Authorization: Bearer KEY'; prefer the PG_TUNE_API_KEY environment variable "
        "(a command line shows in ps)",
    )
    p.add_argument(
        "--served-model-name", help="the model id clients name (default: MODEL's folder name or id)"
    )
    p.add_argument(
        "--vae-path", help="big_vision's vae-oid.npz, to decode masks (default: a run's model.vae_path)"
    )
    p.add_argument(
        "--images-dir", help="let clients name image files under this folder (file:// or relative paths)"
    )
    p.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: the server would "
        "fetch any address a client names)",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond it get 429")
    p.add_argument("--max-tokens", type=int, default=256, help="default and largest max_tokens of a request")
    p.add_argument(
        "--max-prompt-tokens", type=int, default=512, help="prompt text tokens (image tokens not counted)"
    )
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="encoded image limit")
    p.add_argument(
        "--max-image-pixels", type=int, default=8192 * 8192,
        help="width x height limit, read from the image header before decoding",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds from arrival to answer (504 after)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_model_trust_arguments(p)
    p.set_defaults(func=_cmd_serve)
