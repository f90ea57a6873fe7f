"""Streaming merge: a run's LoRA adapter folded into the base checkpoint one shard at a time.

``pg-tune export RUN_DIR --out DIR`` (the default ``--parity module``) never builds the model. For
each safetensors shard of the base checkpoint it reads the tensors one by one, folds the LoRA
update of every adapted linear into its weight in fp32 (``W' = W + s·B·A``; DoRA rescales each row
to the trained magnitude), casts to the export dtype and appends it to the output shard, whose
header (every tensor's dtype and shape) is written first. Files are read with plain reads, not
memory-mapped (a mapping would keep every page read in the process's RSS; ``pg_tune.models.shards``). Peak memory is about
the largest single tensor (the embedding table) plus the adapter, whatever the size of the model
(measured at the PaliGemma 2 3B shape in docs/performance.md, "Real shapes").

The merge is always into the full-precision checkpoint on disk, also for QLoRA runs: merging into
4-bit weights would round the update into the quantization grid.

Parity is checked per merged module, before its shard is written: on random inputs ``x`` the
merged ``W'x`` must equal ``Wx + s·B(Ax)`` (both fp32) within ``MODULE_PARITY_REL`` × the largest
|output| (only the summation order differs). A module whose adapter moves its output by less than
that tolerance cannot be checked this way; the report counts them. ``--parity full`` keeps the
whole-model logit comparison of ``pg_tune.export.merged`` for models that fit in memory.

The output folder is written as ``OUT.partial`` (marked as pg_tune's and locked:
``pg_tune.export.staging``) and renamed at the end: a failed check leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pg_tune.export.model_card import build_model_card
from pg_tune.export.run import REPORT_NAME
from pg_tune.export.serving import write_serving_files
from pg_tune.export.staging import StagedExport
from pg_tune.models import shards
from pg_tune.models.shards import ShardReader

FP32_EPS = torch.finfo(torch.float32).eps
MODULE_PARITY_ROWS = 4
"""Random input rows per merged module."""


def module_parity_rel(in_features: int) -> float:
    """Allowed |W'x - (Wx + s·B(Ax))| relative to max |Wx + s·B(Ax)|.

    fp32 dot products of K terms taken in another order differ by about sqrt(K)·eps of their
    scale; 16x that leaves room for any BLAS kernel while a wrong merge (a missing or doubled
    update: errors the size of the update itself) still fails.
    """
    return 16 * math.sqrt(in_features) * FP32_EPS


class MergeError(RuntimeError):
    """The adapter does not fit the checkpoint, or a merged module fails its parity check."""


@dataclass
class LoraUpdate:
    """One adapted linear: ``W' = W + scale·B·A`` (and DoRA's per-row ``magnitude`` if set)."""

    lora_a: torch.Tensor  # [r, in] fp32
    lora_b: torch.Tensor  # [out, r] fp32
    scale: float
    magnitude: torch.Tensor | None = None  # [out] fp32, DoRA

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)

    def expected(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The unmerged module's output on ``x`` [rows, in] (peft's forward, fp32)."""
        out = x @ weight.T + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)
        if self.magnitude is not None:
            norm = (weight + self.delta()).norm(dim=1)
            out = out * (self.magnitude / norm)
        return out


@dataclass
class Adapter:
    """An adapter folder read for merging: LoRA updates by model parameter name, full replacements."""

    updates: dict[str, LoraUpdate]
    """``model.language_model.layers.0.self_attn.q_proj.weight`` -> its update."""
    replacements: dict[str, torch.Tensor]
    """``modules_to_save`` parameters, trained in full: they replace the base's."""
    config: dict[str, Any]


_PEFT_PREFIX = "base_model.model."


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's layout)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {config.get('peft_type')!r}; only LoRA adapters merge")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            name = key.removeprefix(_PEFT_PREFIX)
            match = re.fullmatch(
                r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_magnitude_vector)(?:\.weight)?", name
            )
            if match:
                module = match.group(1) or match.group(3)
                parts.setdefault(module, {})[match.group(2) or match.group(4)] = f.get_tensor(key).float()
            elif ".lora_" in name:
                raise MergeError(f"{adapter_dir}: adapter tensor {key} is not a LoRA A/B/magnitude weight")
            else:
                replacements[name] = f.get_tensor(key)
    updates = {}
    for module, tensors in parts.items():
        if "lora_A" not in tensors or "lora_B" not in tensors:
            raise MergeError(f"{adapter_dir}: {module} has {sorted(tensors)} but needs lora_A and lora_B")
        rank = tensors["lora_A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        rank = _pattern_value(config.get("rank_pattern") or {}, module, rank)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        updates[module + ".weight"] = LoraUpdate(
            tensors["lora_A"], tensors["lora_B"], scale, tensors.get("lora_magnitude_vector")
        )
    return Adapter(updates, replacements, config)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha patterns: the first key matching the end of the module name wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def merge_weight(weight: torch.Tensor, update: LoraUpdate) -> torch.Tensor:
    """``W + s·B·A`` in fp32 (DoRA: each row rescaled to the trained magnitude)."""
    merged = weight.float() + update.delta()
    if update.magnitude is not None:
        merged = merged * (update.magnitude / merged.norm(dim=1)).unsqueeze(1)
    return merged


