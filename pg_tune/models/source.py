"""What a model folder may decide, and what only the person at the command line decides.

An adapter folder (or a whole run folder) travels: ``pg-tune push`` uploads it with its
``recipe.yaml``, people download each other's. So nothing in it may switch on code execution, and
the base it is loaded on is read from ``adapter_config.json`` (``base_model_name_or_path``, the
base it was trained on), printed, and compared with what the user named:

- ``trust_remote_code`` comes only from the ``--trust-remote-code`` flag; a recipe that sets
  ``model.trust_remote_code: true`` is refused (``ModelConfig.check``);
- ``adapter_base`` returns the adapter's base, and refuses one that differs from the recipe's
  ``model.name_or_path`` or the command line's ``--base``;
- ``require_safetensors`` refuses a local model folder whose weights are only pickles
  (``pytorch_model.bin``): pg_tune loads safetensors only, so that loading runs no code.
"""

from __future__ import annotations

import json
from pathlib import Path

from pg_tune.config.schema import ConfigError

REMOTE_CODE_FLAG = "--trust-remote-code"


def adapter_base(adapter_dir: str | Path, expected: str | None = None, expected_from: str = "--base") -> str:
    """The base model an adapter folder was trained on, checked against what the user named.

    ``expected`` is the base the user named (the recipe's ``model.name_or_path`` or ``--base``;
    ``expected_from`` says which, for the message). Equal names, or two local paths to the same
    folder, match; anything else is refused: an adapter only fits the base it was trained on.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_path}: cannot read the adapter's config ({e})") from None
    declared = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(declared, str) or not declared:
        raise ConfigError(
            f"{config_path}: base_model_name_or_path is missing, so the base this adapter was trained "
            "on is unknown; set it to that base's hub id or folder"
        )
    if expected is None or _same_model(declared, expected):
        return declared
    raise ConfigError(
        f"{adapter_dir} was trained on base {declared!r} ({config_path.name}: base_model_name_or_path), "
        f"but {expected_from} names {expected!r}. An adapter only fits the base it was trained on: "
        f"use {declared!r} (e.g. model.name_or_path={declared}), or, if {expected!r} holds the same "
        f"weights under another name or path, write that into {config_path}"
    )


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def require_safetensors(name_or_path: str) -> None:
    """Refuse a local model folder that holds pickled weights (``*.bin``) but no ``*.safetensors``."""
    folder = Path(name_or_path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if not pickles:
        return
    raise ConfigError(
        f"{folder}: has only pickled weights ({', '.join(pickles[:3])}{', ...' if len(pickles) > 3 else ''}); "
        "pg_tune loads safetensors only (loading a pickle can run code). If you trust the file, convert "
        'it once: python -c "from transformers import PaliGemmaForConditionalGeneration as M; '
        f"M.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}-safetensors')\" "
        "and copy the processor files (tokenizer*, *processor*config.json) beside the new weights"
    )
