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


def test_the_policy_fixes_the_threshold_for_every_base_read_from_disk(tiny_checkpoint):
    folder = str(tiny_checkpoint)
    # auto: every checkpoint read from disk, quantized or not, returns its freed blocks...
    qlora, plain = churn(folder, "4bit"), churn(folder, "none")
    # ...as "compact" (the earlier name for it) does; "system" leaves glibc alone even for QLoRA.
    compact, system = churn(folder, "none", malloc="compact"), churn(folder, "4bit", malloc="system")
    assert returned(qlora) and returned(plain) and returned(compact) and not returned(system)
    # memory_binds() says which (the head's LogitsWorkspace then releases its buffers after each call).
    assert [r["binds"] for r in (qlora, plain, compact, system)] == [True, True, True, False]


def test_an_unknown_policy_is_refused_by_name(tiny_checkpoint, monkeypatch):
    from pg_tune.config.recipe import ModelConfig
    from pg_tune.models.family import load_family

    monkeypatch.setenv("PG_TUNE_MALLOC", "compat")
    with pytest.raises(ValueError, match=r"PG_TUNE_MALLOC='compat': expected one of auto, compact, system"):
        load_family(str(tiny_checkpoint)).load_model(ModelConfig(name_or_path=str(tiny_checkpoint)))


HUGE = textwrap.dedent(
    """
    import json, os
    from pg_tune.models import host_memory

    def fallbacks():  # huge-page faults the kernel could not serve (no free 2 MiB pages), system-wide
        try:
            with open("/proc/vmstat") as f:
                return next((int(l.split()[1]) for l in f if l.startswith("thp_fault_fallback ")), 0)
        except OSError:
            return 0

    asked = host_memory.ask_for_huge_pages()  # before torch's first CPU allocation, as pg-tune does
    import torch

    before = fallbacks()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: torch aligns it and madvises it
    with open("/proc/self/smaps_rollup") as f:
        huge = next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages")) / 1024
    env = os.environ.get("THP_MEM_ALLOC_ENABLE")
    print(json.dumps({"asked": asked, "env": env, "huge_mib": huge, "fallbacks": fallbacks() - before}))
    """
)


def huge_pages(malloc: str | None, **env: str) -> dict:
    run_env = {k: v for k, v in os.environ.items() if k not in ("PG_TUNE_MALLOC", host_memory.HUGE_PAGES)}
    run_env.update(env, **({"PG_TUNE_MALLOC": malloc} if malloc else {}))
    out = subprocess.run(
        [sys.executable, "-c", HUGE], capture_output=True, text=True, check=True, env=run_env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


def test_huge_pages_are_asked_for_where_the_threshold_is_fixed():
    assert huge_pages(None)["asked"] and huge_pages("compact")["env"] == "1"
    # system: neither the threshold nor huge pages; a value the user set wins.
    system = huge_pages("system")
    assert system["asked"] is False and system["env"] is None
    assert huge_pages(None, THP_MEM_ALLOC_ENABLE="0")["asked"] is False


@pytest.mark.skipif(_thp_mode() != "madvise", reason="the kernel's THP mode decides without madvise")
def test_torch_gets_huge_pages_for_large_blocks_when_asked():
    # Under "madvise", only blocks torch advised are huge: most of the 64 MiB with the flag, none without.
    asked = huge_pages(None)
    if asked["huge_mib"] < 32 and asked["fallbacks"] > 0:
        pytest.skip("the kernel had no free 2 MiB pages to give (thp_fault_fallback rose)")
    assert asked["huge_mib"] >= 32
    assert huge_pages("system")["huge_mib"] < 8


def test_the_command_asks_before_anything_else(monkeypatch, tmp_path, capsys):
    from pg_tune.cli import main

    monkeypatch.delenv(host_memory.HUGE_PAGES, raising=False)  # restored after the test
    monkeypatch.delenv("PG_TUNE_MALLOC", raising=False)
    main(["validate", str(tmp_path / "missing.yaml")])  # refuses the recipe, after asking
    assert os.environ[host_memory.HUGE_PAGES] == "1"
    monkeypatch.setenv("PG_TUNE_MALLOC", "compat")
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "PG_TUNE_MALLOC='compat': expected one of auto, compact, system" in capsys.readouterr().err
