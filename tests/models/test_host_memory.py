"""Freed host memory leaves the process's RSS once a checkpoint has been loaded (glibc malloc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pg_tune.models import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")

# Each case runs in a fresh process: mallopt is process-wide and RSS never falls back by itself.
# The churn is what a load or a step does: a large block freed (glibc then raises its mmap
# threshold past it), then many 1 MiB buffers allocated and all but the last one freed (the last
# sits at the top of the heap, so glibc cannot simply shrink the heap past them).
CHURN = textwrap.dedent(
    """
    import json, sys, torch
    from pg_tune.models import host_memory

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    applied = host_memory.keep_large_blocks_returnable() if sys.argv[1] == "returnable" else False
    big = torch.ones(16 << 20, dtype=torch.uint8); del big
    before = rss_mib()
    blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(300)]
    held = rss_mib()
    del blocks[:-1]
    freed = rss_mib()
    host_memory.release_free_memory()
    trimmed = rss_mib()
    print(json.dumps({"applied": applied, "before": before, "held": held, "freed": freed, "trimmed": trimmed}))
    """
)


def churn(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PG_TUNE_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_blocks_leave_rss_with_the_threshold_fixed():
    fixed, default = churn("returnable"), churn("default")
    assert fixed["applied"] and not default["applied"]
    # 300 MiB were held on both sides.
    assert fixed["held"] - fixed["before"] > 250 and default["held"] - default["before"] > 250
    # Fixed threshold: every 1 MiB block was its own mapping, gone from RSS when freed.
    assert fixed["held"] - fixed["freed"] > 250
    # glibc's default kept them in the heap (the reason for the module); malloc_trim hands them back.
    assert default["held"] - default["freed"] < 50
    assert default["held"] - default["trimmed"] > 250


def test_system_malloc_is_left_alone_when_asked():
    code = "from pg_tune.models import host_memory as h; print(h.keep_large_blocks_returnable(), h.release_free_memory())"
    env = {**os.environ, "PG_TUNE_MALLOC": "system"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["False", "False"]
