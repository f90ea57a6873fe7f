"""``pg-tune compare`` as a careless user meets it (issue 22.9, 22.16): model names checked before any
training, Ctrl-C keeps what finished and a second run resumes, a chart that cannot mislead."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pg_tune.cli import main
from pg_tune.measure.compare import ModelRun, svg_chart
from pg_tune.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "recipes/demo/shapes_tiny.yaml")


def _refused(capsys, tmp_path, models: str, message: str) -> None:
    out = tmp_path / "compare"
    assert main(["compare", DEMO, f"output_dir={tmp_path / 'x'}", "--models", models, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "x").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ("tiny-paligemma2,tiny-paligema2", "--models: 'tiny-paligema2' is not a tiny preset"),
        ("tiny-paligemma2,../../no/such/model", "--models: '../../no/such/model': no such folder"),
        (f"tiny-paligemma2,{ROOT / 'pyproject.toml'}", "pyproject.toml': a file, not a model folder"),
        ("tiny-paligemma2,someone/not-a-vlm", "--models: 'someone/not-a-vlm': no model family"),
        ("tiny-paligemma2,tiny-gemma3,tiny-paligemma2", "--models: 'tiny-paligemma2' is given twice"),
        ("me/x,me--x", "--models: 'me/x' and 'me--x' would share the run folder runs/me--x"),
    ],
)
def test_bad_model_lists_are_refused_before_anything_trains(tmp_path, capsys, models, message):
    _refused(capsys, tmp_path, models, message)


def test_the_chart_has_a_shared_labelled_axis_values_and_no_bar_for_an_all_zero_metric():
    runs = [
        ModelRun(
            model="tiny-a",
            family="fa",
            metrics_before={"caption/cider": 0.0, "vqa/accuracy": 1e-6},
            metrics_after={"caption/cider": 0.5, "vqa/accuracy": 0.0},
            samples_per_s=12.0,
            peak_memory_gb=1.5,
            trainable_params=1000,
        ),
        ModelRun(
            model="tiny-b",
            family="fb",
            metrics_before={"caption/cider": 0.25, "vqa/accuracy": 0.0},
            metrics_after={"caption/cider": 0.75, "vqa/accuracy": 0.0},
            samples_per_s=6.0,
            peak_memory_gb=3.0,
            trainable_params=4000,
        ),
    ]
    svg = svg_chart(runs)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    panels = {g.get("data-title"): g for g in root.iter(f"{ns}g") if g.get("data-title")}
    # vqa/accuracy is 0.000 (as the table prints it) before and after for every model: no bars, said so.
    vqa = panels["vqa/accuracy"]
    assert not [r for r in vqa.iter(f"{ns}rect") if r.get("class") == "bar"]
    assert "0.000 for every model (nothing to draw)" in "".join(vqa.itertext())
    # The metric panels share one axis from 0 to 1, labelled; each bar carries its value.
    cider = panels["caption/cider"]
    bars = [r for r in cider.iter(f"{ns}rect") if r.get("class") == "bar"]
    assert len(bars) == 3  # 0.000 draws nothing: tiny-a before
    ticks = [t.text for t in cider.iter(f"{ns}text") if t.get("class") == "tick"]
    assert ticks[0] == "0" and ticks[-1] == "1"
    values = [t.text for t in cider.iter(f"{ns}text") if t.get("class") == "value"]
    assert values == ["0.000", "0.500", "0.250", "0.750"]
    heights = [float(b.get("height")) for b in bars]
    assert heights[2] == pytest.approx(3 * heights[0] / 2)  # 0.75 vs 0.5 on the same scale
    # Costs get their own labelled axes (different units), values too.
    memory = panels["peak memory GB"]
    assert [t.text for t in memory.iter(f"{ns}text") if t.get("class") == "value"] == ["1.50", "3.00"]
    assert [t.text for t in memory.iter(f"{ns}text") if t.get("class") == "tick"][-1] == "3"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_ctrl_c_keeps_finished_models_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "compare"
    argv = [
        sys.executable, "-m", "pg_tune", "compare", DEMO, f"output_dir={tmp_path / 'unused'}",
        "data.train.0.num_samples=8", "data.eval.0.num_samples=2", "eval.max_new_tokens=2",
        "train.batch_size=2", "eval.batch_size=2", "train.save_every=1", "eval.before_training=false",
        "--models", "tiny-paligemma2,tiny-paligemma", "--steps", "40", "--out", str(out),
    ]  # fmt: skip
    # Ctrl-C's default action restored in the child: a suite started in the background
    # (`make test &`) ignores SIGINT, and Python then keeps it ignored in every process it starts.
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    second = out / "runs" / "tiny-paligemma" / "run"
    deadline = time.monotonic() + 600
    # Two complete checkpoints (save_every 1: step 2 or later; keep_last 2 deletes step-0000002 at
    # step 4, which a poll on a busy machine could miss).
    while len(list_checkpoints(second / "checkpoints")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the terminal sends it to compare, which forwards it once
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("pg-tune compare:")]
    assert "interrupted by Ctrl-C during tiny-paligemma" in line and "run the same command again" in line
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results] == ["tiny-paligemma2"] and results[0]["steps"] == 40
    assert "| tiny-paligemma2 |" in (out / "table.md").read_text()
    interrupted = (
        json.loads((second / "final_state.json").read_text())
        if (second / "final_state.json").exists()
        else None
    )
    assert interrupted is None and not (second / "adapter").exists()
    first_log = (out / "runs" / "tiny-paligemma2" / "run" / "metrics.jsonl").read_text()

    rerun = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert "tiny-paligemma2: kept from the earlier compare" in rerun.stdout
    assert "tiny-paligemma: resuming its interrupted run" in rerun.stdout
    assert (
        out / "runs" / "tiny-paligemma2" / "run" / "metrics.jsonl"
    ).read_text() == first_log  # not retrained
    log = (out / "runs" / "tiny-paligemma" / "compare.log").read_text()
    assert re.search(r"resuming from .*step-\d{7} \(step \d+\)", log)
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results] == ["tiny-paligemma2", "tiny-paligemma"]
    assert all(r["error"] is None and r["steps"] == 40 for r in results)
