"""RefCOCO / RefCOCO+ / RefCOCOg: referring expressions to a box (``detect``) or a mask (``segment``).

Two on-disk forms. The original (lichengunc/refer): ``refs(unc|google|umd).p`` plus the COCO
``instances.json`` of train2014 and its images. One raw ref from the pickle::

    {"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "category_id": 1, "split": "train",
     "sentences": [{"raw": "The lady with the blue shirt", "sent": "the lady with the blue shirt",
                    "sent_id": 0, "tokens": ["the", "lady", ...]}]}

The pickle is read with a restricted unpickler that builds only plain containers and scalars: a
pickle can name any importable callable and run it while loading, so any global (a class, a
function such as ``os.system``) is refused with a ``DataError`` instead of being imported.

The common parquet copies (one row per ref or per sentence, boxes already ``[x0, y0, x1, y1]`` in
pixels, images by path) are read with ``parquet:`` and a column mapping.

Each sentence is one sample: ``prefix = "detect {expression}"`` (``task: segment``:
``"segment {expression}"``; big_vision's transfer uses the raw sentence as the prefix: set
``prompt: "{expression}"``) and one target object: the pixel box and, for ``segment``, the real COCO
mask (polygons or RLE). The model family renders it (PaliGemma: ``<loc..>x4`` /
``<loc..>x4<seg..>x16``, the masks through the VQ-VAE at ``model.vae_path``); scoring compares with
the box and mask themselves.

Training draws, by default (``train_pairs: one_per_image``), one object of each image and one of
that object's sentences per epoch, as big_vision's ``refcoco_seg`` transfer does (its ``*_flat``
one-row-per-sentence splits are for evaluation): the samples of an image share ``meta["group"]``,
those of an object ``meta["object"]``, and the training sampler draws from them per (seed, epoch),
so a resumed run replays the same draws. ``train_pairs: every_sentence`` trains on every sentence
each epoch. Evaluation is always one sample per sentence.

Several ``refs`` files (with one shared ``instances`` or one each) are read as one set, merging the
sentences of the same COCO annotation. For ``split: train`` every image that appears in another
split of any of them is left out, and ``split: test`` takes ``test``, ``testA`` and ``testB``:
RefCOCO (unc) + RefCOCO+ (unc) + RefCOCOg (umd) is big_vision's ``refcocox_combined`` training set.
Selected in a recipe by::

    data:
      train:
        - format: refcoco
          refs: refcoco/refs(unc).p
          instances: refcoco/instances.json
          images: coco/train2014
          split: train
          task: segment
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pg_tune.config.datasets import RefcocoOptions
from pg_tune.data.boxes import coco_bbox_to_xyxy
from pg_tune.data.formats._common import (
    BuildContext,
    apply_limit,
    check_box,
    format_prompt,
    limit_reached,
    read_json,
)
from pg_tune.data.images import image_size
from pg_tune.data.masks import segmentation_to_mask
from pg_tune.data.sample import DataError, ObjectTarget, Sample

_DEFAULT_PROMPTS = {"detect": "detect {expression}", "segment": "segment {expression}"}
TASKS = {"detect": "refer_detect", "segment": "refer_segment"}
"""The recipe's ``task`` option -> the samples' task."""


# -- safe pickle ---------------------------------------------------------------------------------


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, sets, strings, bytes, numbers, booleans and None; nothing else.

    Every way a pickle runs code (``REDUCE``, ``BUILD`` with ``__setstate__``, ``NEWOBJ``, ``INST``,
    ``OBJ``, extension codes) first fetches a callable through ``find_class``; refusing them all
    means nothing is imported and nothing is called. Persistent ids are refused by the base class.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: only plain containers and scalars are allowed"
        )


def load_plain_pickle(path: str | Path) -> Any:
    """Read a pickle of plain data without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: refs pickle not found")
    data = path.read_bytes()
    try:
        # Python 2 pickles (the original refs files) store text as byte strings: decode them as UTF-8.
        return _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path}: not a plain-data pickle ({e}); a refs file holds only lists and dicts, so this one is "
            f"corrupt or unsafe and was not loaded"
        ) from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DataError(f"{path}: cannot read pickle ({type(e).__name__}: {e})") from None


