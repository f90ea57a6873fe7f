"""pg_tune at a real model size on this machine: memory and step time beside the reference recipe.

    python benchmarks/real_shapes.py --checkpoint /tmp/sizes/pg2-3b-224 --json /tmp/sizes/real.json
    python benchmarks/real_shapes.py --report /tmp/sizes/real.json      # re-print the tables

The checkpoint is a ``python -m pg_tune.models.paligemma.shapes paligemma2-3b-224 DIR`` folder (written if
missing): PaliGemma 2 3B @224's exact config, random bf16 weights, hub layout. Not a test: a 3B
model needs ~7-12 GB of memory and minutes per case on a CPU.

Cases, each side in its own subprocess (peak RSS is per process and never falls), sides
alternating which goes first:

- ``qlora``: base linears of the language model in 4-bit NF4 (bitsandbytes, double quantisation,
  bf16 compute), the rest in bf16; LoRA r=8 on attention + MLP.
- ``lora``: the whole base in bf16; LoRA r=8 on attention + MLP.

``--dtype float32`` makes both sides load the base in fp32 and compute QLoRA in fp32: on a CPU
without fast bf16 kernels (AVX2 only) a bf16 step runs 36-80x slower (docs/performance.md, "CPUs
without fast bf16").

``pg_tune`` runs its real training loop (``pg_tune.train.loop.train``, the base loaded by
``ModelFamily.load_model``); ``reference`` is the Hugging Face recipe (``from_pretrained``, the
family's ``reference_batch`` in a collate function, i.e. ``PaliGemmaProcessor(text, images,
suffix=...)`` for PaliGemma, peft LoRA on the same modules, ``transformers.Trainer``, the model's
own loss). Same checkpoint, same quantization config, same rows in the same order (no shuffling on
either side, so both first losses are the loss of the same row), batch 1, AdamW, no autocast. Each
worker samples its RSS (and its anonymous / file-backed parts) every 0.2 s and reports the peak
while loading and while training.

Then the LoRA run is exported twice, each in its own process: streaming (``pg-tune export``,
``--parity module``) and whole-model (``--parity full``: fp32 base + adapter in memory), and the
export is checked against base + adapter on a few samples (``--verify``). ``pg-tune plan`` is
evaluated on each case's recipe and printed beside the measured peaks.
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
import threading
import time
from pathlib import Path

from pg_tune.models.family import load_family

CASES = ("qlora", "lora")
SIDES = ("pg_tune", "reference")


def rss_parts() -> dict[str, int]:
    """This process's resident memory in bytes: ``VmRSS`` and its ``RssAnon`` / ``RssFile`` parts
    (file-backed pages: memory-mapped checkpoint files, shared libraries)."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                parts[key] = int(value.split()[0]) * 1024
    return parts


class RssSampler:
    """Background sampler of this process's RSS (``/proc/self/status``) with phase marks."""

    def __init__(self, period: float = 0.2):
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.marks: dict[str, float] = {}
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_parts()))
            self._stop.wait(self._period)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def peak_between(self, start: str | None, stop: str | None, part: str = "VmRSS") -> float:
        """Peak GB of ``part`` between two marks (None: the start / end of the process)."""
        lo = self.marks.get(start, 0.0) if start else 0.0
        hi = self.marks.get(stop, float("inf")) if stop else float("inf")
        return max((r[part] for t, r in self.samples if lo <= t <= hi), default=0) / 1e9

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _ru_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


# --------------------------------------------------------------------------------------------------
# Data and recipes


