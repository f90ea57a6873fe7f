"""An inverted box is repaired (its corners swapped) and counted as such, never silently (issue 22.10)."""

from __future__ import annotations

import json

from PIL import Image

from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats._common import check_box


def test_check_box_counts_and_notes_a_swapped_box():
    bad = BadRows("stop")  # a repair is a note: it never stops a run
    assert check_box([30, 40, 1, 2], (64, 64), "data.jsonl:1", bad) == (1.0, 2.0, 30.0, 40.0)
    assert bad.counts == {"box_swapped": 1}
    (example,) = bad.examples["box_swapped"]
    assert (
        example == "data.jsonl:1: box [30, 40, 1, 2] has x0 > x1 and y0 > y1; read as [1.0, 2.0, 30.0, 40.0]"
    )
    check_box([1, 40, 30, 2], (64, 64), "data.jsonl:2", bad)
    assert bad.counts["box_swapped"] == 2 and "has y0 > y1;" in bad.examples["box_swapped"][1]
    check_box([1, 2, 30, 40], (64, 64), "data.jsonl:3", bad)
    assert bad.counts["box_swapped"] == 2  # a box in order is not counted


def test_data_validate_reports_swapped_boxes_as_repaired(tmp_path, capsys):
    import yaml

    from pg_tune.cli import main

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    row = {"image": "a.png", "task": "detect", "objects": [{"label": "cat", "box": [30, 40, 1, 2]}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "data": {"train": [{"format": "jsonl", "path": str(tmp_path / "d.jsonl")}]},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", "validate", str(tmp_path / "r.yaml")]) == 0  # repaired, not bad
    out = capsys.readouterr().out
    assert "box_swapped: 1" in out and "read as [1.0, 2.0, 30.0, 40.0]" in out
