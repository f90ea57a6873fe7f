"""What FSDP shards one by one: the model family's decoder and vision layers.

``recipes/accelerate/fsdp.yaml`` picks the transformer-based wrap policy but names no layer class:
the classes come from the model family (``ModelFamily.layer_classes``), so one launch config serves
every family. Accelerate would otherwise read ``_no_split_modules`` from the module it prepares,
which is pg_tune's ``SuffixLoss`` wrapper (it has none): the whole model would be one FSDP unit.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from pg_tune.models.family import ModelFamily


def wrap_family_layers(accelerator: Accelerator, model: nn.Module, family: ModelFamily) -> list[str] | None:
    """Under FSDP, when the launch config names no classes to wrap, name the family's layer classes
    (before ``accelerator.prepare``); returns them, or None when nothing was set."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != DistributedType.FSDP or plugin is None:
        return None
    if plugin.transformer_cls_names_to_wrap:  # the launch config chose them
        return None
    plugin.transformer_cls_names_to_wrap = family.layer_classes(family.unwrap(model))
    return plugin.transformer_cls_names_to_wrap