def write_data(root: Path, count: int = 8) -> Path:
    """JSONL rows with JPEGs on disk (bench's texts: prompt ~10 tokens, suffix 15-23 words)."""
    from pg_tune.measure.bench_setup import make_samples

    root.mkdir(parents=True, exist_ok=True)
    path = root / "train.jsonl"
    if not path.exists():
        rows = [
            {"image": Path(s.image).name, "prefix": s.prefix, "suffix": s.suffix}
            for s in make_samples(root, count)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_data(
    case: str,
    checkpoint: str,
    data: Path,
    run_dir: Path,
    steps: int,
    checkpointing: bool = False,
    dtype: str = "bfloat16",
) -> dict:
    return {
        "output_dir": str(run_dir),
        "model": {"name_or_path": checkpoint, "dtype": dtype},
        "quantization": {"mode": "4bit" if case == "qlora" else "none", "bnb_4bit_compute_dtype": dtype},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention_mlp"},
        # In file order on both sides: each side's first loss is the loss of the same first row.
        "data": {"train": [{"format": "jsonl", "path": str(data)}], "max_text_length": 64, "shuffle": False},
        "train": {
            "max_steps": steps,
            "batch_size": 1,
            "lr": 1e-4,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "gradient_checkpointing": checkpointing,
        },
        "eval": {"before_training": False},
    }


# --------------------------------------------------------------------------------------------------
# Workers (one per subprocess)


def worker_recipe_data(args) -> dict:
    """The case's recipe as a worker's arguments give it (both training sides read the same one)."""
    return recipe_data(
        args.case,
        args.checkpoint,
        Path(args.data),
        Path(args.run_dir),
        args.steps,
        args.checkpointing,
        args.dtype,
    )


def worker_pg_tune(args, sampler: RssSampler) -> dict:
    import pg_tune.train.loss as loss
    from pg_tune.config.recipe import parse_recipe, resolved
    from pg_tune.train.loop import train

    recipe = parse_recipe(worker_recipe_data(args))
    family = load_family(recipe.model.name_or_path, recipe.model.vae_path)
    load_model = family.load_model

    def timed_load(*a, **kw):
        model = load_model(*a, **kw)
        sampler.mark("loaded")
        return model

    family.load_model = timed_load  # this instance only: the loop loads through the family it is given
    step_marks: list[tuple[float, float]] = []
    original_forward = loss.SuffixLoss.forward

    def marked_forward(self, batch):
        step_marks.append((time.perf_counter(), time.process_time()))
        return original_forward(self, batch)

    loss.SuffixLoss.forward = marked_forward
    result = train(recipe, resolved(recipe), family, overwrite=True)
    sampler.mark("trained")
    step_marks.append((sampler.marks["trained"], time.process_time()))
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    return {"first_loss": result.first_loss, "step_marks": step_marks, "trainable_params": trainable}


def worker_reference(args, sampler: RssSampler) -> dict:
    import peft
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pg_tune.config.recipe import parse_recipe
    from pg_tune.measure.bench_setup import make_samples
    from pg_tune.models.quantize import bnb_config

    recipe = parse_recipe(worker_recipe_data(args))
    family = load_family(args.checkpoint)
    kwargs = {"quantization_config": bnb_config(recipe.quantization, family)} if args.case == "qlora" else {}
    # What the HF posts do: from_pretrained (memory-mapped safetensors), the family's processor.
    model = family.model_class.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype), **kwargs)
    processor = family.load_processor(recipe.model)
    sampler.mark("loaded")
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=family.lora_target_regex(recipe.lora),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    samples = make_samples(Path(args.data).parent, len(Path(args.data).read_text().splitlines()))

    def collate_fn(examples):
        return family.reference_batch(processor, examples)

    step_marks: list[tuple[float, float]] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            step_marks.append((time.perf_counter(), time.process_time()))

    class InOrderTrainer(Trainer):
        """The rows in file order, as the pg_tune side reads them (``data.shuffle: false``)."""

        def _get_train_sampler(self, *_, **__):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *a, **kw):
            out = super().compute_loss(model, inputs, *a, **kw)
            losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    training_args = TrainingArguments(
        output_dir=args.run_dir,
        per_device_train_batch_size=1,
        max_steps=args.steps,
        gradient_checkpointing=args.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        learning_rate=1e-4,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        remove_unused_columns=False,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    InOrderTrainer(
        model=model, args=training_args, train_dataset=samples, data_collator=collate_fn, callbacks=[Clock()]
    ).train()
    sampler.mark("trained")
    step_marks.append((sampler.marks["trained"], time.process_time()))
    first = losses[0] if losses else float("nan")
    return {"first_loss": first, "step_marks": step_marks, "trainable_params": trainable}


def worker_export(args, sampler: RssSampler) -> dict:
    from pg_tune.export.merged import export_merged

    sampler.mark("loaded")
    start = time.perf_counter()
    parity = {"stream": "module", "full": "full"}[args.mode]
    report = export_merged(args.run_dir, args.out, dtype="bf16", parity=parity, num_samples=2)
    sampler.mark("trained")
    return {"seconds": time.perf_counter() - start, "report_keys": sorted(report)}


def worker_logits(args, sampler: RssSampler) -> dict:
    """Logits on 2 rows of the run's data: exported model alone, or base + adapter (peft)."""
    import peft
    import torch

    from pg_tune.data.bad_rows import BadRows
    from pg_tune.data.build import build_samples
    from pg_tune.export.merged import text_logits
    from pg_tune.export.run import read_run, run_family

    run = read_run(args.run_dir)
    family = run_family(run)
    if args.mode == "exported":
        model = family.model_class.from_pretrained(args.out, dtype=torch.bfloat16)
    else:
        base = family.model_class.from_pretrained(args.checkpoint, dtype=torch.bfloat16)
        model = peft.PeftModel.from_pretrained(base, run.adapter_dir)
    sampler.mark("loaded")
    samples = build_samples(run.recipe.data.train, "eval", BadRows("stop"), seed=0, family=family)[:2]
    processor = family.processor_class.from_pretrained(run.adapter_dir)
    collator = family.collator(processor, run.recipe.data.max_text_length, train=True)
    logits = text_logits(model, [collator([(i, s)]) for i, s in enumerate(samples)], family)
    torch.save(logits, args.logits_out)
    sampler.mark("trained")
    return {}


WORKERS = {
    "pg_tune": worker_pg_tune,
    "reference": worker_reference,
    "export": worker_export,
    "logits": worker_logits,
}


def run_worker(args) -> None:
    # pg_tune's side runs as `pg-tune train` does (huge pages asked for); the reference as HF's posts do.
    if args.worker != "reference":
        from pg_tune.models import host_memory

        host_memory.ask_for_huge_pages()
    import torch

    torch.set_num_threads(args.threads)
    sampler = RssSampler()
    sampler.mark("start")
    extra = WORKERS[args.worker](args, sampler)
    sampler.stop()
    marks = extra.pop("step_marks", [])
    steps = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    cpu_steps = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    out = {
        "peak_rss_gb": _ru_peak_gb(),
        "load_peak_gb": sampler.peak_between("start", "loaded"),
        "train_peak_gb": sampler.peak_between("loaded", "trained"),
        "train_peak_anon_gb": sampler.peak_between("loaded", "trained", "RssAnon"),
        "train_peak_file_gb": sampler.peak_between("loaded", "trained", "RssFile"),
        "load_seconds": sampler.marks.get("loaded", 0) - sampler.marks["start"],
        "step_seconds": steps,
        "step_cpu_seconds": cpu_steps,
        "cpu_seconds": time.process_time(),
        **extra,
    }
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------------
# Driver


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def _wait_for_memory(need_gib: float, what: str, patience_s: float = 900) -> bool:
    deadline = time.time() + patience_s
    while True:
        have = _available_gib()
        if have >= need_gib:
            return True
        if time.time() > deadline:
            print(f"skip {what}: {have:.1f} GiB available < {need_gib} GiB after waiting", flush=True)
            return False
        print(f"waiting for memory before {what}: {have:.1f} GiB available, need {need_gib}", flush=True)
        time.sleep(30)


def _launch(args, worker: str, **kw) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", worker, "--threads", str(args.threads)]
    cmd += ["--checkpoint", args.checkpoint, "--steps", str(args.steps)]
    cmd += ["--checkpointing"] if args.checkpointing else []
    cmd += ["--dtype", args.dtype]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    started = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stdout[-3000:] + proc.stderr[-3000:]).strip()
        print(f"{worker} {kw} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"failed": True, "exit": proc.returncode, "tail": tail[-1500:]}
    result = json.loads(line.removeprefix("RESULT "))
    result["wall_seconds"] = time.time() - started
    result["load_average"] = os.getloadavg()[0]
    return result


def plan_for(
    case: str, checkpoint: str, data: Path, checkpointing: bool = False, dtype: str = "bfloat16"
) -> dict | None:
    try:
        from pg_tune.config.recipe import parse_recipe
        from pg_tune.measure.plan import estimate
    except ImportError:
        return None
    recipe = parse_recipe(recipe_data(case, checkpoint, data, Path("/tmp/unused"), 3, checkpointing, dtype))
    return estimate(recipe, load_family(recipe.model.name_or_path), device="cpu").as_dict()


def _median_step(r: dict, key: str) -> float:
    later = r.get(key, [])[1:] or r.get(key, [])  # the first step pays one-time costs
    return statistics.median(later) if later else float("nan")


def report(results: dict) -> str:
    checkpointing = "on" if results.get("gradient_checkpointing") else "off"
    lines = [
        f"checkpoint {results['checkpoint']}; {results['threads']} threads; gradient checkpointing "
        f"{checkpointing} (both sides); {results.get('dtype', 'bfloat16')}; {results['machine']}"
    ]
    head = (
        f"{'case':<7} {'side':<10} {'peak RSS GB':>11} {'load peak':>10} {'train peak':>10} {'anon':>6} "
        f"{'file':>6} {'s/step':>8} {'CPU s/step':>10} {'load avg':>8} {'first loss':>10} {'trainable':>11} "
        f"{'plan GB':>8} {'plan/meas':>9}"
    )
    lines += [head, "-" * len(head)]
    for case in CASES:
        plan = results.get("plan", {}).get(case)
        for side in SIDES:
            r = results.get("train", {}).get(case, {}).get(side)
            if not r or r.get("failed"):
                lines.append(f"{case:<7} {side:<10} {'failed' if r else 'not run':>11}")
                continue
            plan_gb = plan["total_gb"] if plan and side == "pg_tune" else None
            ratio = f"{plan_gb / r['peak_rss_gb']:.2f}" if plan_gb else ""
            lines.append(
                f"{case:<7} {side:<10} {r['peak_rss_gb']:11.2f} {r['load_peak_gb']:10.2f} {r['train_peak_gb']:10.2f} "
                f"{r.get('train_peak_anon_gb', float('nan')):6.2f} {r.get('train_peak_file_gb', float('nan')):6.2f} "
                f"{_median_step(r, 'step_seconds'):8.1f} {_median_step(r, 'step_cpu_seconds'):10.1f} "
                f"{r.get('load_average', float('nan')):8.1f} {r.get('first_loss', float('nan')):10.4f} "
                f"{r.get('trainable_params', 0):11,} {f'{plan_gb:.2f}' if plan_gb is not None else '':>8} {ratio:>9}"
            )
        pg, ref = (results.get("train", {}).get(case, {}).get(s) for s in SIDES)
        if pg and ref and not pg.get("failed") and not ref.get("failed"):
            cpu = _median_step(pg, "step_cpu_seconds") / _median_step(ref, "step_cpu_seconds")
            lines.append(
                f"{case:<7} {'ratio':<10} {pg['peak_rss_gb'] / ref['peak_rss_gb']:11.2f} {'':>10} {'':>10} {'':>6} "
                f"{'':>6} {'':>8} {cpu:10.2f}   (pg_tune / reference; CPU seconds per step, steps 2+)"
            )
            lines.append(
                f"{case:<7} first loss pg_tune {pg['first_loss']:.4f} vs reference {ref['first_loss']:.4f} "
                f"(the same first row on both sides); trainable {pg.get('trainable_params', 0):,} vs "
                f"{ref.get('trainable_params', 0):,}"
            )
    for mode, r in results.get("export", {}).items():
        if r and not r.get("failed"):
            lines.append(f"export {mode:<7} peak RSS {r['peak_rss_gb']:.2f} GB in {r['seconds']:.0f} s")
        else:
            lines.append(f"export {mode:<7} {'failed' if r else 'not run'}")
    if "verify" in results:
        lines.append("verify (exported bf16 vs base bf16 + adapter): " + json.dumps(results["verify"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="/tmp/sizes/pg2-3b-224")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (batch 1)")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing on both sides (as docs/qlora_export_hub.md advises)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="the base's dtype and QLoRA's compute dtype, both sides (float32 on a CPU without fast bf16)",
    )
    parser.add_argument("--cases", default="qlora,lora")
    parser.add_argument("--sides", default="pg_tune,reference", help="comma-separated subset, in this order")
    parser.add_argument("--patience", type=float, default=900, help="seconds to wait for free memory")
    parser.add_argument(
        "--exports", default="stream,full", help="export modes to measure (needs the lora case)"
    )
    parser.add_argument("--verify", action="store_true", help="compare the export with base + adapter")
    parser.add_argument("--need-gib", type=float, default=14.0, help="free memory to wait for before a run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, help="re-print the tables of a --json file")
    parser.add_argument("--work", default="/tmp/sizes/bench")
    # worker-side
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.report:
        results = json.loads(Path(args.report).read_text())
        for case in CASES:
            results.setdefault("plan", {})[case] = plan_for(
                case,
                results["checkpoint"],
                Path(results["data"]),
                results.get("gradient_checkpointing", False),
                results.get("dtype", "bfloat16"),
            )
        print(report(results))
        return 0

    work = Path(args.work)
    if not Path(args.checkpoint).is_dir():
        from pg_tune.models.paligemma.shapes import write_shape

        write_shape("paligemma2-3b-224", args.checkpoint)
    data = write_data(work / "data")
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    results: dict = {
        "checkpoint": args.checkpoint,
        "data": str(data),
        "threads": args.threads,
        "gradient_checkpointing": args.checkpointing,
        "dtype": args.dtype,
        "machine": f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
        "train": {},
        "export": {},
    }

    if args.json and Path(args.json).is_file():
        # Several invocations (one case or side at a time) add to the same results file.
        earlier = json.loads(Path(args.json).read_text())
        for case, sides_done in earlier.get("train", {}).items():
            results["train"].setdefault(case, {}).update(sides_done)
        results["export"].update(earlier.get("export", {}))
        if "verify" in earlier:
            results["verify"] = earlier["verify"]

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    cases = [c for c in args.cases.split(",") if c]
    sides = tuple(s for s in args.sides.split(",") if s)
    order = 0
    for case in cases:
        for side in sides if order % 2 == 0 else sides[::-1]:
            if not _wait_for_memory(args.need_gib, f"{case}/{side}", args.patience):
                continue
            run_dir = work / f"run-{case}-{side}"
            r = _launch(args, side, case=case, data=data, run_dir=run_dir)
            results["train"].setdefault(case, {})[side] = r
            print(f"{case}/{side}: " + json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
            save()
        order += 1
    lora_run = work / "run-lora-pg_tune"
    for mode in [m for m in args.exports.split(",") if m]:
        if not (lora_run / "adapter").is_dir():
            break
        out = work / f"export-{mode}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        need = args.need_gib + (6 if mode == "full" else 0)
        if not _wait_for_memory(need, f"export {mode}", args.patience):
            continue
        r = _launch(args, "export", run_dir=lora_run, out=out, mode=mode)
        results["export"][mode] = r
        print(f"export {mode}: " + json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
        save()
    if args.verify and (work / "export-stream").is_dir():
        import torch

        files = {}
        for mode in ("exported", "base_adapter"):
            files[mode] = work / f"logits-{mode}.pt"
            if _wait_for_memory(args.need_gib, f"verify {mode}", args.patience):
                _launch(
                    args,
                    "logits",
                    run_dir=lora_run,
                    out=work / "export-stream",
                    mode=mode,
                    logits_out=files[mode],
                )
        if all(p.is_file() for p in files.values()):
            from pg_tune.export.merged import compare_logits

            results["verify"] = compare_logits(
                torch.load(files["base_adapter"]), torch.load(files["exported"])
            )
            save()
    for case in CASES:
        results.setdefault("plan", {})[case] = plan_for(
            case, args.checkpoint, data, args.checkpointing, args.dtype
        )
    save()
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
