"""``pg-tune data preview`` / ``validate`` through the real CLI, on the shipped samples."""

from __future__ import annotations

import json

import pytest

from pg_tune.cli import main


@pytest.fixture
def mixed_recipe(tmp_path, samples_dir, vae_path):
    s = samples_dir
    text = f"""
output_dir: {tmp_path}/run
model: {{name_or_path: tiny-paligemma2, vae_path: {vae_path}}}
data:
  max_text_length: 40
  train:
    - {{format: coco_captions, annotations: {s}/coco_captions/captions_val2017.json, images: {s}/coco_captions/images, train_pairs: one_per_image}}
    - {{format: coco_detection, annotations: {s}/coco_detection/instances_val2017.json, images: {s}/coco_detection/images, weight: 2}}
    - {{format: jsonl, path: {s}/jsonl/data.jsonl}}
  eval:
    - {{format: docvqa, annotations: {s}/docvqa/val_v1.0.json, images: {s}/docvqa}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_preview_writes_the_mixed_epoch_and_draws(mixed_recipe, tmp_path, capsys):
    out, draw = tmp_path / "preview.jsonl", tmp_path / "draw"
    assert (
        main(["data", "preview", str(mixed_recipe), "--limit", "50", "--out", str(out), "--draw", str(draw)])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 2 caption groups + 2 detection images x weight 2 + 4 JSONL rows
    assert len(rows) == 10 and len(list(draw.glob("*.png"))) == 10
    assert sum(r["task"] == "caption" and r["entry"] == 0 for r in rows) == 2
    assert sum(r["entry"] == 1 for r in rows) == 4
    assert all({"image", "prefix", "suffix"} <= set(r) for r in rows)
    # The text shown is the model family's rendering of the structured targets, next to the targets.
    detect = next(r for r in rows if r["task"] == "detect" and r["entry"] == 1)
    assert detect["suffix"].startswith("<loc") and detect["targets"][0]["label"] in detect["suffix"]
    segment = next(r for r in rows if r["task"] == "refer_segment")
    assert segment["suffix"].count("<seg") == 16 and "mask" in segment["targets"][0]
    assert "bad rows: none" in capsys.readouterr().out
    assert main(["data", "preview", str(mixed_recipe), "--split", "eval"]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert printed[0]["references"] == ["1/8/93", "1/8/1993"]


def test_drawn_box_lands_on_the_object(samples_dir):
    """The decoded cat box is drawn over the red ellipse at [8, 10, 38, 50] (not transposed)."""
    import numpy as np

    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.formats import BuildContext
    from pg_tune.data.formats.jsonl import JsonlOptions, build
    from pg_tune.data.preview import draw_sample
    from pg_tune.models.paligemma import PaliGemmaFamily

    rows = build(
        JsonlOptions(path=str(samples_dir / "jsonl" / "data.jsonl"), limit=2),
        BuildContext("train", BadRows()),
    )
    image = np.asarray(draw_sample(rows[1], PaliGemmaFamily()))
    # The box's left edge (x = 85/1023*96 = 7.98) is outlined at y=45, below the ellipse's widest
    # point; a transposed (x<->y) decode would put it elsewhere and leave background here.
    outline = (230, 25, 75)
    assert outline in {tuple(image[45, 7]), tuple(image[45, 8])}
    assert tuple(image[45, 4]) == (235, 232, 220)
    assert outline not in {tuple(image[8, 45]), tuple(image[7, 45])}


def test_validate_reports_every_bad_row(tmp_path, samples_dir, capsys):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(samples_dir / "jsonl", d)
    (d / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    lines = [
        '{"image": "images/000000000139.png", "prefix": "caption en", "suffix": "fine"}',
        '{"image": "images/missing.png", "prefix": "caption en", "suffix": "x"}',
        '{"image": "images/000000000139.png", "prefix": "caption en", "suffix": "a cat"',
        '{"image": "images/000000000139.png", "task": "detect", "objects": [{"label": "cat", "box": [-5, 10, 120, 50]}]}',
        '{"image": "images/000000000139.png", "task": "detect", "objects": [{"label": "cat", "box": [30, 10, 30, 50]}]}',
        '{"image": "images/000000000139.png", "prefix": "caption en", "suffix": "  "}',
        '{"image": "images/corrupt.png", "prefix": "caption en", "suffix": "x"}',
        '{"image": "images/000000000285.png", "prefix": "caption en", "suffix": "' + "word " * 60 + '"}',
    ]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}/run\ndata:\n  max_text_length: 48\n  train:\n    - {{format: jsonl, path: {d}/data.jsonl}}\n"
    )
    assert main(["data", "validate", str(recipe)]) == 1
    out = capsys.readouterr().out
    for expected in (
        "missing_image: 1",
        "data.jsonl:2: image file not found",
        "malformed_json: 1",
        "data.jsonl:3: malformed JSON",
        "box_clipped: 1",
        "data.jsonl:4: objects[0].box",
        "degenerate_box: 1",
        "data.jsonl:5:",
        "empty_suffix: 1",
        "data.jsonl:6:",
        "unreadable_image: 1",
        "data.jsonl:7: cannot read image",
        "over_length: 1",
        "data.jsonl:8:",
        "6 bad rows",
    ):
        assert expected in out, expected
    # The clean sample set validates with exit status 0.
    clean = tmp_path / "clean.yaml"
    clean.write_text(
        f"output_dir: {tmp_path}/run\ndata:\n  max_text_length: 48\n  train:\n"
        f"    - {{format: docvqa, annotations: {samples_dir}/docvqa/val_v1.0.json, images: {samples_dir}/docvqa}}\n"
    )
    assert main(["data", "validate", str(clean)]) == 0
    assert "bad rows: none" in capsys.readouterr().out


def test_validate_catches_size_mismatch(tmp_path, samples_dir, capsys):
    import shutil

    d = tmp_path / "coco"
    shutil.copytree(samples_dir / "coco_detection", d)
    data = json.loads((d / "instances_val2017.json").read_text())
    data["images"][1]["width"] = 160
    (d / "instances_val2017.json").write_text(json.dumps(data))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}/run\ndata:\n  train:\n"
        f"    - {{format: coco_detection, annotations: {d}/instances_val2017.json, images: {d}/images}}\n"
    )
    assert main(["data", "validate", str(recipe)]) == 1
    assert "image is 80x80 but the annotation says 160x80" in capsys.readouterr().out
