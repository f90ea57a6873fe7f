"""pg_tune's bench-mini step beside ms-swift's LoRA SFT of the same model and data, alternating.

    python -m venv --system-site-packages /work/venvs/swift && /work/venvs/swift/bin/pip install ms-swift==4.6.0
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/peer_swift.py --swift-python /work/venvs/swift/bin/python \\
        --threads 1 --steps 6 --warmup 2 --reps 3

ms-swift lives in its own virtualenv (it pins other transformers / peft versions than pg_tune), never
in pg_tune's dependencies. Both sides train the ``bench-mini`` checkpoint (saved once), on the same
32 JPEGs and texts as ``pg_tune.measure.bench`` (prompt ~10 tokens, suffix 15-23 words), batch 4,
fp32, LoRA r=8 alpha 16 on the language model's attention + MLP (the same regex), AdamW lr 1e-4,
grad clip 1.0, no DataLoader workers, one micro-batch per optimizer step (ms-swift's default would
accumulate 16 / batch of them), the rows in file order (so step 1 is the same batch on both sides).
ms-swift runs ``swift sft`` (its PaliGemma template, its own loss) twice per repetition: with its
default gradient checkpointing and without it; its best configuration is the one with the least CPU
time per sample. pg_tune runs ``pg_tune.measure.bench``'s worker. Every run is its own process (peak
RSS per process), the order rotating between repetitions; samples/s counts the steps after
``--warmup``, timed at each optimizer step's end.

Each run reports its step-1 loss and trainable-parameter count, printed side by side at the end.
Both sides feed the same tokens, labels and pixels; ms-swift 4.6.0's PaliGemma template gives the
prompt's final newline ``token_type_ids`` 1 (causal) where transformers' ``PaliGemmaProcessor``
and pg_tune give it 0 (prefix, bidirectional), so the first losses differ in the fifth decimal.
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

# Runs inside ms-swift's interpreter. A TrainerCallback added to every Trainer's callback handler:
# at train start it counts the model's trainable parameters (the callback receives ``model``) and
# the samples one optimizer step takes (batch x gradient accumulation); it times each optimizer
# step's end (wall and this process's CPU seconds), keeps the loss the Trainer logs at step 1, and
# the shapes ms-swift's first forward receives (sequence length, logits positions kept).
SWIFT_WORKER = textwrap.dedent(
    """
    import json, resource, sys, time
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
    report = {"marks": [], "cpu": [], "first_loss": None}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            report["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            report["samples_per_step"] = (
                args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            )

            def first_forward(module, positional, kwargs):
                ids = kwargs.get("input_ids")
                report["input_shape"] = list(ids.shape) if ids is not None else None
                report["logits_to_keep"] = repr(kwargs.get("logits_to_keep"))
                handle.remove()

            handle = model.register_forward_pre_hook(first_forward, with_kwargs=True)

        def on_step_end(self, args, state, control, **kw):
            report["marks"].append(time.perf_counter())
            report["cpu"].append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == 1 and logs and "loss" in logs:
                report["first_loss"] = float(logs["loss"])

    original_init = CallbackHandler.__init__
    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        self.add_callback(Probe())
    CallbackHandler.__init__ = init
    try:
        from swift.pipelines import sft_main  # ms-swift 4.x
    except ImportError:
        from swift.cli.sft import sft_main  # 3.x
    sft_main(sys.argv[1:])
    report["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print("RESULT " + json.dumps(report), flush=True)
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
        "--train_dataloader_shuffle", "false",  # rows in file order, as pg_tune's bench reads them
        "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
        "--target_regex", regex,
        "--torch_dtype", "float32", "--per_device_train_batch_size", str(args.batch_size),
        # ms-swift's default accumulates 16 / batch micro-batches per optimizer step; one, as pg_tune
        "--gradient_accumulation_steps", "1",
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


def swift_result(r: dict, args) -> dict:
    """ms-swift's report as samples/s, CPU s/step and peak RSS over the steps after the warm-up.

    samples/s counts the samples one optimizer step takes as ms-swift's Trainer was configured
    (batch x gradient accumulation x processes), not the batch the command asked for.
    """
    start = args.warmup - 1 if args.warmup else 0
    timed, cpu = r["marks"][start:], r["cpu"][start:]
    per_step = r.get("samples_per_step") or args.batch_size
    return {
        "samples_per_s": (len(timed) - 1) * per_step / (timed[-1] - timed[0]),
        "cpu_s_per_step": statistics.median(b - a for a, b in itertools.pairwise(cpu)),
        "peak_memory_gb": r["peak_memory_gb"],
        "first_loss": r.get("first_loss"),
        "trainable_params": r.get("trainable_params"),
        "samples_per_step": per_step,
        "input_shape": r.get("input_shape"),
        "logits_to_keep": r.get("logits_to_keep"),
    }


def compare_first_steps(ours: dict, theirs: dict, name: str, tolerance: float) -> list[str]:
    """Lines saying whether both sides trained the same thing at step 1: the samples one step
    takes, the trainable-parameter counts and the first losses (equal, within ``tolerance``, or not)."""
    lines = []
    a, b = ours["samples_per_step"], theirs["samples_per_step"]
    same = "equal" if a == b else "DIFFERENT: the first losses average unlike batches"
    lines.append(f"samples per optimizer step: pg_tune {a} vs {name} {b} ({same})")
    a, b = ours["trainable_params"], theirs["trainable_params"]
    same = "equal" if a == b else "DIFFERENT: the two sides do not train the same parameters"
    lines.append(f"trainable parameters: pg_tune {a:,} vs {name} {b if b is None else f'{b:,}'} ({same})")
    a, b = ours["first_loss"], theirs["first_loss"]
    if b is None:
        lines.append(f"first loss: pg_tune {a:.8f} vs {name} not logged (NOT compared)")
        return lines
    gap = abs(a - b)
    if gap == 0:
        verdict = "identical"
    elif gap <= tolerance:
        verdict = f"NOT identical, within the fp32 tolerance {tolerance:.1e}"
    else:
        verdict = f"DIFFERENT beyond the fp32 tolerance {tolerance:.1e}: not the same loss"
    lines.append(f"first loss: pg_tune {a:.8f} vs {name} {b:.8f} (|difference| {gap:.2e}; {verdict})")
    return lines


def rep_ratios(results: dict[str, list[dict]]) -> list[str]:
    """Per repetition, pg_tune against each ms-swift configuration of the same repetition: wall
    samples/s (pg_tune / side), CPU seconds per sample (side / pg_tune), peak RSS (pg_tune / side)."""
    lines = [f"{'ratios per repetition':<34} samples/s  CPU s/sample  peak RSS"]
    for rep, ours in enumerate(results["pg_tune"]):
        for side in (s for s in results if s != "pg_tune"):
            theirs = results[side][rep]
            cpu = (theirs["cpu_s_per_step"] / theirs["samples_per_step"]) / (
                ours["cpu_s_per_step"] / ours["samples_per_step"]
            )
            lines.append(
                f"rep {rep + 1} pg_tune / {side:<24} {ours['samples_per_s'] / theirs['samples_per_s']:8.2f}x"
                f"  {cpu:11.2f}x  {ours['peak_memory_gb'] / theirs['peak_memory_gb']:7.2f}x"
            )
    return lines


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

    from pg_tune.measure.bench_setup import first_loss_tolerance
    from pg_tune.models.family import family_for

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {"pg_tune": [], "swift": [], "swift (no checkpointing)": []}
    with tempfile.TemporaryDirectory(prefix="peer_swift_") as work:
        work = Path(work)
        checkpoint = family_for(args.preset).save_tiny(args.preset, work / "model")
        vocab = json.loads((checkpoint / "config.json").read_text())["text_config"]["vocab_size"]
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
                        key: r[key]
                        for key in ("samples_per_s", "cpu_s_per_step", "peak_memory_gb", "first_loss")
                    }
                    result["trainable_params"] = r["trainable_params"]
                    result["samples_per_step"] = r["batch_size"]
                else:
                    command = swift_command(args, checkpoint, data, work / "out", side == "swift")
                    result = swift_result(run(command, env), args)
                result["load_average"] = os.getloadavg()[0]
                results[side].append(result)
                loss = result["first_loss"]
                print(
                    f"rep {rep + 1}/{args.reps} {side:<26} {result['samples_per_s']:6.2f} samples/s  "
                    f"CPU {result['cpu_s_per_step']:.3f} s/step  "
                    f"peak {result['peak_memory_gb']:.2f} GB  load {result['load_average']:.1f}  "
                    f"first loss {'-' if loss is None else f'{loss:.8f}'}  "
                    f"trainable {result['trainable_params']}  samples/step {result['samples_per_step']}"
                    + (f"  first batch {result['input_shape']}" if side != "pg_tune" else "")
                    + (f" logits_to_keep {result['logits_to_keep']}" if side != "pg_tune" else ""),
                    flush=True,
                )
    print(
        f"\npreset {args.preset}, batch {args.batch_size}, fp32, LoRA r=8 attention+MLP, {args.threads} threads"
    )
    summary = {}
    for side, runs in results.items():
        sps = [r["samples_per_s"] for r in runs]
        cpu = statistics.median(r["cpu_s_per_step"] for r in runs)
        per_sample = statistics.median(r["cpu_s_per_step"] / r["samples_per_step"] for r in runs)
        summary[side] = (statistics.median(sps), max(r["peak_memory_gb"] for r in runs), per_sample)
        print(
            f"{side:<26} {summary[side][0]:6.2f} samples/s ({min(sps):.2f}-{max(sps):.2f})  "
            f"CPU {cpu:.3f} s/step ({per_sample:.3f} s/sample)  peak {summary[side][1]:.2f} GB"
        )
    print("\n".join(rep_ratios(results)))
    # Did both sides train the same thing? Each side's first step is the same batch in every
    # repetition (rows in file order, fixed seeds), so the repetitions' first losses must agree.
    for side, runs in results.items():
        losses = {r["first_loss"] for r in runs}
        if len(losses) > 1:
            print(f"{side}: first losses differ between repetitions: {sorted(losses, key=str)}")
    for side in (s for s in results if s != "pg_tune"):
        ours, theirs = results["pg_tune"][0], results[side][0]
        tolerance = first_loss_tolerance("float32", vocab, ours["first_loss"])
        for line in compare_first_steps(ours, theirs, side, tolerance):
            print(f"{side}: {line}")
    # ms-swift's best configuration: the one with the least work per sample (CPU seconds), which
    # other jobs on the machine do not change; wall samples/s printed beside it.
    best = min((s for s in summary if s != "pg_tune"), key=lambda s: summary[s][2])
    ours, theirs = summary["pg_tune"], summary[best]
    print(
        f"pg_tune / ms-swift's best ({best}): {theirs[2] / ours[2]:.2f}x less CPU time per sample, "
        f"{ours[0] / theirs[0]:.2f}x samples/s (wall), at {ours[1] / theirs[1]:.2f}x peak RSS"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
