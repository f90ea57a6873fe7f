"""pg_tune's bench-mini step beside ms-swift's LoRA SFT of the same model and data, alternating.

    python -m venv --system-site-packages /work/venvs/swift && /work/venvs/swift/bin/pip install ms-swift==4.6.0
    PYTHONPATH=. python benchmarks/peer_swift.py --swift-python /work/venvs/swift/bin/python --steps 8 --reps 3

ms-swift lives in its own virtualenv (it pins other transformers / peft versions than pg_tune), never
in pg_tune's dependencies. Both sides train the ``bench-mini`` checkpoint (saved once), on the same
32 JPEGs and texts as ``pg_tune.measure.bench`` (prompt ~10 tokens, suffix 15-23 words), batch 4,
fp32, LoRA r=8 alpha 16 on the language model's attention + MLP (the same regex), AdamW lr 1e-4,
grad clip 1.0, no DataLoader workers. ms-swift runs ``swift sft`` (its PaliGemma template, its own
loss) twice per repetition: with its default gradient checkpointing and without it; its best
configuration is the faster one. pg_tune runs ``pg_tune.measure.bench``'s worker. Every run is its
own process (peak RSS per process), the order rotating between repetitions; samples/s counts the
steps after ``--warmup``, timed at each optimizer step's end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Runs inside ms-swift's interpreter: times each optimizer step through the Trainer's callback
# handler (every Trainer calls it once per step) and reports them with the peak RSS.
SWIFT_WORKER = textwrap.dedent(
    """
    import json, resource, sys, time
    from transformers.trainer_callback import CallbackHandler
    marks, cpu = [], []
    original = CallbackHandler.on_step_end
    def on_step_end(self, *a, **kw):
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        return original(self, *a, **kw)
    CallbackHandler.on_step_end = on_step_end
    try:
        from swift.pipelines import sft_main  # ms-swift 4.x
    except ImportError:
        from swift.cli.sft import sft_main  # 3.x
    sft_main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps({"marks": marks, "cpu": cpu, "peak_memory_gb": peak}), flush=True)
    """
)


def write_data(root: Path, count: int) -> Path:
    """The bench's samples as ms-swift's multimodal JSONL (messages + images)."""
    from pg_tune.measure.bench_setup import make_samples

    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>" + s.prefix},
                {"role": "assistant", "content": s.suffix},
            ],
            "images": [str(s.image)],
        }
        for s in make_samples(root, count)
    ]
    path = root / "swift.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def swift_command(args, checkpoint: Path, data: Path, out: Path, checkpointing: bool) -> list[str]:
    from pg_tune.config.recipe import LoraConfig
    from pg_tune.models.family import family_for

    regex = family_for(args.preset).lora_target_regex(LoraConfig(r=8, targets="attention_mlp"))
    return [
        args.swift_python, "-c", SWIFT_WORKER,
        "--model", str(checkpoint), "--model_type", "paligemma", "--template", "paligemma",
        "--dataset", str(data), "--split_dataset_ratio", "0", "--dataset_shuffle", "false",
        "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--target_regex", regex,
        "--torch_dtype", "float32", "--per_device_train_batch_size", str(args.batch_size),
        "--max_steps", str(args.warmup + args.steps), "--learning_rate", "1e-4",
        "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--max_grad_norm", "1.0",
        "--gradient_checkpointing", str(checkpointing).lower(), "--dataloader_num_workers", "0",
        "--max_length", "512", "--output_dir", str(out), "--save_strategy", "no", "--logging_steps", "1",
        "--report_to", "none", "--seed", "0", "--use_cpu", "true",
    ]  # fmt: skip


def run(command: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"peer_swift: {command[0]} failed (exit {done.returncode})")
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--swift-python", required=True, help="the interpreter of ms-swift's virtualenv")
    parser.add_argument("--preset", default="bench-mini")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from pg_tune.models.family import family_for

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {"pg_tune": [], "swift": [], "swift (no checkpointing)": []}
    with tempfile.TemporaryDirectory(prefix="peer_swift_") as work:
        work = Path(work)
        checkpoint = family_for(args.preset).save_tiny(args.preset, work / "model")
        data = write_data(work, 32)
        pg_tune = [
            sys.executable,
            "-m",
            "pg_tune.measure.bench",
            "--worker",
            "pg_tune",
            "--data-dir",
            str(work),
        ]
        pg_tune += ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        pg_tune += ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--samples", "32"]
        pg_tune += ["--device", "cpu", "--dtype", "float32", "--lora-r", "8"]
        sides = list(results)
        for rep in range(args.reps):
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
            for side in order:
                if side == "pg_tune":
                    r = run(pg_tune, env)
                    result = {
                        "samples_per_s": r["samples_per_s"],
                        "cpu_s_per_step": r["cpu_s_per_step"],
                        "peak_memory_gb": r["peak_memory_gb"],
                    }
                else:
                    r = run(swift_command(args, checkpoint, data, work / "out", side == "swift"), env)
                    start = args.warmup - 1 if args.warmup else 0
                    timed, cpu = r["marks"][start:], r["cpu"][start:]
                    seconds = timed[-1] - timed[0]
                    result = {
                        "samples_per_s": (len(timed) - 1) * args.batch_size / seconds,
                        "cpu_s_per_step": statistics.median(b - a for a, b in itertools.pairwise(cpu)),
                        "peak_memory_gb": r["peak_memory_gb"],
                    }
                result["load_average"] = os.getloadavg()[0]
                results[side].append(result)
                print(
                    f"rep {rep + 1}/{args.reps} {side:<26} {result['samples_per_s']:6.2f} samples/s  "
                    f"CPU {result['cpu_s_per_step']:.3f} s/step  "
                    f"peak {result['peak_memory_gb']:.2f} GB  load {result['load_average']:.1f}",
                    flush=True,
                )
    print(
        f"\npreset {args.preset}, batch {args.batch_size}, fp32, LoRA r=8 attention+MLP, {args.threads} threads"
    )
    summary = {}
    for side, runs in results.items():
        sps = [r["samples_per_s"] for r in runs]
        cpu = statistics.median(r["cpu_s_per_step"] for r in runs)
        summary[side] = (statistics.median(sps), max(r["peak_memory_gb"] for r in runs), cpu)
        print(
            f"{side:<26} {summary[side][0]:6.2f} samples/s ({min(sps):.2f}-{max(sps):.2f})  "
            f"CPU {cpu:.3f} s/step  peak {summary[side][1]:.2f} GB"
        )
    # ms-swift's best configuration: the one with the least work per step (CPU seconds), which
    # other jobs on the machine do not change; wall samples/s printed beside it.
    best = min((s for s in summary if s != "pg_tune"), key=lambda s: summary[s][2])
    ours, theirs = summary["pg_tune"], summary[best]
    print(
        f"pg_tune / ms-swift's best ({best}): {theirs[2] / ours[2]:.2f}x less CPU time per step, "
        f"{ours[0] / theirs[0]:.2f}x samples/s (wall), at {ours[1] / theirs[1]:.2f}x peak RSS"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
