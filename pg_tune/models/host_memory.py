"""Host memory that goes back to the operating system once a tensor is freed (glibc's malloc).

torch's CPU tensors come from ``malloc``. glibc serves a request of at least ``M_MMAP_THRESHOLD``
bytes with its own ``mmap`` and unmaps it on ``free``, but it raises that threshold every time such
a block is freed (up to 32 MiB on 64-bit), after which blocks below it come from the heap, and
heap memory freed in the middle stays in the process's RSS. A model load or a training step frees
thousands of buffers of a few MiB (the bf16 sources of quantized linears, dequantized 4-bit
weights, activations), so RSS ratchets upward: at the PaliGemma 2 3B shape, QLoRA with batch 1
held 0.4 GiB of freed memory after loading and 0.8 GiB more within each step
(docs/performance.md, "Real shapes").

``keep_large_blocks_returnable`` fixes the threshold at 256 KiB (``mallopt(M_MMAP_THRESHOLD)``,
which also switches the raising off): every block from 256 KiB up is mapped on its own and
unmapped when freed. ``release_free_memory`` hands back what the heap still holds
(``malloc_trim(0)``).

The fixed threshold is not free: every mapped block page-faults when first touched. Measured
(docs/performance.md, "Real shapes"): 1.5–1.7× the CPU seconds of a 3B step on this project's CPU
VM (re-measured alternating; an earlier 1.01× was read on a loaded machine) for 0.76× (QLoRA) and
0.86× (bf16 LoRA) of its peak RSS; 1.2–1.45× on the SmolVLM2-256M shape for 0.65×. On a GPU the
step's activations are not host memory and the threshold costs nothing there. So
``ModelFamily.load_model`` applies ``policy``:

- ``auto`` (default): the threshold is fixed before loading a quantized (QLoRA) base, whose
  dequantized weights churn every step, and after loading any base of at least ``LARGE_MODEL``
  parameters, where host memory binds first; ``malloc_trim`` after every load. A CPU run with
  memory to spare trains faster under ``system``.
- ``compact``: the threshold fixed for every checkpoint loaded from disk.
- ``system``: glibc left as it is (e.g. under jemalloc or tcmalloc via ``LD_PRELOAD``, which
  manage this themselves).

The policy comes from the ``PG_TUNE_MALLOC`` environment variable. Other C libraries (macOS, musl)
are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MMAP_THRESHOLD = 256 * 1024
"""Bytes from which every block gets its own mapping (glibc's initial default is 128 KiB)."""
LARGE_MODEL = 1_000_000_000
"""Parameters from which ``auto`` fixes the threshold for any base."""
POLICIES = ("auto", "compact", "system")
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def policy() -> str:
    """``PG_TUNE_MALLOC`` (``auto`` when unset); an unknown value is refused by name."""
    value = os.environ.get("PG_TUNE_MALLOC", "auto") or "auto"
    if value not in POLICIES:
        raise ValueError(f"PG_TUNE_MALLOC={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def fixes_threshold(quantized: bool, parameters: int | None = None) -> bool:
    """Whether the policy fixes the threshold for a base loaded from disk: ``compact`` always,
    ``auto`` for a quantized base or one of at least ``LARGE_MODEL`` parameters (``None``: not
    known yet, before loading), ``system`` never. ``pg-tune plan`` asks it too: where the answer is
    no, freed memory may stay in the heap beyond the plan."""
    mode = policy()
    large = parameters is not None and parameters >= LARGE_MODEL
    return mode == "compact" or (mode == "auto" and (quantized or large))


def fix_threshold_before_loading(quantized: bool) -> bool:
    """Apply the policy before a checkpoint loads: ``compact`` always, ``auto`` for a quantized base."""
    return fixes_threshold(quantized) and keep_large_blocks_returnable()


def settle_after_loading(model: torch.nn.Module) -> None:
    """Apply the policy once ``model`` has loaded: ``auto`` fixes the threshold for a large one;
    then hand the heap's free pages back."""
    if fixes_threshold(False, sum(p.numel() for p in model.parameters())):
        keep_large_blocks_returnable()
    release_free_memory()


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or policy() == "system":
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


@cache
def keep_large_blocks_returnable() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` for this process (once); False where it
    does not apply (not glibc, or ``PG_TUNE_MALLOC=system``)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)


def memory_binds() -> bool:
    """Whether this process chose memory over CPU time: the threshold has been fixed (the policy
    did so for a loaded base). Buffers that are only kept to save page faults
    (``pg_tune.train.loss.LogitsWorkspace``) are released between uses then."""
    return keep_large_blocks_returnable.cache_info().currsize > 0 and keep_large_blocks_returnable()


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (``malloc_trim(0)``); False where it does not apply."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0) in (0, 1))
