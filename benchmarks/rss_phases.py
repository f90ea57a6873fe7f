"""Where a training run's host memory goes, phase by phase: RSS and glibc's heap at every step's edges.

    python benchmarks/rss_phases.py --checkpoint /tmp/sizes/pg2-3b-224 --checkpointing --steps 3
    PG_TUNE_MALLOC=compact python benchmarks/rss_phases.py --checkpoint /tmp/sizes/smolvlm2-256m --steps 4

Runs pg_tune's own loop (``pg_tune.train.loop.train``) on ``benchmarks/real_shapes.py``'s recipe
(batch 1, LoRA r=8 on attention + MLP, rows in file order) in this process, samples RSS every 5 ms
in a thread, and at each phase mark (loaded, forward start / end, optimizer step start / end,
trained) prints RSS, glibc's heap (``mallinfo2``: arena, in use, free, mmapped) and the peak RSS
until the next mark, and after each optimizer step that step's CPU seconds and minor page faults
(``getrusage``; the first step's include loading); ``--tensors`` also sums the tensors ``gc`` finds
alive after each optimizer step; ``--trim-each-step`` calls ``malloc_trim(0)`` after it. Like
``pg-tune``, it asks torch for huge pages before its first allocation (``PG_TUNE_MALLOC=system``:
not). The figures in docs/performance.md ("Real shapes": why bf16 LoRA misses 0.75x; what glibc
keeps; huge pages for the fixed threshold) come from this script. Not a test: one process, no
reference side, no timing compared.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_shapes import RssSampler, recipe_data, rss_parts, write_data  # noqa: E402


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc before 2.33
        return None


class Phases(RssSampler):
    """``real_shapes``' RSS sampler every ``period`` seconds, plus marks that repeat (each step's
    edges) with the heap's state at each."""

    def __init__(self, tensors: bool, trim: bool, period: float = 0.005):
        self.libc, self.tensors, self.trim = _libc(), tensors, trim
        self._cpu, self._faults = 0.0, 0  # at the previous "opt end" (the first step counts loading)
        self.phases: list[tuple[float, str, int]] = []
        super().__init__(period)

    def mark(self, name: str) -> None:
        rss = rss_parts()["VmRSS"]
        self.phases.append((time.perf_counter(), name, rss))
        line = f"{name:<10} RSS {rss / 1e9:6.3f} GB"
        if self.libc:
            m = self.libc.mallinfo2()
            line += (
                f"  heap {m.arena / 1e6:6.0f} MB (in use {m.uordblks / 1e6:6.0f}, free {m.fordblks / 1e6:5.0f})"
                f"  mmapped {m.hblkhd / 1e6:6.0f} MB in {m.hblks} blocks"
            )
        if name == "opt end":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu, faults = usage.ru_utime + usage.ru_stime, usage.ru_minflt
            line += f"  step: {cpu - self._cpu:5.1f} CPU s, {faults - self._faults:9,} page faults"
            self._cpu, self._faults = cpu, faults
        if name == "opt end" and self.tensors:
            line += f"  tensors alive {self._tensor_bytes() / 1e6:.1f} MB (not parameters)"
        print(line, flush=True)
        if name == "opt end" and self.trim and self.libc:
            self.libc.malloc_trim(0)
            print(f"{'trimmed':<10} RSS {rss_parts()['VmRSS'] / 1e9:6.3f} GB", flush=True)

    @staticmethod
    def _tensor_bytes() -> int:
        import torch

        storages = {}
        with warnings.catch_warnings():  # isinstance on some of torch's deprecated module objects warns
            warnings.simplefilter("ignore", FutureWarning)
            tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        for tensor in tensors:
            if not isinstance(tensor, torch.nn.Parameter):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def report(self) -> None:
        """Print each mark with the peak until the next one, then the overall peak."""
        self.stop()
        rss = [(t, parts["VmRSS"]) for t, parts in self.samples]
        start = self.phases[0][0]
        for i, (at, name, now) in enumerate(self.phases):
            until = self.phases[i + 1][0] if i + 1 < len(self.phases) else float("inf")
            peak = max((r for t, r in rss if at <= t < until), default=now)
            print(
                f"{at - start:8.2f} s  {name:<10} RSS {now / 1e9:6.3f} GB  peak until the next mark {peak / 1e9:6.3f} GB"
            )
        print(f"peak RSS {max(r for _, r in rss) / 1e9:.3f} GB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a hub-layout folder (any registered family)")
    parser.add_argument("--case", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="model.dtype (and QLoRA's compute dtype); float32 where the CPU has no fast bf16",
    )
    parser.add_argument(
        "--work", default="/tmp/rss_phases", help="data and run folder (the run is overwritten)"
    )
    parser.add_argument(
        "--tensors", action="store_true", help="sum the tensors alive after each optimizer step"
    )
    parser.add_argument(
        "--trim-each-step", action="store_true", help="malloc_trim(0) after each optimizer step"
    )
    args = parser.parse_args(argv)

    from pg_tune.models import host_memory

    host_memory.ask_for_huge_pages()  # as `pg-tune train` does, before torch's first allocation
    import torch

    torch.set_num_threads(args.threads)
    import pg_tune.train.loss as loss
    from pg_tune.config.recipe import parse_recipe, resolved
    from pg_tune.models.family import load_family
    from pg_tune.train.loop import train

    phases = Phases(args.tensors, args.trim_each_step)
    phases.mark("imported")
    work = Path(args.work)
    data = write_data(work / "data")
    recipe = parse_recipe(
        recipe_data(
            args.case, args.checkpoint, data, work / "run", args.steps, args.checkpointing, args.dtype
        )
    )
    family = load_family(recipe.model.name_or_path, recipe.model.vae_path)

    def marked(function, end: str, start: str | None = None):
        def call(*a, **kw):
            if start:
                phases.mark(start)
            out = function(*a, **kw)
            phases.mark(end)
            return out

        return call

    family.load_model = marked(family.load_model, "loaded")  # this instance only
    loss.SuffixLoss.forward = marked(loss.SuffixLoss.forward, "fwd end", "fwd start")
    torch.optim.AdamW.step = marked(torch.optim.AdamW.step, "opt end", "opt start")
    result = train(recipe, resolved(recipe), family, overwrite=True)
    phases.mark("trained")
    phases.report()
    print(f"first loss {result.first_loss:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
