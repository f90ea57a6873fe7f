"""Hugging Face ``datasets``: a dataset id, a local dataset repository, ``save_to_disk`` output, or parquet.

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
          path: data/my_vqa          # a save_to_disk folder; or data/train-*.parquet; or a hub id
          split: train               # for a DatasetDict / a repository's split
          prompt: "answer en {question}"
          columns: {suffix: answers}
          task: vqa

``path`` may also be anything ``datasets.load_dataset`` takes: a Hub dataset id
(``merve/vqav2-small``) or a local folder laid out like a Hub dataset repository
(``data/train-00000-of-00004.parquet`` ..., a README.md with ``configs``). Read normally it is
converted once into datasets' Arrow cache; with ``streaming: true`` nothing is converted or
downloaded ahead: training reads the shards as a stream (``pg_tune.data.stream``: a shuffle buffer,
deterministic from ``train.seed``, mixed by weight with the other entries, resumed exactly).
"""

from __future__ import annotations

import glob
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pg_tune.config.datasets import HfOptions, is_saved_dataset
from pg_tune.data.bad_rows import data_error, reason_of
from pg_tune.data.formats._common import BuildContext, format_prompt
from pg_tune.data.sample import DataError, LazySamples, Sample

_CONTRACT = ("image", "prefix", "suffix")


def _load(options: HfOptions, ctx: BuildContext | None = None):
    import datasets

    path = Path(options.path)
    if is_saved_dataset(path):
        if options.streaming:
            raise DataError(
                f"{path}: a save_to_disk folder is memory-mapped already; drop streaming: true "
                "(streaming is for dataset ids, repository folders and parquet files)"
            )
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if options.split not in ds:
                raise DataError(f"{path}: set split to one of {sorted(ds)} (got {options.split!r})")
            ds = ds[options.split]
        return ds
    if (not path.is_dir() and glob.has_magic(options.path)) or options.path.endswith(".parquet"):
        files = sorted(glob.glob(options.path))
        if not files:
            raise DataError(f"{options.path}: no such parquet file")
        for file in files:
            parquet_file(file)  # a truncated file (no footer) is named now, whatever the policy
        if options.streaming:
            return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        try:
            return datasets.Dataset.from_parquet(files)  # memory-mapped Arrow cache, not a RAM copy
        except Exception as e:  # noqa: BLE001 - datasets wraps pyarrow's error: find the row group ourselves
            readable = _readable_parquet(files, ctx)
            if readable == files:  # no damaged row group: some other failure, named in one line
                cause = e.__cause__ or e
                raise DataError(
                    f"{options.path}: cannot convert the parquet files ({type(cause).__name__}: "
                    f"{str(cause).splitlines()[0] if str(cause) else ''})"
                ) from None
            return datasets.Dataset.from_parquet(readable)
    # A Hub id or a local dataset repository folder: whatever datasets.load_dataset takes.
    try:
        return datasets.load_dataset(
            options.path,
            options.name,
            split=options.split or "train",
            revision=options.revision,
            streaming=options.streaming,
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"{options.path}: not a save_to_disk folder, parquet file, dataset repository folder or "
            f"reachable dataset id ({type(e).__name__}: {e})"
        ) from None


# ---- damaged parquet files ---------------------------------------------------------------------


