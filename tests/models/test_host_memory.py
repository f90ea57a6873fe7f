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

    applied = False
    if sys.argv[1] == "returnable":
        applied = host_memory.keep_large_blocks_returnable()
    elif sys.argv[1] != "default":  # a checkpoint loaded as pg_tune loads it: the policy decides
        from pg_tune.config.recipe import ModelConfig, QuantizationConfig
        from pg_tune.models.family import load_family

        folder, mode = sys.argv[1], sys.argv[2]
        quantization = QuantizationConfig(mode=mode, bnb_4bit_compute_dtype="float32")
        load_family(folder).load_model(ModelConfig(name_or_path=folder, dtype="float32"), quantization)
    big = torch.ones(16 << 20, dtype=torch.uint8); del big
    before = rss_mib()
    blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(300)]
    held = rss_mib()
    del blocks[:-1]
    freed = rss_mib()
    host_memory.release_free_memory()
    trimmed = rss_mib()
    binds = host_memory.memory_binds()
    print(json.dumps({"applied": applied, "binds": binds, "before": before, "held": held, "freed": freed, "trimmed": trimmed}))
    """
)


def churn(*args: str, malloc: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PG_TUNE_MALLOC", None)
    if malloc:
        env["PG_TUNE_MALLOC"] = malloc
    out = subprocess.run(
        [sys.executable, "-c", CHURN, *args], capture_output=True, text=True, check=True, env=env
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


def returned(result: dict) -> bool:
    """Whether the freed 1 MiB blocks left RSS (without malloc_trim)."""
    return result["held"] - result["freed"] > 250


def test_the_policy_fixes_the_threshold_for_qlora_and_large_bases_only(tiny_checkpoint):
    folder = str(tiny_checkpoint)
    # auto: a quantized base churns dequantized weights every step, so its blocks go back...
    qlora = churn(folder, "4bit")
    # ...a small unquantized base keeps glibc's faster default (the faults cost it CPU)...
    small = churn(folder, "none")
    # ...unless asked; and "system" leaves glibc alone even for QLoRA.
    compact = churn(folder, "none", malloc="compact")
    system = churn(folder, "4bit", malloc="system")
    assert returned(qlora) and not returned(small) and returned(compact) and not returned(system)
    # memory_binds() says which (the head's LogitsWorkspace then releases its buffers after each call).
    assert [r["binds"] for r in (qlora, small, compact, system)] == [True, False, True, False]


def test_an_unknown_policy_is_refused_by_name(tiny_checkpoint, monkeypatch):
    from pg_tune.config.recipe import ModelConfig
    from pg_tune.models.family import load_family

    monkeypatch.setenv("PG_TUNE_MALLOC", "compat")
    with pytest.raises(ValueError, match=r"PG_TUNE_MALLOC='compat': expected one of auto, compact, system"):
        load_family(str(tiny_checkpoint)).load_model(ModelConfig(name_or_path=str(tiny_checkpoint)))
