"""What each training method costs on bench-mini: trainable parameters and step time, alternating.

    PYTHONPATH=. python benchmarks/methods_bench.py REPS STEPS [OUT.json]     # e.g. 2 6

Each method runs pg_tune's training step (``python -m pg_tune.measure.bench --worker pg_tune``: same
data, batch 4, fp32, AdamW) in its own process; the order alternates between repetitions
(forward, then reversed) so background load hits every method alike. Ratios are to LoRA r=8.
"""

import json
import statistics
import subprocess
import sys
import tempfile

CONFIGS = {
    "lora r8": ["--method", "lora"],
    "dora r8": ["--method", "lora", "--use-dora"],
    "rslora r8": ["--method", "lora", "--use-rslora"],
    "partial [attention]": ["--method", "partial", "--partial-groups", "attention"],
    "partial [attention,projector]": ["--method", "partial", "--partial-groups", "attention,projector"],
    "full": ["--method", "full"],
    "full + vision": ["--method", "full", "--full-vision"],
}
reps, steps = int(sys.argv[1]), int(sys.argv[2])
results = {k: [] for k in CONFIGS}
with tempfile.TemporaryDirectory() as data_dir:
    for rep in range(reps):
        order = list(CONFIGS) if rep % 2 == 0 else list(CONFIGS)[::-1]
        for name in order:
            cmd = [
                sys.executable,
                "-m",
                "pg_tune.measure.bench",
                "--worker",
                "pg_tune",
                "--data-dir",
                data_dir,
                "--preset",
                "bench-mini",
                "--steps",
                str(steps),
                "--warmup",
                "1",
                "--batch-size",
                "4",
                "--threads",
                "2",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--lora-r",
                "8",
                "--num-workers",
                "0",
                "--samples",
                "32",
                "--optimizer",
                "adamw",
                *CONFIGS[name],
            ]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(p.stdout[-3000:], p.stderr[-3000:])
                raise SystemExit(name)
            r = json.loads(line[7:])
            results[name].append(r)
            print(
                f"rep {rep + 1} {name:<32} {r['samples_per_s']:.2f} samples/s best step {r['best_step_s']:.3f}s "
                f"trainable {r['trainable_params']:,} peak {r['peak_memory_gb']:.2f} GB loss0 {r['first_loss']:.3f}",
                flush=True,
            )
base = statistics.median(r["samples_per_s"] for r in results["lora r8"])
base_best = min(r["best_step_s"] for r in results["lora r8"])
print(
    f"\n{'method':<32} {'trainable':>14} {'samples/s med':>14} {'x LoRA':>7} {'best step s':>12} {'x LoRA':>7} {'peak GB':>8}"
)
for name, rs in results.items():
    sps = statistics.median(r["samples_per_s"] for r in rs)
    best = min(r["best_step_s"] for r in rs)
    print(
        f"{name:<32} {rs[0]['trainable_params']:>14,} {sps:>14.2f} {sps / base:>7.2f} {best:>12.3f} {best / base_best:>7.2f} {max(r['peak_memory_gb'] for r in rs):>8.2f}"
    )
json.dump(results, open(sys.argv[3] if len(sys.argv) > 3 else "methods.json", "w"), indent=1)
