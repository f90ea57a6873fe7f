"""``pg-tune compare``: the three tiny families on the shapes demo, and the report it writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pg_tune.measure.compare import ModelRun, html_page, markdown_table, svg_chart

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["tiny-paligemma2", "tiny-gemma3", "tiny-smolvlm2"]


class _Cells(HTMLParser):
    """Collects the table's cells and counts the chart's bars."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.bars = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "rect" and ("class", "bar") in attrs:
            self.bars += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _runs() -> list[ModelRun]:
    return [
        ModelRun(
            model="tiny-a",
            family="fa",
            steps=10,
            first_loss=5.0,
            last_loss=1.0,
            metrics_before={"caption/cider": 0.0, "caption/count": 4.0},
            metrics_after={"caption/cider": 2.5, "caption/count": 4.0},
            samples_per_s=12.0,
            peak_memory_gb=1.5,
            trainable_params=1000,
            adapter_bytes=2_000_000,
        ),
        ModelRun(model="org/b", error="exit 2: boom"),
    ]


def test_report_formats():
    runs = _runs()
    table = markdown_table(runs).splitlines()
    assert table[0].startswith("| model | family | caption/cider before → after |")
    assert "count" not in table[0]  # sample counts are not metrics
    assert table[2].startswith("| tiny-a | fa | 0.000 → 2.500 | 5.00 → 1.00 | 12.0 | 1.50 | 1,000 | 2.00 |")
    assert "boom" in table[3] and "failed" in table[3]
    svg = ET.fromstring(svg_chart(runs))  # well-formed XML
    assert svg.tag.endswith("svg")
    page = _Cells()
    page.feed(html_page(runs, "r.yaml", rank=8, batch_size=4))
    assert page.rows[1][:3] == ["tiny-a", "fa", "0.000 → 2.500"]
    # cider after (before is 0.000: no bar), then samples/s, memory, params: one bar each for the one
    # finished model
    assert page.bars == 4


@pytest.mark.slow
def test_compare_three_families_end_to_end(tmp_path, capsys):
    from pg_tune.cli import main

    out = tmp_path / "compare"
    argv = [
        "compare",
        str(ROOT / "recipes/demo/shapes_tiny.yaml"),
        f"output_dir={tmp_path / 'unused'}",
        "data.train.0.num_samples=16",
        "data.eval.0.num_samples=2",
        "eval.max_new_tokens=4",
        "train.batch_size=4",
        "eval.batch_size=4",
        "--models",
        ",".join(MODELS),
        "--steps",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| tiny-gemma3 | gemma3 |" in printed and "index.html" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results] == MODELS
    assert [r["family"] for r in results] == ["paligemma", "gemma3", "smolvlm"]
    for r in results:
        assert r["error"] is None and r["steps"] == 4
        assert r["last_loss"] < r["first_loss"]  # each learns
        assert set(r["metrics_before"]) == set(r["metrics_after"]) == set(results[0]["metrics_after"])
        assert r["samples_per_s"] > 0 and r["peak_memory_gb"] > 0.1
        assert 0 < r["trainable_params"] < r["total_params"] and r["adapter_bytes"] > 0
        assert (Path(r["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert len(markdown_table([ModelRun(**r) for r in results]).splitlines()) == 2 + len(MODELS)
    page = _Cells()
    page.feed((out / "index.html").read_text())
    assert [row[0] for row in page.rows[1:]] == MODELS
    ET.fromstring((out / "chart.svg").read_text())
    _check_in_chromium(out / "index.html")


def _check_in_chromium(page: Path) -> None:
    """Render the page in headless Chromium when one is installed; the DOM must hold the table."""
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        return  # not installed here; the HTML was parsed above
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rendered = _Cells()
    rendered.feed(dom)
    assert [row[0] for row in rendered.rows[1:]] == MODELS and rendered.bars > 0


def test_unsupported_task_is_refused_before_training(tmp_path, capsys):
    from pg_tune.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "output_dir: x\ndata:\n  train: [{format: shapes}]\n"
        "  eval: [{format: refcoco, parquet: p.parquet, images: i, split: val, task: segment}]\n"
    )
    assert main(["compare", str(recipe), "--models", "tiny-paligemma2,tiny-gemma3"]) == 2
    assert "'gemma3' cannot do task refer_segment" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
