"""Shared fixtures: tiny PaliGemma models built in-process, small real-format datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The slowest files first, so `make test`'s workers (pytest-xdist, one file per worker, collection
# order kept by --no-loadscope-reorder) do not end on a long file started last (longest-first
# scheduling). Seconds of a 3-worker run, `pytest -m "" -n 3 --dist loadfile --durations=0`
# (test_compile: longer in a fresh virtualenv, where inductor's cache is cold): a stale list only
# costs balance, never a test.
SLOWEST_FILES = (
    "tests/test_contract.py",  # 739 s
    "tests/serve/test_trained.py",  # 425 s
    "tests/train/test_compile.py",  # 127 s, more when inductor's cache is cold
    "tests/train/test_preference_trl.py",  # 195 s
    "tests/train/test_distributed.py",  # 179 s
    "tests/train/test_resume.py",  # 164 s
    "tests/measure/test_real_shapes.py",  # 146 s
    "tests/models/test_host_memory.py",  # 104 s
    "tests/serve/test_openai_client.py",  # 99 s
    "tests/measure/test_compare_reliability.py",  # 96 s
    "tests/serve/test_batching.py",  # 74 s
    "tests/train/test_methods.py",  # 56 s
    "tests/measure/test_compare.py",  # 51 s
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: file order kept


@pytest.fixture(params=["tiny-paligemma", "tiny-paligemma2"])
def tiny_preset(request) -> str:
    """Both generations: Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) text backbones."""
    return request.param


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny PaliGemma 2 saved in the hub's layout (config, safetensors, processor files)."""
    from pg_tune.models.paligemma.tiny import save_checkpoint

    return save_checkpoint("tiny-paligemma2", tmp_path_factory.mktemp("tiny-pg2"))


@pytest.fixture
def shapes_jsonl(tmp_path):
    """A 24-row JSONL dataset of shape images on disk; returns the .jsonl path."""
    from pg_tune.data.formats.shapes import write_jsonl

    return write_jsonl(tmp_path / "shapes", num_samples=24)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (``bench --threads``) leaves it as it found it: a later
    test comparing this process's run bitwise with a child process's needs the same count."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
