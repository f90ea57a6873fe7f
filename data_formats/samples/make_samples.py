"""Regenerate the tiny sample datasets in this folder (deterministic; run from the repo root).

    python data_formats/samples/make_samples.py

Each folder holds a few rows in the real on-disk format of one adapter, over small synthetic
images whose objects sit exactly where the annotations say, so drawn previews can be checked by eye.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# Two scenes: (file stem, size, objects as (category, COCO bbox [x, y, w, h], shape)).
SCENES = [
    ("000000000139", (96, 64), [("cat", [8, 10, 30, 40], "ellipse"), ("dog", [52, 20, 36, 30], "rect")]),
    ("000000000285", (80, 80), [("dog", [20, 16, 44, 48], "rect")]),
]
COLOURS = {"cat": (220, 60, 40), "dog": (40, 80, 220)}


def scene_image(size, objects) -> Image.Image:
    image = Image.new("RGB", size, (235, 232, 220))
    draw = ImageDraw.Draw(image)
    for name, (x, y, w, h), shape in objects:
        box = (x, y, x + w - 1, y + h - 1)
        (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=COLOURS[name])
    return image


def polygon_of(bbox, shape) -> list[float]:
    """A COCO polygon tracing the drawn shape (a 12-gon for ellipses)."""
    import math

    x, y, w, h = bbox
    if shape == "rect":
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    cx, cy = x + w / 2, y + h / 2
    pts = []
    for k in range(12):
        a = 2 * math.pi * k / 12
        pts += [round(cx + w / 2 * math.cos(a), 1), round(cy + h / 2 * math.sin(a), 1)]
    return pts


def fresh(name: str) -> Path:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def write_images(folder: Path, prefix: str = "") -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for stem, size, objects in SCENES:
        file_name = f"{prefix}{stem}.png"
        scene_image(size, objects).save(folder / file_name)
        infos.append({"id": int(stem), "file_name": file_name, "width": size[0], "height": size[1]})
    return infos


def coco_instances(infos, prefix_ann: int = 1) -> dict:
    categories = [
        {"id": 17, "name": "cat", "supercategory": "animal"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
    ]
    ids = {c["name"]: c["id"] for c in categories}
    anns, ann_id = [], prefix_ann
    for info, (_, _, objects) in zip(infos, SCENES, strict=True):
        for name, bbox, shape in objects:
            anns.append(
                {
                    "id": ann_id,
                    "image_id": info["id"],
                    "category_id": ids[name],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                    "segmentation": [polygon_of(bbox, shape)],
                }
            )
            ann_id += 1
    # A crowd region (uncompressed RLE, column-major runs) over the first image's bottom rows.
    anns.append(
        {
            "id": ann_id,
            "image_id": infos[0]["id"],
            "category_id": 18,
            "bbox": [0, 50, 96, 14],
            "area": 1344,
            "iscrowd": 1,
            "segmentation": {"counts": [50] + [14, 50] * 95 + [14], "size": [64, 96]},
        }
    )
    return {
        "info": {"description": "pg_tune sample"},
        "images": infos,
        "annotations": anns,
        "categories": categories,
    }


def main() -> None:
    # coco_captions
    folder = fresh("coco_captions")
    infos = write_images(folder / "images")
    captions = [
        (139, "A red cat sits beside a blue dog."),
        (139, "two animals, a cat and a dog, on a beige floor"),
        (139, "A cat and a dog."),
        (285, "A blue square dog in the middle of the picture."),
        (285, "a big blue box"),
    ]
    anns = [
        {"id": i + 1, "image_id": image_id, "caption": text} for i, (image_id, text) in enumerate(captions)
    ]
    (folder / "captions_val2017.json").write_text(
        json.dumps({"images": infos, "annotations": anns}, indent=1)
    )

    # coco_detection
    folder = fresh("coco_detection")
    infos = write_images(folder / "images")
    (folder / "instances_val2017.json").write_text(json.dumps(coco_instances(infos), indent=1))

    # refcoco: refs(unc).p (a protocol-2 pickle of plain dicts, like the originals) + instances.json
    folder = fresh("refcoco")
    infos = write_images(folder / "images", prefix="COCO_train2014_")
    instances = coco_instances(infos)
    (folder / "instances.json").write_text(json.dumps(instances, indent=1))
    sentences = {
        1: ["the red cat on the left", "left animal"],
        2: ["blue dog right"],
        3: ["the big blue square"],
    }
    refs = []
    for ref_id, (ann_id, sents) in enumerate(sentences.items()):
        ann = next(a for a in instances["annotations"] if a["id"] == ann_id)
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "split": "val" if ref_id < 2 else "train",
                "file_name": f"COCO_train2014_{ann['image_id']:012d}_{ann_id}.jpg",
                "sent_ids": list(range(ref_id * 10, ref_id * 10 + len(sents))),
                "sentences": [
                    {"raw": s.capitalize(), "sent": s, "sent_id": ref_id * 10 + k, "tokens": s.split()}
                    for k, s in enumerate(sents)
                ],
            }
        )
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for ref in refs:
        ann = next(a for a in instances["annotations"] if a["id"] == ref["ann_id"])
        x, y, w, h = ann["bbox"]
        info = next(i for i in infos if i["id"] == ref["image_id"])
        rows.append(
            {
                "image_path": f"images/{info['file_name']}",
                "bbox": [float(x), float(y), float(x + w), float(y + h)],
                "sentences": [s["sent"] for s in ref["sentences"]],
                "split": ref["split"],
                "width": info["width"],
                "height": info["height"],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "refcoco_val.parquet")

    # docvqa: {split}_v1.0.json with documents/*.png
    folder = fresh("docvqa")
    (folder / "documents").mkdir()
    for stem, text in [("xnbl0037_1", "INVOICE 1/8/93"), ("pybv0228_81", "TOTAL $ 42.00")]:
        image = Image.new("RGB", (120, 60), (255, 255, 255))
        ImageDraw.Draw(image).text((6, 22), text, fill=(0, 0, 0))
        image.save(folder / "documents" / f"{stem}.png")
    records = [
        {
            "questionId": 337,
            "question": "what is the date mentioned in this letter?",
            "question_types": ["handwritten"],
            "image": "documents/xnbl0037_1.png",
            "docId": 279,
            "ucsf_document_id": "xnbl0037",
            "ucsf_document_page_no": "1",
            "answers": ["1/8/93", "1/8/1993"],
            "data_split": "val",
        },
        {
            "questionId": 338,
            "question": "What is the total?",
            "question_types": ["form"],
            "image": "documents/pybv0228_81.png",
            "docId": 280,
            "ucsf_document_id": "pybv0228",
            "ucsf_document_page_no": "81",
            "answers": ["$ 42.00"],
            "data_split": "val",
        },
    ]
    (folder / "val_v1.0.json").write_text(
        json.dumps(
            {"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0", "data": records},
            indent=1,
        )
    )

    # jsonl: plain prefix/suffix rows and the structured detect / segment forms
    folder = fresh("jsonl")
    infos = write_images(folder / "images")
    (folder / "masks").mkdir()
    mask = Image.new("L", SCENES[1][1], 0)
    x, y, w, h = SCENES[1][2][0][1]
    ImageDraw.Draw(mask).rectangle((x, y, x + w - 1, y + h - 1), fill=255)
    mask.save(folder / "masks" / "000000000285_dog.png")
    lines = [
        {"image": "images/000000000139.png", "prefix": "caption en", "suffix": "a red cat and a blue dog"},
        {
            "image": "images/000000000139.png",
            "task": "detect",
            "objects": [{"label": "cat", "box": [8, 10, 38, 50]}, {"label": "dog", "box": [52, 20, 88, 50]}],
        },
        {
            "image": "images/000000000139.png",
            "task": "segment",
            "objects": [{"label": "red cat", "polygon": polygon_of([8, 10, 30, 40], "ellipse")}],
        },
        {
            "image": "images/000000000285.png",
            "task": "segment",
            "objects": [{"label": "blue dog", "mask": "masks/000000000285_dog.png"}],
        },
    ]
    (folder / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    # hf: a save_to_disk dataset with an Image column and a list-of-answers column
    import datasets

    folder = fresh("hf")
    ds = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": (HERE / "docvqa" / "documents" / f"{s}.png").read_bytes(), "path": None}
                for s in ("xnbl0037_1", "pybv0228_81")
            ],
            "question": ["what is the date?", "what is the total?"],
            "answers": [["1/8/93", "1/8/1993"], ["$ 42.00"]],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder / "docs"))
    preference_samples()


def preference_samples() -> None:
    """Preference pairs (``train.objective: dpo``): ``jsonl/pairs.jsonl`` over the jsonl sample's
    images, and ``hf/rlaif_v.parquet`` laid out like RLAIF-V's shards (openbmb/RLAIF-V-Dataset:
    ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset, origin_split, idx,
    image_path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [
        {
            "image": "images/000000000139.png",
            "prefix": "caption en",
            "chosen": "a red cat and a blue dog",
            "rejected": "a red cat and a green bird",
        },
        {
            "image": "images/000000000285.png",
            "prefix": "answer en what colour is the dog?",
            "chosen": "blue",
            "rejected": "red",
            "task": "vqa",
        },
    ]
    (HERE / "jsonl" / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    rows = [
        {
            "ds_name": "RLAIF-V",
            "image": {"bytes": (HERE / "jsonl" / "images" / "000000000139.png").read_bytes(), "path": None},
            "question": "What animals are in the picture?",
            "chosen": "A red cat on the left and a blue dog on the right.",
            "rejected": "A red cat, a blue dog and a small bird perched on the sofa.",
            "origin_dataset": "pg_tune sample",
            "origin_split": '{"model": "pg_tune", "type": "synthetic"}',
            "idx": "0",
            "image_path": "images/000000000139.png",
        },
        {
            "ds_name": "RLAIF-V",
            "image": {"bytes": (HERE / "jsonl" / "images" / "000000000285.png").read_bytes(), "path": None},
            "question": "Describe the image.",
            "chosen": "A blue square in the middle of a beige picture.",
            "rejected": "A blue square next to a red circle, with text written below them.",
            "origin_dataset": "pg_tune sample",
            "origin_split": '{"model": "pg_tune", "type": "synthetic"}',
            "idx": "1",
            "image_path": "images/000000000285.png",
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), HERE / "hf" / "rlaif_v.parquet")


if __name__ == "__main__":
    main()