def parquet_file(path: str | Path):
    """``pyarrow.parquet.ParquetFile`` of ``path``; a file cut short (no footer) or not parquet at all
    is a ``DataError`` naming it (its rows cannot even be counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise data_error(
            "corrupt_parquet",
            f"{path}: not a readable parquet file (truncated, or not parquet: {str(e).splitlines()[0]})",
        ) from None


def _row_groups(path: str | Path):
    """``(index, first row, rows, error or None)`` of each row group of a parquet file, each read once."""
    pf = parquet_file(path)
    first = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        try:
            pf.read_row_group(group)
            error = None
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ArrowIOError...
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
        yield group, first, rows, error
        first += rows


def _unreadable_group(path, group: int, first: int, rows: int, error: str) -> str:
    return f"{path}: row group {group} (rows {first}-{first + rows - 1}) is unreadable: {error}"


def _readable_parquet(files: list[str], ctx: BuildContext | None) -> list[str]:
    """Files ``datasets`` could not convert: their damaged row groups named (``stop``) or counted,
    row by row, as ``corrupt_parquet`` (``skip``), the readable ones copied into a repaired file."""
    import hashlib
    import tempfile

    import pyarrow.parquet as pq

    out = []
    bad_rows = ctx.bad_rows if ctx is not None else None
    for file in files:
        groups = list(_row_groups(file))
        damaged = [g for g in groups if g[3] is not None]
        if not damaged:
            out.append(file)
            continue
        for group, first, rows, error in damaged:
            message = _unreadable_group(file, group, first, rows, error)
            if bad_rows is None:
                raise DataError(message)
            bad_rows.bad("corrupt_parquet", message, count=rows)
        pf = parquet_file(file)
        digest = hashlib.sha256(
            f"{Path(file).resolve()}:{Path(file).stat().st_mtime_ns}".encode()
        ).hexdigest()[:16]
        repaired = (
            Path(tempfile.gettempdir()) / "pg_tune_repaired_parquet" / f"{Path(file).stem}-{digest}.parquet"
        )
        repaired.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(repaired, pf.schema_arrow) as writer:
            for group, _, _, error in groups:
                if error is None:
                    writer.write_table(pf.read_row_group(group))
        out.append(str(repaired))
    return out


class _Unreadable:
    """A streamed row inside a parquet row group that cannot be read; ``to_sample`` raises its error."""

    def __init__(self, message: str):
        self.message = message


def _parquet_shard_rows(path: str, index: int, batch_rows: int = 64):
    """Every row of one local parquet file, as ``_shard_rows`` gives them, read row group by row group
    with pyarrow: a damaged group stands as ``_Unreadable`` rows (as many as it holds), so positions
    in the stream stay the same and each row is counted (``skip``) or named (``stop``)."""
    pf = parquet_file(path)
    row_no = 0
    for group in range(pf.num_row_groups):
        rows, done = pf.metadata.row_group(group).num_rows, 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group]):
                for values in batch.to_pylist():
                    yield f"shard {index} row {row_no}", values
                    row_no, done = row_no + 1, done + 1
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ArrowIOError...
            message = _unreadable_group(
                path, group, row_no - done, rows, str(e).splitlines()[0] if str(e) else type(e).__name__
            )
            for _ in range(rows - done):
                yield f"shard {index} row {row_no}", _Unreadable(message)
                row_no += 1


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
        missing = [c for c in needed if ds.column_names is not None and c not in ds.column_names]
        if missing:
            raise DataError(
                f"{where}: missing columns {missing} (have {ds.column_names}); map them with columns:"
            )
        feature = (ds.features or {}).get(self.col["image"])
        if isinstance(feature, datasets.Image) and feature.decode:
            # Keep the encoded bytes: decoding happens per row, in __getitem__.
            ds = ds.cast_column(self.col["image"], datasets.Image(decode=False))
        self.ds = ds
        self.root = Path(options.image_root) if options.image_root else None
        self.train = ctx is not None and ctx.split == "train"
        if isinstance(ds, datasets.IterableDataset):
            self.rows: Sequence[int] = range(0)  # a stream: HfStream sizes it, rows are checked as read
        else:
            # Table rows behind the samples: every row, or (with a BuildContext) the rows whose text
            # and image reference pass the build-time scan, so bad rows are skipped or stop the build
            # like in the eager formats. ``limit`` then caps emitted samples, as in every format.
            rows = range(len(ds)) if ctx is None else scan_rows(self, ctx)
            self.rows = rows[: options.limit] if options.limit is not None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, index: int) -> Sample:
        row = self.rows[index]
        return self.row_to_sample(self.ds[row], row)

    def row_to_sample(self, row: dict[str, Any], index: int | str) -> Sample:
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


class HfStream:
    """A streamed split as passes of encoded rows (``pg_tune.data.stream.EntryStream``)."""

    def __init__(self, reader: HfSamples, num_rows: int, seed: int):
        self.reader = reader
        self.ds = reader.ds
        self.where = reader.where
        self.options = reader.options
        self._num_rows = num_rows
        self.seed = seed
        self.entry = 0  # set by StreamingSamples: separates the random streams of two entries

    @property
    def num_rows(self) -> int:
        return self._num_rows

    def rows(self, pass_no: int, shuffle: bool):
        import itertools
        import random

        shards = list(range(self.ds.n_shards))
        # A limit takes the first rows in file order, so only the buffer shuffles them.
        if shuffle and self.options.limit is None:
            random.Random(f"{self.seed}:{self.entry}:shards:{pass_no}").shuffle(shards)
        files = _data_files(self.options) if _is_parquet_path(self.options.path) else []
        if files and len(files) == len(shards):  # local parquet files: row groups read one by one
            rows = itertools.chain.from_iterable(_parquet_shard_rows(files[i], i) for i in shards)
        else:
            rows = itertools.chain.from_iterable(_shard_rows(self.ds, len(shards), i) for i in shards)
        rows = itertools.islice(rows, self._num_rows)
        if not shuffle:
            return rows
        from pg_tune.data.stream import buffer_shuffled

        rng = random.Random(f"{self.seed}:{self.entry}:buffer:{pass_no}")
        return buffer_shuffled(rows, self.options.shuffle_buffer, rng)

    def to_sample(self, row: tuple[str, dict[str, Any]], position: int) -> Sample:
        where, values = row  # named by shard and row, wherever the shuffle put it
        if isinstance(values, _Unreadable):
            raise data_error("corrupt_parquet", f"{self.where}[{where}]: {values.message}")
        return self.reader.row_to_sample(values, where)


def _shard_rows(ds, num_shards: int, index: int, batch_rows: int = 64):
    """Every row of one shard as ``("shard S row R", row dict)``. ``IterableDataset.iter`` rather
    than ``iter(ds)``: inside a DataLoader worker the latter yields only that worker's share of the
    shards, and every worker here must read the whole stream (it skips the rows others decode)."""
    row_no = 0
    batches = ds.shard(num_shards=num_shards, index=index, contiguous=True).iter(batch_size=batch_rows)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a remote shard that breaks mid-way: named, not a traceback
            raise data_error(
                "corrupt_shard", f"shard {index}: unreadable after row {row_no}: {str(e).splitlines()[0]}"
            ) from None
        columns = list(batch)
        for values in zip(*batch.values(), strict=True):
            yield f"shard {index} row {row_no}", dict(zip(columns, values, strict=True))
            row_no += 1


def _stream_rows(ds, options: HfOptions) -> int | None:
    """Rows in a streamed split: ``num_rows``, else parquet footers, else the Hub's dataset info."""
    if options.num_rows is not None:
        return options.num_rows if options.limit is None else min(options.num_rows, options.limit)
    total = None
    files = _data_files(options)
    if files and all(str(f).endswith(".parquet") for f in files):
        import fsspec

        total = 0
        for f in files:
            with fsspec.open(str(f), "rb") as handle:
                total += parquet_file(handle if "://" in str(f) else f).metadata.num_rows
    elif ds.info.splits and (split := ds.info.splits.get(options.split or "train")) is not None:
        total = split.num_examples or None
    if total is None:
        return None
    return total if options.limit is None else min(total, options.limit)


