"""The serve benchmark runs end to end on a tiny model and reports batching on vs off."""

from __future__ import annotations

import pytest

from pg_tune.measure.serve_bench import main


@pytest.mark.slow
def test_serve_bench_measures_both_modes_and_prints_ratios(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--models", "tiny-paligemma2", "--clients", "1,3", "--requests", "1", "--reps", "1",
                 "--max-tokens", "2", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| tiny-paligemma2 | 1 |" in printed and "| tiny-paligemma2 | 3 |" in printed
    import json

    rows = json.loads(out.read_text())
    assert {(r["mode"], r["clients"]) for r in rows} == {("on", 1), ("off", 1), ("on", 3), ("off", 3)}
    assert all(r["requests"] == r["clients"] and r["p95_s"] >= r["p50_s"] > 0 for r in rows)
    off = [r for r in rows if r["mode"] == "off"]
    assert all(set(r["batches"]) == {"1"} for r in off)  # --max-batch 1: never more than one request a batch
