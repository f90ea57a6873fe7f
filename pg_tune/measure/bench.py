"""pg_tune's training step against the reference Hugging Face recipe, on the same machine.

    python -m pg_tune.measure.bench --preset bench-mini --steps 8 --reps 3
    python -m pg_tune.measure.bench --preset paligemma2-3b-224-shape --device cuda --batch-size 8

The reference is the recipe of the transformers docs and the HF PaliGemma fine-tuning posts:
``PaliGemmaProcessor(text, images, suffix=...)`` in a collate function, peft LoRA,
``transformers.Trainer``, the model's own loss over full-sequence logits. Both sides get the same
random-weight model (a tiny preset of any family, ``pg_tune.models.tiny``), the same JPEG files and texts, batch size,
precision, LoRA rank and targets, optimizer (AdamW, grad clip 1.0) and DataLoader workers.

Each repetition runs each side in its own subprocess, alternating which goes first, so peak memory
is measured per side (RSS never falls back within a process; on CUDA
``torch.cuda.max_memory_allocated``) and background load hits both sides alike. Timing covers
``--steps`` steps after ``--warmup`` steps, data loading included.

The table reports samples/s and tokens/s (non-padding tokens, image tokens included), median and
range over repetitions, peak memory, the ratios pg_tune / reference, and the fraction of the
machine's measured matmul peak that the step reaches: model FLOPs of one step (vision forward,
LM forward + activation backward, head forward + backward on supervised positions only; the same
useful work for both sides) times steps/s, over a dense fp32 (CPU) or bf16 (CUDA) matmul measured
here with the same threads. On CUDA that fraction is MFU against the measured, not the datasheet,
peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pg_tune.config.recipe import DataConfig
from pg_tune.measure.bench_setup import (
    base_model,
    bench_recipe,
    first_loss_tolerance,
    make_samples,
    shape_of,
    step_mark,
    sync,
)

SIDES = ("pg_tune", "reference")


@dataclass
class SideResult:
    side: str
    batch_size: int
    samples_per_s: float
    tokens_per_s: float
    peak_memory_gb: float
    memory_kind: str
    step_gflop: float
    seconds: float
    best_step_s: float
    first_loss: float
    trainable_params: int = 0
    cpu_s_per_step: float = 0.0
    """Median CPU seconds (all threads) per timed step: the step's work, whatever else runs here."""


# --------------------------------------------------------------------------------------------------
# FLOPs of one step (matmuls only; elementwise work is small next to them)


