"""What DPO costs against SFT on bench-mini: samples/s and peak RSS, each run in its own process.

    PYTHONPATH=. python benchmarks/dpo_bench.py REPS STEPS [OUT.json]     # e.g. 2 16

Both objectives train the same rows through the real loop (``pg_tune.train.loop.train``): bench-mini
(4 Gemma layers, the real 257,216-row vocabulary, 224 px / 256 image tokens), LoRA r=8 on attention +
MLP, batch 4, fp32, AdamW, synthetic shapes preference pairs (SFT trains on their chosen captions).
A DPO "sample" is a pair: two sequences through the policy and two through the reference (the base,
adapter off), each image encoded once. samples/s is the median over the logged windows after the
first, "best" its fastest window (the least disturbed by other jobs on a shared machine); peak RSS is
the worker's ``ru_maxrss``. The order alternates between repetitions (sft, dpo, then dpo, sft) so
background load hits both alike.
"""

import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OBJECTIVES = ("sft", "dpo")


def worker(objective: str, steps: int, out: str) -> None:
    from pg_tune.config import load_recipe
    from pg_tune.models.family import load_family
    from pg_tune.train.loop import train

    recipe_path = Path(out) / "recipe.yaml"
    recipe_path.write_text(
        f"output_dir: {out}/run\n"
        "model: {name_or_path: bench-mini, dtype: float32}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0, targets: attention_mlp}\n"
        "data: {train: [{format: shapes, num_samples: 256, pairs: true}], max_text_length: 16}\n"
        f"train: {{objective: {objective}, max_steps: {steps}, batch_size: 4, lr: 1.0e-4, log_every: 4,"
        " mixed_precision: 'no'}\n"
        "eval: {before_training: false}\n"
    )
    recipe, resolved = load_recipe(recipe_path)
    train(recipe, resolved, load_family(recipe.model.name_or_path))
    records = [json.loads(x) for x in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > 4]
    result = {
        "objective": objective,
        "samples_per_s": statistics.median(windows),
        "windows": windows,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "first_loss": records[0]["loss"],
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    reps, steps = int(sys.argv[1]), int(sys.argv[2])
    results: dict[str, list[dict]] = {k: [] for k in OBJECTIVES}
    for rep in range(reps):
        for objective in OBJECTIVES if rep % 2 == 0 else OBJECTIVES[::-1]:
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, __file__, "--worker", objective, str(steps), out]
                p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(p.stdout[-3000:], p.stderr[-3000:])
                raise SystemExit(objective)
            r = json.loads(line[7:])
            results[objective].append(r)
            print(f"rep {rep + 1} {objective}: {r['samples_per_s']:.3f} samples/s, peak RSS {r['peak_rss_gb']:.2f} GB, "
                  f"windows {[round(w, 3) for w in r['windows']]}", flush=True)  # fmt: skip

    def summary(rs: list[dict]) -> tuple[float, float, float]:
        median = statistics.median(w for r in rs for w in r["windows"])
        return median, max(w for r in rs for w in r["windows"]), max(r["peak_rss_gb"] for r in rs)

    sft = summary(results["sft"])
    head = f"{'objective':<10} {'samples/s median':>17} {'x SFT':>6} {'best':>7} {'x SFT':>6} {'peak RSS GB':>12} {'x SFT':>6}"
    print("\n" + head)
    for name, rs in results.items():
        median, best, rss = summary(rs)
        print(
            f"{name:<10} {median:>17.3f} {median / sft[0]:>6.2f} {best:>7.3f} {best / sft[1]:>6.2f} "
            f"{rss:>12.2f} {rss / sft[2]:>6.2f}"
        )
    Path(sys.argv[3] if len(sys.argv) > 3 else "dpo_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
