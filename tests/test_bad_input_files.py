"""Files a user hands pg_tune (predictions, JSONL, images): odd encodings, sizes and bit depths are
read correctly or refused naming the file and line, never a traceback or an exhausted machine."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import yaml
from PIL import Image

from pg_tune.cli import main
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import BuildContext
from pg_tune.data.formats.jsonl import JsonlOptions
from pg_tune.data.formats.jsonl import build as build_jsonl
from pg_tune.data.images import load_image
from pg_tune.data.sample import DataError
from pg_tune.models.paligemma import PaliGemmaFamily
from pg_tune.models.paligemma.boxes import encode_box

LOC = encode_box((0, 0, 50, 50), (100, 100))


def _line(**fields) -> str:
    return json.dumps({"task": "refer_detect", "prediction": LOC, "references": [LOC], **fields}) + "\n"


@pytest.mark.parametrize(
    "size", [[20000, 20000], [1e308, 1e308], [8193, 8193], [0.5, 10], [100, float("nan")]], ids=str
)
def test_predictions_image_size_is_bounded(tmp_path, capsys, size):
    path = tmp_path / "p.jsonl"
    path.write_text(_line(image_size=[100, 100]) + _line(image_size=size))
    assert main(["eval", "--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: field 'image_size'" in err and "Traceback" not in err
    assert not (tmp_path / "rescored" / "metrics.json").exists()


def test_report_draws_at_a_bounded_size(tmp_path):
    """Whatever size a record names, the report allocates at most DRAW_MAX_SIDE pixels a side."""
    from pg_tune.evaluate.report import DRAW_MAX_SIDE, THUMB_SIDE, write_report
    from pg_tune.evaluate.scoring import Item, score_items

    side = 6000  # within the pixel bound of a readable image; 6000x6000x3 float32 would be 432 MB
    box = encode_box((600, 600, 3000, 3000), (side, side))
    records = score_items([Item("refer_detect", box, [box], (side, side))], PaliGemmaFamily()).records
    tracemalloc.start()
    try:
        write_report(tmp_path / "report", "t", {"all": {}}, records, images=[None])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * DRAW_MAX_SIDE**2 * 3 * 4, f"{peak:,} bytes"  # a few float32 RGB copies
    (png,) = (tmp_path / "report" / "images").iterdir()
    thumb = np.asarray(Image.open(png).convert("RGB"))
    assert thumb.shape[:2] == (THUMB_SIDE, THUMB_SIDE)
    # The boxes were scaled with the image: the predicted box's edge lands at 600/6000 of the side.
    magenta = np.argwhere((thumb[..., 0] > 180) & (thumb[..., 1] < 60) & (thumb[..., 2] > 100))
    assert (
        abs(magenta[:, 0].min() - THUMB_SIDE * 0.1) <= 3 and abs(magenta[:, 0].max() - THUMB_SIDE * 0.5) <= 3
    )


def test_predictions_line_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + _line(image_size=[100, 100]).encode()  # a BOM on line 1 is fine
        + b'{"task": "caption", "prediction": "caf\xe9", "references": ["x"]}\n'
    )  # fmt: skip
    assert main(["eval", "--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: line is not valid UTF-8 (invalid continuation byte at byte 38)" in err
    assert "Traceback" not in err


def _jsonl(tmp_path, text: bytes):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_bytes(text)
    return path


def test_jsonl_bom_does_not_reject_the_first_row(tmp_path):
    row = json.dumps({"image": "a.png", "prefix": "caption en", "suffix": "a red square"})
    path = _jsonl(tmp_path, b"\xef\xbb\xbf" + (row + "\n" + row + "\n").encode())
    bad_rows = BadRows("stop")
    samples = build_jsonl(JsonlOptions(path=str(path)), BuildContext("train", bad_rows))
    assert len(samples) == 2 and samples[0].prefix == "caption en" and not bad_rows.counts


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank"])
def test_empty_jsonl_fails_data_validate(tmp_path, capsys, content):
    path = _jsonl(tmp_path, content)
    with pytest.raises(DataError, match=r"data.jsonl: no rows \(the file is empty or blank\)"):
        build_jsonl(JsonlOptions(path=str(path)), BuildContext("train", BadRows("skip")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"),
                                      "data": {"train": [{"format": "jsonl", "path": str(path)}]}}))  # fmt: skip
    assert main(["data", "validate", str(recipe), "--processor", "tiny-paligemma2"]) == 1
    out = capsys.readouterr().out
    assert "unreadable_file: 1" in out and "data.jsonl: no rows (the file is empty or blank)" in out
    assert main(["validate", str(recipe)]) == 0  # the recipe itself is fine: the data is not


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, mode):
    values = np.array([[0, 257, 257 * 100], [30000, 65535, 65535 // 2]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    rgb = np.asarray(load_image(path, "data.jsonl:1"))
    expected = np.rint(values / 257).astype(np.uint8)
    assert rgb.shape == (2, 3, 3) and (rgb == expected[..., None]).all()
    # The same rule for an in-memory wide image (mode I, e.g. from a dataset library).
    in_memory = Image.fromarray(values.astype(np.int32)) if mode == "I" else Image.open(path)
    assert (np.asarray(load_image(in_memory))[..., 0] == expected).all()
