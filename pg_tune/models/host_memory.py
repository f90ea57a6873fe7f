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

The fixed threshold is not free: every mapped block page-faults when first touched, one 4 KiB
page at a time. ``ask_for_huge_pages`` sets torch's own ``THP_MEM_ALLOC_ENABLE=1``, which torch
reads once, at its first CPU allocation (so the ``pg-tune`` command calls it before anything else):
torch then aligns every block of 2 MiB or more to 2 MiB and ``madvise``s it for transparent huge
pages, one fault per 2 MiB where the kernel's THP mode is ``madvise`` or ``always``. Measured
(docs/performance.md, "Huge pages for the fixed threshold"; fp32 LoRA, two alternating rounds on
an AVX2 host):

- PaliGemma 2 3B shape: the fixed threshold alone cost 1.26x the CPU seconds per step of glibc's
  default; with huge pages 0.99x, at 0.90-0.94x its peak RSS. QLoRA (fp32 compute): 1.35x alone,
  1.14x with huge pages, at 0.76-0.78x its peak RSS.
- SmolVLM2-256M shape (1,088 image tokens a picture): 1.46x alone, 1.21-1.26x with huge pages, at
  0.70-0.76x its peak RSS (3.44 against 4.54-4.88 GB), and ``pg-tune plan`` within 8 % of that
  peak, where glibc's default ran 1.4-1.5x over it.
- Under glibc's dynamic threshold huge pages only cost (1.14x on the 256M shape), so they go with
  the fixed threshold (the command cannot know yet whether the model will be read from disk: an
  in-process tiny preset keeps glibc's threshold and gets huge pages too, not measured).

On a GPU the step's activations are not host memory and the threshold costs nothing. So
``ModelFamily.load_model`` applies ``policy``:

- ``auto`` (default) or ``compact`` (its earlier name for every base): the threshold is fixed before
  loading any checkpoint from disk and ``malloc_trim`` runs after the load; the ``pg-tune``
  command asks for huge pages. A CPU run of a small model with memory to spare trains up to
  1.2-1.3x faster under ``system``.
- ``system``: glibc left as it is and no huge pages (e.g. under jemalloc or tcmalloc via
  ``LD_PRELOAD``, which manage this themselves).

The policy comes from the ``PG_TUNE_MALLOC`` environment variable. Other C libraries (macOS, musl)
are left alone; a ``THP_MEM_ALLOC_ENABLE`` the user set wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

MMAP_THRESHOLD = 256 * 1024
"""Bytes from which every block gets its own mapping (glibc's initial default is 128 KiB)."""
POLICIES = ("auto", "compact", "system")
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def policy() -> str:
    """``PG_TUNE_MALLOC`` (``auto`` when unset); an unknown value is refused by name."""
    value = os.environ.get("PG_TUNE_MALLOC", "auto") or "auto"
    if value not in POLICIES:
        raise ValueError(f"PG_TUNE_MALLOC={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def fixes_threshold() -> bool:
    """Whether the policy fixes the threshold for a base loaded from disk (``auto`` and ``compact``:
    always; ``system``: never). ``pg-tune plan`` asks it too: where the answer is no, freed memory
    may stay in the heap beyond the plan."""
    return policy() != "system"


def fix_threshold_before_loading() -> bool:
    """Apply the policy before a checkpoint loads; False where it does not apply."""
    return fixes_threshold() and keep_large_blocks_returnable()


HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
"""torch's switch for transparent huge pages on CPU blocks of 2 MiB and more (c10's allocator)."""


def ask_for_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` where the policy fixes the threshold on glibc (unless the user
    set it): torch reads it at its first CPU allocation, so call this before any; it also reaches
    the processes this one starts. True where huge pages are now asked for."""
    if not (fixes_threshold() and _glibc() is not None):
        return False
    os.environ.setdefault(HUGE_PAGES, "1")
    return os.environ[HUGE_PAGES] == "1"


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