def module_parity(
    weight: torch.Tensor, merged: torch.Tensor, update: LoraUpdate, generator: torch.Generator
) -> dict[str, float]:
    """Merged ``W'x`` vs ``Wx + s·B(Ax)`` on random rows, fp32; also how far the update moves ``Wx``."""
    x = torch.randn(MODULE_PARITY_ROWS, weight.shape[1], generator=generator)
    weight = weight.float()
    expected = update.expected(weight, x)
    scale = float(expected.abs().max())
    return {
        "max_abs_diff": float((x @ merged.T - expected).abs().max()),
        "scale": scale,
        "tolerance": module_parity_rel(weight.shape[1]) * scale,
        "update_effect": float((expected - x @ weight.T).abs().max()),
    }


def checkpoint_files(folder: Path) -> list[str]:
    """The safetensors shards of a checkpoint folder, in index order."""
    try:
        return shards.checkpoint_files(folder)
    except shards.CheckpointLayoutError as e:
        raise MergeError(
            f"{e}; the streaming merge reads safetensors checkpoints only (use --parity full)"
        ) from None


def key_resolver(folder: Path, family) -> Callable[[str], str]:
    """Checkpoint key -> model parameter name, exactly as ``from_pretrained`` renames on load.

    PaliGemma checkpoints keep transformers' legacy names (``language_model.model.layers...``)
    while the model and the adapter say ``model.language_model.layers...``. The model is the
    family's own class (built on the meta device), so a family transformers' Auto classes do not
    know exports alike.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    config = family.model_class.config_class.from_pretrained(folder)
    with torch.device("meta"):
        model = family.model_class(config)
    transforms = get_model_conversion_mapping(model, add_legacy=True) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    if converters:
        raise MergeError(
            f"{folder}: {type(model).__name__} checkpoints are converted on load (not only renamed); "
            "use --parity full"
        )
    meta_state = model.state_dict()

    def resolve(key: str) -> str:
        return rename_source_key(key, renamings, [], model.base_model_prefix, meta_state)[0]

    return resolve


def base_checkpoint(family, name_or_path: str, revision: str | None, scratch: Path) -> Path:
    """The base's folder on disk: a local folder, the hub cache's snapshot, or a tiny preset of
    ``family`` saved to ``scratch`` (built-in presets have no files)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    if family.is_tiny(name_or_path):
        return family.save_tiny(name_or_path, scratch / "base")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    )