# -- build ---------------------------------------------------------------------------------------


def build(options: RefcocoOptions, ctx: BuildContext) -> list[Sample]:
    prompt = options.prompt or _DEFAULT_PROMPTS[options.task]
    if options.parquet:
        rows = _parquet_rows(options, ctx)
    elif options.refs and options.instances and options.images:
        rows = _refer_rows(options, ctx)
    else:
        raise DataError("refcoco: set refs, instances and images (the refer toolkit's files), or parquet")
    task = TASKS[options.task]
    samples: list[Sample] = []
    for row in rows:
        if limit_reached(samples, options.limit):
            break
        where, size = row["where"], row["size"]
        box = check_box(row["box"], size, f"{where}: field 'box'", ctx.bad_rows)
        if box is None:
            continue
        if not row["expressions"]:
            ctx.bad_rows.bad("empty_prefix", f"{where}: no referring expression (sentences is empty)")
            continue
        meta: dict[str, Any] = {}
        if ctx.split == "train" and options.train_pairs == "one_per_image":
            meta.update(group=f"refcoco:{row['image']}", object=row["object"])
        segmentation = None
        if task == "refer_segment":
            segmentation = row.get("segmentation")
            if segmentation is None:
                ctx.bad_rows.bad("missing_field", f"{where}: task segment needs field 'segmentation'")
                continue
            try:
                segmentation_to_mask(segmentation, size)  # a bad mask is named now, not mid-training
            except (ValueError, TypeError) as e:
                ctx.bad_rows.bad("bad_mask", f"{where}: field 'segmentation': {e}")
                continue
        targets = (ObjectTarget("", box, segmentation),)
        for k, expression in enumerate(row["expressions"]):
            expression = " ".join(str(expression).split())
            if not expression:
                ctx.bad_rows.bad("empty_prefix", f"{where}[sentence {k}]: empty referring expression")
                continue
            prefix = format_prompt(prompt, where, expression=expression)
            samples.append(
                Sample(row["image"], prefix, "", f"{where}[sentence {k}]", task, (), meta, targets, size)
            )
    return apply_limit(samples, options.limit)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _refer_rows(options: RefcocoOptions, ctx: BuildContext) -> Iterator[dict[str, Any]]:
    refs_paths = [Path(p) for p in _as_list(options.refs)]
    instance_paths = _as_list(options.instances)
    if len(instance_paths) not in (1, len(refs_paths)):
        raise DataError(
            f"refcoco: {len(refs_paths)} refs files but {len(instance_paths)} instances files; give one "
            f"instances.json for all, or one per refs file"
        )
    combined = len(refs_paths) > 1
    splits = {"test", "testA", "testB"} if combined and options.split == "test" else {options.split}
    sources = []  # (refs_path, refs, instances_path)
    for k, refs_path in enumerate(refs_paths):
        refs = load_plain_pickle(refs_path)
        if not isinstance(refs, list):
            raise DataError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
        sources.append((refs_path, refs, instance_paths[k if len(instance_paths) > 1 else 0]))
    excluded: set[Any] = set()
    if combined and options.split == "train":
        # big_vision's refcocox_combined: no train image may appear in any other split of any set.
        excluded = {
            ref["image_id"]
            for _, refs, _ in sources
            for ref in refs
            if isinstance(ref, dict) and ref.get("split", "train") != "train" and "image_id" in ref
        }
    loaded: dict[str, tuple[dict, dict]] = {}
    root = Path(options.images)
    for refs_path, refs, instances_path in sources:
        if instances_path not in loaded:
            instances = read_json(instances_path, "RefCOCO instances")
            loaded[instances_path] = (
                {im["id"]: im for im in instances.get("images", []) if isinstance(im, dict) and "id" in im},
                {a["id"]: a for a in instances.get("annotations", []) if isinstance(a, dict) and "id" in a},
            )
        images, anns = loaded[instances_path]
        for i, ref in enumerate(refs):
            where = f"{refs_path}[{i}]"
            if not isinstance(ref, dict) or not all(
                k in ref for k in ("ann_id", "image_id", "split", "sentences")
            ):
                ctx.bad_rows.bad(
                    "missing_field", f"{where}: a ref needs ann_id, image_id, split and sentences"
                )
                continue
            if ref["split"] not in splits or ref["image_id"] in excluded:
                continue
            where = f"{refs_path}[{i}](ref_id={ref.get('ref_id')})"
            ann, info = anns.get(ref["ann_id"]), images.get(ref["image_id"])
            if ann is None or info is None:
                ctx.bad_rows.bad(
                    "unknown_annotation", f"{where}: ann_id/image_id not found in {instances_path}"
                )
                continue
            image = root / str(info.get("file_name", ""))
            if not image.is_file():
                ctx.bad_rows.bad("missing_image", f"{where}: image file not found: {image}")
                continue
            try:
                box = coco_bbox_to_xyxy(ann["bbox"])
            except (KeyError, ValueError) as e:
                ctx.bad_rows.bad("bad_box", f"{where}: field 'bbox' of ann {ref['ann_id']}: {e}")
                continue
            expressions = [
                s.get(options.sentence) or s.get("sent") or s.get("raw")
                for s in ref["sentences"]
                if isinstance(s, dict)
            ]
            yield {
                "where": where,
                "image": image,
                "object": f"ann {ref['ann_id']}",  # the same COCO object in every refs file
                "size": (int(info["width"]), int(info["height"])),
                "box": box,
                "segmentation": ann.get("segmentation"),
                "expressions": [e for e in expressions if e is not None],
            }


