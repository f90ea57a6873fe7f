"""Hugging Face ``datasets``: a dataset saved with ``save_to_disk``, or parquet files.

One raw row (columns are yours; map them to the contract)::

    {"image": <PIL.Image or {"bytes": ..., "path": ...} or "imgs/1.jpg">,
     "question": "what is written?", "answers": ["STOP", "stop"]}

Rows are read on demand from the memory-mapped Arrow table: building the dataset decodes no image,
and ``samples[i]`` decodes only row ``i``'s image, so a large set never sits in RAM. ``suffix`` may
be a string or a list of strings (the first is the training target, all are references).
Selected in a recipe by::

    data:
      train:
        - format: hf
          path: data/my_vqa          # a save_to_disk folder; or data/train-*.parquet
          split: train               # for a DatasetDict
          prompt: "answer en {question}"
          columns: {suffix: answers}
          task: vqa
"""

from __future__ import annotations

import glob
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pg_tune.data.bad_rows import data_error, reason_of
from pg_tune.data.formats import BuildContext
from pg_tune.data.formats._common import format_prompt
from pg_tune.data.sample import DataError, LazySamples, Sample

_CONTRACT = ("image", "prefix", "suffix")


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


def _load(options: HfOptions):
    import datasets

    path = Path(options.path)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a save_to_disk dataset folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if options.split not in ds:
                raise DataError(f"{path}: set split to one of {sorted(ds)} (got {options.split!r})")
            ds = ds[options.split]
        return ds
    files = sorted(glob.glob(options.path))
    if not files:
        raise DataError(f"{options.path}: no such save_to_disk folder or parquet file")
    return datasets.Dataset.from_parquet(files)  # memory-mapped Arrow cache, not a RAM copy


class HfSamples(LazySamples):
    """A lazy view: ``Sample``s made per row on access from the memory-mapped dataset."""

    def __init__(self, ds, options: HfOptions, where: str, ctx: BuildContext | None = None):
        import datasets

        self.options = options
        self.where = where
        self.col = {name: options.columns.get(name, name) for name in _CONTRACT}
        unknown = sorted(set(options.columns) - set(_CONTRACT))
        if unknown:
            raise DataError(f"{where}: columns has unknown keys {unknown} (known: {', '.join(_CONTRACT)})")
        needed = [self.col["image"], self.col["suffix"]] + ([] if options.prompt else [self.col["prefix"]])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{where}: missing columns {missing} (have {ds.column_names}); map them with columns:"
            )
        feature = ds.features.get(self.col["image"])
        if isinstance(feature, datasets.Image) and feature.decode:
            # Keep the encoded bytes: decoding happens per row, in __getitem__.
            ds = ds.cast_column(self.col["image"], datasets.Image(decode=False))
        self.ds = ds
        self.root = Path(options.image_root) if options.image_root else None
        self.train = ctx is not None and ctx.split == "train"
        # Table rows behind the samples: every row, or (with a BuildContext) the rows whose text and
        # image reference pass the build-time scan, so bad rows are skipped or stop the build like
        # in the eager formats. ``limit`` then caps emitted samples, as in every format.
        rows = range(len(ds)) if ctx is None else scan_rows(self, ctx)
        self.rows = rows[: options.limit] if options.limit is not None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, index: int) -> Sample:
        row = self.rows[index]
        return self.row_to_sample(self.ds[row], row)

    def row_to_sample(self, row: dict[str, Any], index: int) -> Sample:
        where = f"{self.where}[{index}]"
        prefix, suffix, references = self.text_fields(row, where)
        return Sample(
            self._image(row[self.col["image"]], where), prefix, suffix, where, self.options.task, references
        )

    def text_fields(self, row: dict[str, Any], where: str) -> tuple[str, str, tuple[str, ...]]:
        """(prefix, suffix, references) of one row; raises ``DataError`` naming the row and column."""
        suffix = row[self.col["suffix"]]
        references: tuple[str, ...] = ()
        if isinstance(suffix, list):
            references = tuple(str(s) for s in suffix)
            suffix = references[0] if references else ""
        if not isinstance(suffix, str):
            raise DataError(f"{where}: column {self.col['suffix']!r} must hold a string or list of strings")
        if self.options.prompt:
            fields = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
            prefix = format_prompt(self.options.prompt, where, **fields)
        else:
            prefix = row[self.col["prefix"]]
            if not isinstance(prefix, str):
                raise DataError(f"{where}: column {self.col['prefix']!r} must hold a string")
        if self.train and not suffix.strip():
            raise data_error("empty_suffix", f"{where}: empty suffix: nothing to learn from this row")
        return prefix, suffix, references

    def _image(self, value: Any, where: str) -> str | Path | Image.Image:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            # Only the header is read here (pixels decode in the collator, where a truncated image is
            # a counted bad row); bytes that are no image at all fail now, inside __getitem__, and
            # SafeSampleDataset counts them the same way.
            try:
                return Image.open(io.BytesIO(value["bytes"]))
            except (OSError, SyntaxError, ValueError) as e:
                raise data_error("corrupt_image", f"{where}: the image bytes are not an image: {e}") from None
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str):
            raise DataError(
                f"{where}: column {self.col['image']!r} holds no image (got {type(value).__name__})"
            )
        return self.root / path if self.root is not None else Path(path)


def scan_rows(view: HfSamples, ctx: BuildContext, batch_size: int = 1024) -> list[int]:
    """Rows whose text fields are valid and whose image cell is set, reading no image bytes.

    A bad row goes to ``ctx.bad_rows`` (``stop`` raises naming it, ``skip`` counts it), exactly as
    the eager formats do at build time; image bytes that fail to decode can only show up when the
    row is read, and ``pg_tune.data.safe_collate.SafeSampleDataset`` counts those the same way.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    image_col = view.col["image"]
    cells = view.ds.data.column(image_col)
    if pa.types.is_struct(cells.type):
        fields = [cells.combine_chunks().field(name) for name in ("bytes", "path")]
        missing = pc.and_(pc.is_null(fields[0]), pc.is_null(fields[1]))
        missing = pc.or_(missing, pc.is_null(cells.combine_chunks()))
    else:
        missing = pc.is_null(cells)
    missing = missing.to_pylist()
    text = view.ds.select_columns([c for c in view.ds.column_names if c != image_col])
    keep: list[int] = []
    for start in range(0, len(text), batch_size):
        batch = text[start : start + batch_size]
        for offset in range(len(next(iter(batch.values()))) if batch else 0):
            index = start + offset
            where = f"{view.where}[{index}]"
            if missing[index]:
                ctx.bad_rows.bad("missing_image", f"{where}: column {image_col!r} holds no image")
                continue
            try:
                view.text_fields({k: v[offset] for k, v in batch.items()}, where)
            except DataError as e:
                ctx.bad_rows.bad(reason_of(e), str(e))
                continue
            keep.append(index)
    return keep


def build(options: HfOptions, ctx: BuildContext) -> HfSamples:
    return HfSamples(
        _load(options), options, f"{options.path}" + (f"[{options.split}]" if options.split else ""), ctx
    )
