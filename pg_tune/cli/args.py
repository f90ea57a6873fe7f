"""Command-line arguments several subcommands share."""

from __future__ import annotations

import argparse


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
