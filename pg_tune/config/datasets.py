"""Each dataset format's recipe keys: the options of one ``data.train`` / ``data.eval`` entry.

A format is a builder in ``pg_tune/data/formats/<name>.py`` and its options here, so that a recipe
is validated (unknown keys, wrong types, a misspelt format) before anything of ``pg_tune.data`` is
imported; ``FORMAT_OPTIONS`` maps each format name a recipe may give to its options. The keys are
documented for users in ``data_formats/<name>.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pg_tune.config.schema import ConfigError

# ---- coco_captions -------------------------------------------------------------------------------


@dataclass
class CocoCaptionsOptions:
    annotations: str
    """``captions_*.json`` (COCO format: ``images`` and ``annotations`` with ``caption``)."""
    images: str
    """Folder holding the images' ``file_name``s."""
    prompt: str = "caption en"
    train_pairs: Literal["every_caption", "one_per_image"] = "every_caption"
    """``every_caption``: each caption is a training pair (an epoch sees each image ~5 times);
    ``one_per_image``: a random caption of each image per epoch."""
    limit: int | None = None
    """Use at most this many images (in file order)."""


# ---- coco_detection ------------------------------------------------------------------------------


@dataclass
class CocoDetectionOptions:
    annotations: str
    """``instances_*.json`` (COCO format)."""
    images: str
    """Folder holding the images' ``file_name``s."""
    prompt: str = "detect {classes}"
    """``{classes}`` becomes the class names joined with `` ; ``."""
    classes: list[str] | None = None
    """Only these category names (others are left out of prompts and targets); default: all."""
    prompt_classes: Literal["present", "all"] = "present"
    """``present``: name the classes in the image; ``all``: name every class (absent ones too)."""
    crowd: Literal["skip", "keep"] = "skip"
    """COCO ``iscrowd=1`` boxes cover a group of objects; ``skip`` leaves them out of the target but
    keeps them as crowd ground truth for scoring (``meta["crowd"]``: COCOeval ignores matches to them);
    ``keep`` writes them into the target as ordinary objects."""
    order: Literal["file", "left_to_right", "largest_first", "random"] = "file"
    """Object order in the suffix; ``random`` is seeded by the recipe seed and the image id."""
    max_objects: int | None = None
    """Keep at most this many objects per image (after ordering)."""
    keep_empty: bool = False
    """Keep images with no (selected) object, with an empty target; only valid for evaluation."""
    limit: int | None = None


# ---- docvqa --------------------------------------------------------------------------------------


@dataclass
class DocvqaOptions:
    annotations: str
    """SP-DocVQA ``train_v1.0.json`` / ``val_v1.0.json`` / ``test_v1.0.json``."""
    images: str
    """Root the records' ``image`` paths (``documents/x.png``) are relative to."""
    prompt: str = "answer en {question}"
    """Template with ``{question}``; ``"{question}"`` is big_vision's transfer prompt."""
    limit: int | None = None


# ---- hf ------------------------------------------------------------------------------------------


@dataclass
class HfOptions:
    path: str
    """A ``save_to_disk`` folder, or a parquet file / glob."""
    split: str | None = None
    """Split of a saved ``DatasetDict`` (parquet: ignored)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Contract field -> column, for any that differ: ``image``, ``prefix``, ``suffix``."""
    prompt: str | None = None
    """A prefix template filled from the row's columns (``"answer en {question}"``); replaces the
    prefix column."""
    image_root: str | None = None
    """Folder that string image paths are relative to."""
    task: str = "caption"
    limit: int | None = None
    name: str | None = None
    """Configuration of a Hub dataset / repository folder (``load_dataset``'s ``name``)."""
    revision: str | None = None
    """Branch, tag or commit of a Hub dataset."""
    streaming: bool = False
    """Read the rows as a stream instead of converting the dataset first: for sets too large for
    the disk or RAM. Training only (an eval entry reads its first ``limit`` rows)."""
    shuffle_buffer: int = 1000
    """Streaming: rows held to shuffle the stream (plus a seeded shard order). Larger shuffles
    better and holds more rows (encoded) in RAM; 0 or 1 keeps the stream order."""
    num_rows: int | None = None
    """Streaming: rows in the split, when its files do not say (JSON/CSV shards; parquet footers
    and the Hub's dataset info are read automatically). An epoch is sized from it."""

    def check(self, path: str) -> None:
        if self.streaming and is_saved_dataset(Path(self.path)):
            raise ConfigError(
                f"{path}.streaming: {self.path} is a save_to_disk folder, memory-mapped already; drop "
                "streaming: true (streaming is for dataset ids, repository folders and parquet files)"
            )
        if self.shuffle_buffer < 0:
            raise ConfigError(f"{path}.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.num_rows is not None and self.num_rows < 1:
            raise ConfigError(f"{path}.num_rows: must be >= 1, got {self.num_rows}")


def is_saved_dataset(path: Path) -> bool:
    """A ``datasets`` ``save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


# ---- jsonl ---------------------------------------------------------------------------------------


@dataclass
class JsonlOptions:
    path: str
    image_root: str | None = None
    """Folder image paths are relative to; default: the JSONL file's folder."""
    task: str = "caption"
    """Metric family for rows without a ``task`` key (caption, vqa, docvqa, detect, ...)."""
    limit: int | None = None


# ---- refcoco -------------------------------------------------------------------------------------


@dataclass
class RefcocoOptions:
    split: str
    """Which refs to use: ``train``, ``val``, ``testA``, ``testB`` (unc) or ``test`` (umd)."""
    task: Literal["detect", "segment"] = "detect"
    refs: str | list[str] | None = None
    """``refs(unc).p`` / ``refs(google).p`` / ``refs(umd).p`` (read safely, see the module docstring),
    or several, read as one set (big_vision's combined RefCOCO/+/g: see the module docstring)."""
    instances: str | list[str] | None = None
    """The matching COCO ``instances.json`` (boxes, masks, image sizes): one, or one per refs file."""
    images: str | None = None
    """Folder of COCO train2014 images (or the parquet's image paths' root)."""
    parquet: str | None = None
    """Instead of refs + instances: a parquet file (or a glob) with one row per ref or sentence."""
    columns: dict[str, str] = field(default_factory=dict)
    """Parquet column names, for any that differ from: image, box, expression, split, segmentation,
    width, height. ``expression`` may hold a string or a list of strings."""
    prompt: str | None = None
    """Template with ``{expression}``; default ``detect {expression}`` / ``segment {expression}``."""
    sentence: Literal["sent", "raw"] = "sent"
    """Which text of a refer sentence: the cleaned lower-case ``sent`` or the annotator's ``raw``."""
    train_pairs: Literal["one_per_image", "every_sentence"] = "one_per_image"
    """Training rows per epoch: one object and one of its sentences per image (big_vision), or all."""
    limit: int | None = None


# ---- shapes --------------------------------------------------------------------------------------


@dataclass
class ShapesOptions:
    num_samples: int = 480
    image_size: int = 112
    prompt: str = "caption en"
    seed: int | None = None
    """Default: 0 for train, 1 for eval, so the splits never share an image."""
    limit: int | None = None
    """At most this many samples (as in every format); the first ``limit`` of ``num_samples``."""


FORMAT_OPTIONS: dict[str, type] = {
    "coco_captions": CocoCaptionsOptions,
    "coco_detection": CocoDetectionOptions,
    "docvqa": DocvqaOptions,
    "hf": HfOptions,
    "jsonl": JsonlOptions,
    "refcoco": RefcocoOptions,
    "shapes": ShapesOptions,
}