class ShardWriter:
    """A safetensors file written tensor by tensor: the header first (every tensor's dtype and
    shape are known before the merge), then each tensor's bytes as soon as it is ready, so no
    output shard is ever held in memory."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, list[int]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._expected = []
        for key, dtype, shape in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {
                "dtype": shards.ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((key, dtype, list(shape)))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(len(text).to_bytes(8, "little") + text)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape = self._expected[self._next]
        if key != want_key or tensor.dtype != dtype or list(tensor.shape) != shape:
            raise MergeError(
                f"internal: wrote {key} {tensor.dtype} {list(tensor.shape)}, header says {want_key} {dtype} {shape}"
            )
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> None:
        self._file.close()
        if self._next != len(self._expected):
            raise MergeError(f"internal: {len(self._expected) - self._next} tensors left unwritten")

    def close(self) -> None:
        self._file.close()


def stream_merge(
    base_dir: Path,
    adapter: Adapter,
    out_dir: Path,
    dtype: torch.dtype,
    family,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Merge ``adapter`` into ``base_dir``'s shards (a checkpoint of ``family``), writing ``out_dir``
    shard by shard.

    Returns the per-module parity summary; raises ``MergeError`` before writing a shard that fails.
    Writes weights, the index and ``config.json`` / ``generation_config.json``; the caller adds
    processor files and the model card.
    """
    resolve = key_resolver(base_dir, family)
    files = checkpoint_files(base_dir)
    generator = torch.Generator().manual_seed(seed)
    pending_updates = dict(adapter.updates)
    pending_replacements = dict(adapter.replacements)
    weight_map: dict[str, str] = {}
    total_size = 0
    checked: list[dict[str, Any]] = []
    cast_worst = {"module": None, "rel": 0.0}
    for filename in files:
        reader = ShardReader(base_dir / filename)
        layout = [(k, dtype if d.is_floating_point else d, shape) for k, d, shape in reader.layout()]
        writer = ShardWriter(out_dir / filename, layout)
        try:
            for key, out_dtype, shape in layout:
                name = resolve(key)
                tensor = reader.read(key)
                if name in pending_replacements:
                    tensor = pending_replacements.pop(name)
                    if list(tensor.shape) != shape:
                        raise MergeError(
                            f"{name}: the adapter's trained copy is {list(tensor.shape)} but {filename} holds {shape}"
                        )
                if name in pending_updates:
                    update = pending_updates.pop(name)
                    want = (update.lora_b.shape[0], update.lora_a.shape[1])
                    if tuple(tensor.shape) != want:
                        raise MergeError(
                            f"{name}: the adapter's update is {list(want)} but {filename} holds "
                            f"{list(tensor.shape)}: the adapter was trained on another base"
                        )
                    merged = merge_weight(tensor, update)
                    parity = module_parity(tensor, merged, update, generator)
                    parity["module"] = name.removesuffix(".weight")
                    if not parity["max_abs_diff"] <= parity["tolerance"]:
                        raise MergeError(
                            f"{parity['module']}: merged output differs from base + adapter by "
                            f"{parity['max_abs_diff']:.3g} > tolerance {parity['tolerance']:.3g} (output scale "
                            f"{parity['scale']:.3g}); nothing was written"
                        )
                    checked.append(parity)
                    tensor = merged.to(dtype)
                    if dtype != torch.float32:
                        x = torch.randn(MODULE_PARITY_ROWS, merged.shape[1], generator=generator)
                        exact = x @ merged.T
                        rel = float((x @ tensor.float().T - exact).abs().max() / exact.abs().max())
                        if rel > cast_worst["rel"]:
                            cast_worst = {"module": parity["module"], "rel": rel}
                    del merged
                else:
                    tensor = tensor.to(out_dtype)
                writer.write(key, tensor)
                weight_map[key] = filename
                total_size += tensor.numel() * tensor.element_size()
                del tensor
            writer.finish()
        finally:
            reader.close()
            writer.close()
        say(f"merge: {filename}: {len(layout)} tensors written")
    unused = sorted(pending_updates) + sorted(pending_replacements)
    if unused:
        raise MergeError(
            f"{len(unused)} adapter weights match no tensor of {base_dir} (first: {unused[0]}): the adapter "
            "was trained on another base, or the checkpoint layout is not PaliGemma's"
        )
    if len(files) > 1 or files != ["model.safetensors"]:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out_dir / "generation_config.json")
    worst = max(checked, key=lambda p: p["max_abs_diff"] / max(p["tolerance"], 1e-30), default=None)
    checkable = [p for p in checked if p["update_effect"] > p["tolerance"]]
    return {
        "modules_merged": len(checked),
        "modules_checkable": len(checkable),
        "replaced": sorted(adapter.replacements),
        "worst": worst,
        "min_update_effect_over_tolerance": min(
            (p["update_effect"] / max(p["tolerance"], 1e-30) for p in checked), default=None
        ),
        "cast_worst_rel": cast_worst if dtype != torch.float32 else None,
        "shards": len(files),
        "bytes_written": total_size,
    }


def stream_export(run, out_dir: str | Path, dtype_name: str, dtype: torch.dtype, family) -> dict[str, Any]:
    """``pg-tune export`` with per-module parity: the merged folder, processor files, report, card.

    ``run`` is a ``pg_tune.export.run.Run``. Returns the report written to ``export_report.json``.
    """
    staging = StagedExport(out_dir)  # OUT.partial, marked as pg_tune's and locked (pg_tune.export.staging)
    out_dir, partial = staging.out_dir, staging.path
    try:
        with tempfile.TemporaryDirectory(prefix="pg_tune_merge_") as scratch:
            base_dir = base_checkpoint(
                family, run.recipe.model.name_or_path, run.recipe.model.revision, Path(scratch)
            )
            adapter = read_adapter(run.adapter_dir)
            modules = stream_merge(base_dir, adapter, partial, dtype, family, seed=run.recipe.train.seed)
        processor_source = dataclasses.replace(run.recipe.model, name_or_path=str(run.adapter_dir))
        processor = family.load_processor(processor_source)
        processor.save_pretrained(partial)
        write_serving_files(partial, family, processor)
        worst = modules["worst"]
        if worst:
            print(
                f"parity (per module, merged W'x vs Wx + s·B(Ax), fp32): {modules['modules_merged']} modules OK; "
                f"worst {worst['module']}: {worst['max_abs_diff']:.3g} (tolerance {worst['tolerance']:.3g})"
            )
            print(
                f"parity: {modules['modules_checkable']} of {modules['modules_merged']} updates move their "
                "module's output beyond the tolerance (the others are too small to check this way)"
            )
        if modules["cast_worst_rel"]:
            c = modules["cast_worst_rel"]
            print(f"cast to {dtype_name}: worst relative output change {c['rel']:.3g} ({c['module']})")
        report: dict[str, Any] = {"dtype": dtype_name, "parity": "module", "parity_modules": modules}
        if run.recipe.quantization.mode != "none":
            report["quantization"] = run.recipe.quantization.mode
            print(
                f"note: trained on a {run.recipe.quantization.mode} base; merged into the full-precision "
                "checkpoint (run with --parity full to measure the gap to the quantized model)"
            )
        (partial / REPORT_NAME).write_text(json.dumps(report, indent=2))
        (partial / "README.md").write_text(build_model_card(run, family, kind="merged", export_report=report))
        staging.finish()
    except BaseException as e:
        staging.discard(e)
        raise
    print(f"exported to {out_dir}")
    return report
