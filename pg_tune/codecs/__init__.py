"""Codecs between PaliGemma's location/segmentation tokens and pixel boxes and masks.

``boxes`` is pure Python (``<locNNNN>``); ``masks`` needs torch (``<segNNN>`` via big_vision's
VQ-VAE), so its names are imported on first use: ``from pg_tune.codecs import encode_box`` never
loads torch, ``from pg_tune.codecs import MaskCodec`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pg_tune.codecs.boxes import (
    MAX_LOC,
    NUM_SEG_TOKENS,
    Detection,
    coco_bbox_to_xyxy,
    decode_box,
    encode_box,
    encode_objects,
    loc_bins,
    parse_detection_spans,
    parse_detections,
)

if TYPE_CHECKING:
    from pg_tune.codecs.masks import (
        VAE_NUM_BYTES,
        VAE_SHA256,
        VAE_URL,
        MaskCodec,
        MaskCodecUnavailableError,
        crop_mask_to_64,
        make_random_vae_weights,
        paste_mask_64,
        save_npz,
        vae_weight_shapes,
    )

_MASK_NAMES = {
    "VAE_NUM_BYTES",
    "VAE_SHA256",
    "VAE_URL",
    "MaskCodec",
    "MaskCodecUnavailableError",
    "crop_mask_to_64",
    "make_random_vae_weights",
    "paste_mask_64",
    "save_npz",
    "vae_weight_shapes",
}

__all__ = [
    "MAX_LOC",
    "NUM_SEG_TOKENS",
    "Detection",
    "coco_bbox_to_xyxy",
    "decode_box",
    "encode_box",
    "encode_objects",
    "loc_bins",
    "parse_detection_spans",
    "parse_detections",
    # from masks (torch), loaded on first use:
    "VAE_NUM_BYTES",
    "VAE_SHA256",
    "VAE_URL",
    "MaskCodec",
    "MaskCodecUnavailableError",
    "crop_mask_to_64",
    "make_random_vae_weights",
    "paste_mask_64",
    "save_npz",
    "vae_weight_shapes",
]


def __getattr__(name: str) -> Any:
    if name in _MASK_NAMES:
        return getattr(importlib.import_module("pg_tune.codecs.masks"), name)
    raise AttributeError(f"module 'pg_tune.codecs' has no attribute {name!r}")