def step_flops(
    config,
    batch_size: int,
    seq_len: int,
    supervised: int,
    vision_trainable: bool = False,
    vision_cached: bool = False,
    vision_passes: int | None = None,
) -> float:
    """Model FLOPs of one training step of a LoRA'd vision-language model (frozen base, frozen head).

    ``config`` has a SigLIP-style ``vision_config`` and a decoder ``text_config`` (every registered
    family). ``vision_passes``: images (or tiles) the encoder ran on, default one per row.
    ``vision_cached``: image features come from the feature cache, so the encoder costs nothing.
    """
    v, t = config.vision_config, config.text_config
    n_img = (v.image_size // v.patch_size) ** 2
    vision = 2 * n_img * 3 * v.patch_size**2 * v.hidden_size
    per_layer = 2 * n_img * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    per_layer += 2 * 2 * n_img * n_img * v.hidden_size  # scores + weighted sum
    vision += v.num_hidden_layers * per_layer + 2 * n_img * v.hidden_size * t.hidden_size
    passes = batch_size if vision_passes is None else vision_passes
    vision *= passes * (3 if vision_trainable else 1) * (0 if vision_cached else 1)
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    lm_token = 2 * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    lm_token += 2 * 2 * seq_len * q
    lm = 2 * t.num_hidden_layers * lm_token * batch_size * seq_len  # forward + activation backward
    head = 2 * 2 * supervised * t.hidden_size * t.vocab_size
    return float(vision + lm + head)


def matmul_peak_gflops(device: str, seconds: float = 1.5) -> float:
    """Best dense-matmul rate here: fp32 on CPU, bf16 on CUDA (the bench's own threads)."""
    import torch

    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _peak_memory_gb(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9, "max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "peak RSS"  # ru_maxrss is KiB on Linux


# --------------------------------------------------------------------------------------------------
# The two sides, each run in its own worker process


def _run_pg_tune(args, samples, device: str, family) -> tuple[list[float], list, float]:
    import torch

    from pg_tune.data.loader import build_train_loader, prepare_feature_cache
    from pg_tune.train.adapters import prepare_model
    from pg_tune.train.loss import SuffixLoss
    from pg_tune.train.optim import build_optimizer

    recipe = bench_recipe(args)
    model, processor = base_model(args, device, family)
    model = prepare_model(model, recipe, family)
    cache = prepare_feature_cache(samples, model, processor, recipe, family)
    loader = build_train_loader(samples, processor, recipe, family, feature_cache=cache)
    loss_module = SuffixLoss(model, family).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, recipe.train)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    marks, tokens, first_loss = [], [], float("nan")
    _run_pg_tune.trainable_params = sum(p.numel() for p in trainable)
    batches = _endless(loader)
    marks.append(step_mark(device))
    for step in range(args.warmup + args.steps):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with autocast:
            loss_sum, count = loss_module(batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            first_loss = float(loss_sum.detach() / count)
        marks.append(step_mark(device))
        tokens.append(shape_of(batch))
    return marks, tokens, first_loss


def _endless(loader):
    while True:
        yield from loader


def run_side(args) -> SideResult:
    """One side in this process: build, warm up, time ``args.steps`` steps, report."""
    import torch

    from pg_tune.measure.bench_reference import run_reference
    from pg_tune.models.family import family_for

    device = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_dir = Path(args.data_dir)
    samples = make_samples(data_dir, args.samples)
    family = family_for(args.preset)
    runner = _run_pg_tune if args.side == "pg_tune" else run_reference
    marks, tokens, first_loss = runner(args, samples, device, family)
    timed = [wall for wall, _ in marks[args.warmup :]]
    cpu = [cpu for _, cpu in marks[args.warmup :]]
    seconds = timed[-1] - timed[0]
    steps = len(timed) - 1
    shapes = tokens[args.warmup :]
    cached = args.side == "pg_tune" and bool(args.feature_cache)
    tiny = family.tiny_module
    config = tiny.build_config(tiny.PRESETS[args.preset])
    flops = statistics.mean(
        step_flops(config, args.batch_size, length, sup, vision_cached=cached, vision_passes=passes)
        for _, length, sup, passes in shapes
    )
    peak, kind = _peak_memory_gb(device)
    return SideResult(
        side=args.side,
        batch_size=args.batch_size,
        samples_per_s=steps * args.batch_size / seconds,
        tokens_per_s=sum(n for n, *_ in shapes) / seconds,
        peak_memory_gb=peak,
        memory_kind=kind,
        step_gflop=flops / 1e9,
        seconds=seconds,
        best_step_s=min(b - a for a, b in itertools.pairwise(timed)),
        first_loss=first_loss,
        trainable_params=getattr(runner, "trainable_params", 0),
        cpu_s_per_step=statistics.median(b - a for a, b in itertools.pairwise(cpu)),
    )


# --------------------------------------------------------------------------------------------------
# The driver: alternate sides in subprocesses, then print the table


def _worker_command(args, side: str, data_dir: str) -> list[str]:
    cmd = [sys.executable, "-m", "pg_tune.measure.bench", "--worker", side, "--data-dir", data_dir]
    for name in ("preset", "steps", "warmup", "batch_size", "threads", "device", "dtype", "lora_r"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += [
        "--num-workers",
        str(args.num_workers),
        "--samples",
        str(args.samples),
        "--optimizer",
        args.optimizer,
        "--pad-to-multiple-of",
        str(args.pad_to_multiple_of),
    ]
    cmd += ["--method", args.method, "--partial-groups", args.partial_groups]
    for flag in ("use_dora", "use_rslora", "full_vision", "compile"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    if args.group_by_length:
        cmd.append("--group-by-length")
    if args.feature_cache:
        cmd += ["--feature-cache", args.feature_cache]
    return cmd


def _method_label(args) -> str:
    if args.method == "full":
        return "full" + (" + vision" if args.full_vision else "")
    if args.method == "partial":
        return f"partial [{args.partial_groups}]"
    return (
        "LoRA"
        + (" + torch.compile" if getattr(args, "compile", False) else "")
        + (" + DoRA" if args.use_dora else "")
        + (" + rsLoRA" if args.use_rslora else "")
        + f" r={args.lora_r}"
    )


def same_training(results: dict[str, list[SideResult]], args, vocab: int) -> tuple[bool, str]:
    """Whether both sides trained the same thing on the same batch: equal first losses (within a
    tolerance from their size, ``first_loss_tolerance``) and equal trainable-parameter counts.
    Returns (proved, the line that says so or why not)."""
    ours, ref = results.get("pg_tune", []), results.get("reference", [])
    if not ours or not ref:
        return True, "one side only: nothing to compare"
    if args.group_by_length:
        return (
            True,
            "first losses not compared: --group-by-length reorders pg_tune's rows (another first batch)",
        )
    a, b = ours[0].first_loss, ref[0].first_loss
    tolerance = first_loss_tolerance(args.dtype, vocab, b)
    drift = max(abs(r.first_loss - a) for r in ours) + max(abs(r.first_loss - b) for r in ref)
    counts = f"trainable parameters {ours[0].trainable_params:,} vs {ref[0].trainable_params:,}"
    lora_alike = args.method == "lora" and not args.use_dora
    line = (
        f"first loss on the same batch: pg_tune {a:.6f} vs reference {b:.6f} (|diff| {abs(a - b):.2g}, "
        f"tolerance {tolerance:.2g} from {'bf16 logits' if args.dtype == 'bfloat16' else 'fp32 vocabulary sums'}"
        f"{f'; repetitions drift {drift:.2g}' if drift else ''}); {counts}"
    )
    if abs(a - b) > tolerance:
        return False, "NOT the same training: " + line
    if lora_alike and ours[0].trainable_params != ref[0].trainable_params:
        return False, "NOT the same adapter: " + line
    return True, "same training: " + line


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:8.2f} ({min(values):.2f}-{max(values):.2f})"


def format_table(results: dict[str, list[SideResult]], peak_gflops: float, device: str) -> str:
    """The comparison table: medians over repetitions (min-max), ratios pg_tune / reference."""
    lines = []
    head = f"{'side':<10} {'samples/s (min-max)':>24} {'tokens/s':>10} {'peak mem GB':>12} {'GFLOP/step':>11}"
    head += f" {'% of matmul peak':>17} {'best-step samples/s':>20} {'CPU s/step':>11}"
    lines += [head, "-" * len(head)]
    summary = {}
    for side in SIDES:
        runs = results.get(side, [])
        if not runs:
            continue
        sps = [r.samples_per_s for r in runs]
        tps = statistics.median(r.tokens_per_s for r in runs)
        mem = max(r.peak_memory_gb for r in runs)
        gflop = statistics.median(r.step_gflop for r in runs)
        achieved = statistics.median(r.samples_per_s / r.batch_size * r.step_gflop for r in runs)
        frac = 100 * achieved / peak_gflops if peak_gflops else float("nan")
        # The fastest single step: what the step costs when no other process takes the cores.
        best = max(r.batch_size / r.best_step_s for r in runs)
        # CPU seconds per step: the step's work, unaffected by other jobs taking turns on the cores.
        cpu = statistics.median(r.cpu_s_per_step for r in runs)
        summary[side] = (statistics.median(sps), tps, mem, best, cpu)
        lines.append(
            f"{side:<10} {_spread(sps):>24} {tps:10.0f} {mem:12.2f} {gflop:11.1f} {frac:16.1f}% {best:20.2f}"
            f" {cpu:11.3f}"
        )
    if len(summary) == 2:
        (a, at, am, ab, ac), (b, bt, bm, bb, bc) = summary["pg_tune"], summary["reference"]
        lines.append(
            f"{'ratio':<10} {a / b:>24.2f} {at / bt:10.2f} {am / bm:12.2f} {'':11} {'':17} {ab / bb:20.2f}"
            f" {ac / bc if bc else float('nan'):11.2f}"
        )
    mem_kind = next(iter(results.values()))[0].memory_kind if results else ""
    lines.append(
        f"device {device}; matmul peak {peak_gflops:.0f} GFLOP/s measured here; memory = {mem_kind} per side; "
        "ratio = pg_tune / reference"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        default="bench-mini",
        help="a tiny preset of any family: bench-mini (PaliGemma), gemma3-bench-mini, smolvlm2-bench-mini",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repetition and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (each runs both sides)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (both sides)")
    parser.add_argument("--samples", type=int, default=32, help="distinct images/rows in the data")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    parser.add_argument("--group-by-length", action="store_true", help="pg_tune side: data.group_by_length")
    parser.add_argument(
        "--pad-to-multiple-of",
        type=int,
        default=DataConfig.pad_to_multiple_of,
        help="pg_tune side: data.pad_to_multiple_of (1: the longest row)",
    )
    parser.add_argument(
        "--method",
        default="lora",
        choices=["lora", "full", "partial"],
        help="pg_tune side: the recipe's method",
    )
    parser.add_argument(
        "--partial-groups", default="attention", help="pg_tune side, --method partial: groups"
    )
    parser.add_argument(
        "--full-vision", action="store_true", help="pg_tune side, --method full: train SigLIP"
    )
    parser.add_argument("--use-dora", action="store_true", help="pg_tune side: lora.use_dora")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="pg_tune side: train.compile (torch.compile the decoder layers)",
    )
    parser.add_argument("--use-rslora", action="store_true", help="pg_tune side: lora.use_rslora")
    parser.add_argument("--feature-cache", default=None, help="pg_tune side: data.feature_cache directory")
    parser.add_argument("--sides", default="pg_tune,reference", help="comma-separated subset of the sides")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: where pg_tune's step spends its time (pg_tune.measure.bench_profile)",
    )
    parser.add_argument(
        "--ops",
        type=int,
        default=0,
        help="with --profile: also the top N operators over the timed steps, and the time by operator class",
    )
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        args.side = args.worker
        print("RESULT " + json.dumps(asdict(run_side(args))), flush=True)
        return 0

    torch.set_num_threads(args.threads)
    if args.profile:
        return _profile(args)
    sides = [s for s in args.sides.split(",") if s]
    peak = matmul_peak_gflops(args.device)
    results: dict[str, list[SideResult]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="pg_tune_bench_data_") as data_dir:
        for rep in range(args.reps):
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                proc = subprocess.run(_worker_command(args, side, data_dir), capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"bench: the {side} worker failed (exit {proc.returncode})")
                result = SideResult(**json.loads(line.removeprefix("RESULT ")))
                results[side].append(result)
                print(
                    f"rep {rep + 1}/{args.reps} {side:<9} {result.samples_per_s:6.2f} samples/s  "
                    f"CPU {result.cpu_s_per_step:.3f} s/step  "
                    f"peak {result.peak_memory_gb:.2f} GB  first loss {result.first_loss:.4f}  "
                    f"trainable {result.trainable_params:,}",
                    flush=True,
                )
    print()
    print(
        f"preset {args.preset}, batch {args.batch_size}, {args.dtype}, reference: LoRA r={args.lora_r} attention+MLP; "
        f"pg_tune: {_method_label(args)}"
    )
    print(
        f"{args.threads} threads, {args.steps} timed steps x {args.reps} reps; load average {os.getloadavg()[0]:.1f}"
    )
    from pg_tune.models.family import family_for

    tiny = family_for(args.preset).tiny_module
    vocab = tiny.build_config(tiny.PRESETS[args.preset]).get_text_config().vocab_size
    proved, verdict = same_training(results, args, vocab)
    print(verdict)
    print(format_table(results, peak, args.device))
    if args.json:
        record = {
            "peak_gflops": peak,
            "args": vars(args),
            **{s: [asdict(r) for r in rs] for s, rs in results.items()},
        }
        record["same_training"] = {"proved": proved, "verdict": verdict}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0 if proved else 1


def _profile(args) -> int:
    """``--profile``: the step's breakdown by part (and ``--ops`` operators), in this process."""
    import torch

    from pg_tune.measure.bench_profile import format_profile, profile_pg_tune, top_operators
    from pg_tune.models.family import family_for

    torch.manual_seed(0)
    family = family_for(args.preset)
    with tempfile.TemporaryDirectory(prefix="pg_tune_bench_data_") as data_dir:
        samples = make_samples(Path(data_dir), args.samples)
        times = profile_pg_tune(args, samples, args.device, family)
        print(
            f"preset {args.preset}, batch {args.batch_size}, {args.dtype}, {args.threads} threads, "
            f"{args.steps} steps after {args.warmup}; load average {os.getloadavg()[0]:.1f}"
        )
        print(format_profile(times, args.batch_size))
        if args.ops:
            print(top_operators(args, samples, args.device, family, args.ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