def _is_parquet_path(path: str) -> bool:
    """A local parquet file or glob (what ``_load`` reads with the parquet builder)."""
    return (not Path(path).is_dir() and glob.has_magic(path)) or path.endswith(".parquet")


def _data_files(options: HfOptions) -> list[str]:
    """The files a streamed split reads, as ``datasets`` resolves them (local paths or hf:// URLs)."""
    import datasets

    if _is_parquet_path(options.path):
        return sorted(glob.glob(options.path))
    builder = datasets.load_dataset_builder(options.path, options.name, revision=options.revision)
    files = (builder.config.data_files or {}).get(options.split or "train")
    return [str(f) for f in files] if files else []


def build(options: HfOptions, ctx: BuildContext) -> HfSamples | HfStream | list[Sample]:
    where = f"{options.path}" + (f"[{options.split}]" if options.split else "")
    ds = _load(options, ctx)
    reader = HfSamples(ds, options, where, None if options.streaming else ctx)
    if not options.streaming:
        return reader
    if ctx.split != "train":
        if options.limit is None:
            raise DataError(
                f"{where}: a streamed eval entry needs limit (evaluation reads its first limit rows)"
            )
        import itertools

        return [
            reader.row_to_sample(row, i) for i, row in enumerate(itertools.islice(reader.ds, options.limit))
        ]
    num_rows = _stream_rows(reader.ds, options)
    if not num_rows:
        raise DataError(
            f"{where}: streaming needs the split's size to make epochs, and neither parquet footers nor "
            "the dataset info give it; set num_rows"
        )
    return HfStream(reader, num_rows, ctx.seed)
