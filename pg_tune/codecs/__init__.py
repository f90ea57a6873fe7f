"""Codecs between PaliGemma's location/segmentation tokens and pixel boxes and masks.

``boxes`` is pure Python (``<locNNNN>``); ``masks`` needs torch (``<segNNN>`` via big_vision's VQ-VAE).
"""

from pg_tune.codecs.boxes import (
    MAX_LOC,
    NUM_SEG_TOKENS,
    Detection,
    coco_bbox_to_xyxy,
    decode_box,
    encode_box,
    encode_objects,
    loc_bins,
    parse_detections,
)

__all__ = [
    "MAX_LOC",
    "NUM_SEG_TOKENS",
    "Detection",
    "coco_bbox_to_xyxy",
    "decode_box",
    "encode_box",
    "encode_objects",
    "loc_bins",
    "parse_detections",
]