_COLUMNS = ("image", "box", "expression", "split", "segmentation", "width", "height")


def _parquet_rows(options: RefcocoOptions, ctx: BuildContext) -> Iterator[dict[str, Any]]:
    import glob

    import pyarrow.parquet as pq

    unknown = sorted(set(options.columns) - set(_COLUMNS))
    if unknown:
        raise DataError(f"refcoco.columns: unknown keys {unknown} (known: {', '.join(_COLUMNS)})")
    col = {name: options.columns.get(name, name) for name in _COLUMNS}
    files = sorted(glob.glob(options.parquet)) or [options.parquet]
    root = Path(options.images) if options.images else None
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"{file}: parquet file not found")
        pf = pq.ParquetFile(file)
        names = set(pf.schema_arrow.names)
        missing = [col[c] for c in ("image", "box", "expression") if col[c] not in names]
        if missing:
            raise DataError(
                f"{file}: missing columns {missing} (have {sorted(names)}); map them with columns:"
            )
        wanted = [col[c] for c in _COLUMNS if col[c] in names]
        index = 0
        for batch in pf.iter_batches(batch_size=1024, columns=wanted):  # streams: never the whole file
            for record in batch.to_pylist():
                where = f"{file}[{index}]"
                index += 1
                if col["split"] in record and record[col["split"]] != options.split:
                    continue
                image = Path(str(record[col["image"]]))
                image = root / image if root is not None and not image.is_absolute() else image
                if not image.is_file():
                    ctx.bad_rows.bad(
                        "missing_image", f"{where}: field {col['image']!r}: image not found: {image}"
                    )
                    continue
                if record.get(col["width"]) and record.get(col["height"]):
                    size = (int(record[col["width"]]), int(record[col["height"]]))
                else:
                    try:
                        size = image_size(image, where)
                    except DataError as e:
                        ctx.bad_rows.bad("unreadable_image", str(e))
                        continue
                expressions = record[col["expression"]]
                if isinstance(expressions, str):
                    expressions = [expressions]
                yield {
                    "where": where,
                    "image": image,
                    # One object per (image, box): one-row-per-sentence copies repeat the box.
                    "object": f"box {record[col['box']]}",
                    "size": size,
                    "box": record[col["box"]],
                    "segmentation": record.get(col["segmentation"]),
                    "expressions": list(expressions or []),
                }
