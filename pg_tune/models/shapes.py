"""Checkpoints with the exact shape of published models and random weights, written shard by shard.

What every family's real-shape presets share (PaliGemma: ``pg_tune.models.paligemma.shapes``;
SmolVLM2: ``pg_tune.models.chat.smolvlm_shapes``). The whole model never sits in memory: it is built
on the meta device, and each shard's tensors are materialised, initialised by transformers' own
``_init_weights`` (norm scales, linears and embeddings as the model class initialises them),
written and freed before the next shard. Peak memory is about one shard (``max_shard_size``, 2 GB as
the transformers conversion scripts save them) plus the largest single module. The folder is in the
hub's layout and loads with the model class's ``from_pretrained`` alone; the weights are random, for
measuring memory and speed at real size, never quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedModel


def _initialiser(model: PreTrainedModel, module_path: str) -> PreTrainedModel:
    """The innermost ``PreTrainedModel`` holding ``module_path``: its ``_init_weights`` knows the module."""
    owner, node = model, model
    for part in module_path.split(".") if module_path else []:
        node = getattr(node, part)
        if isinstance(node, PreTrainedModel):
            owner = node
    return owner


def _saved_names(model: PreTrainedModel) -> dict[str, str]:
    """Checkpoint key -> model parameter/buffer name, as ``save_pretrained`` would write them
    (tied weights once, transformers' legacy key names restored)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    by_id = {id(tensor): name for name, tensor in state.items()}
    saved = revert_weight_conversion(model, dict(state))
    return {key: by_id[id(tensor)] for key, tensor in saved.items()}


def _release(module: torch.nn.Module | None) -> None:
    """Give a materialised module's own tensors back to the meta device (children untouched)."""
    if module is None:
        return
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(
            name, torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        )
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None:
            module._buffers[name] = buffer.to("meta")


def parse_size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_random_checkpoint(
    model_class: type[PreTrainedModel],
    config: Any,
    processor: Any,
    out_dir: str | Path,
    generation_config: GenerationConfig,
    max_shard_size: str = "2GB",
    seed: int = 0,
) -> dict[str, Any]:
    """Write a random-weight bf16 checkpoint of ``config`` shard by shard, with its config, generation
    config and ``processor``'s files; return the index written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    with torch.device("meta"):
        model = model_class(config).to(torch.bfloat16)
    names = _saved_names(model)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(names):
        tensor = model.get_parameter_or_buffer(names[key])
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    torch.manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, keys in enumerate(shards):
        filename = (
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        )
        tensors = {}
        live = None  # the one module with real storage (a weight and its bias are adjacent keys)
        for key in keys:
            module_path, _, leaf = names[key].rpartition(".")
            module = model.get_submodule(module_path)
            if module is not live:
                _release(live)
                module.to_empty(device="cpu", recurse=False)
                _initialiser(model, module_path)._init_weights(module)
                live = module
            tensors[key] = getattr(module, leaf).detach().to(torch.bfloat16).clone()
            total += tensors[key].numel() * tensors[key].element_size()
            weight_map[key] = filename
        _release(live)
        save_file(tensors, out_dir / filename, metadata={"format": "pt"})
        print(
            f"wrote {filename}: {len(keys)} tensors, {sum(t.numel() for t in tensors.values()):,} parameters"
        )
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(shards) > 1:  # as save_pretrained: a single shard has no index
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = [model_class.__name__]
    config.save_pretrained(out_dir)
    generation_config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return index
