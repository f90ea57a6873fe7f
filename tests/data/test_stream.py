"""The hf format by dataset repository folder, and streaming: order, mixing, determinism, exact resume.

The repository is laid out as on the Hub (``data/train-0000X-of-0000N.parquet`` + a README.md
with ``configs``) and read through ``datasets.load_dataset``, offline.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest

from pg_tune.config.recipe import load_recipe
from pg_tune.config.schema import ConfigError, from_dict
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.build import build_samples
from pg_tune.data.formats import FORMATS
from pg_tune.data.sample import DataError
from pg_tune.data.stream import StreamingSamples, buffer_shuffled
from tests.families import family_of

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# shapes, as a Hub dataset repository
"""


def _write_repo(root, rows_per_shard=(5, 4, 6), eval_rows=3):
    """A dataset repository folder: parquet shards of PNG shapes with prefix/suffix columns."""
    import datasets

    from pg_tune.data.formats.shapes import draw_shape

    rng = random.Random(0)
    features = datasets.Features(
        {"image": datasets.Image(), "prefix": datasets.Value("string"), "suffix": datasets.Value("string")}
    )
    (root / "data").mkdir(parents=True)
    n = 0
    for split, sizes in (("train", rows_per_shard), ("validation", (eval_rows,))):
        for shard, size in enumerate(sizes):
            rows = []
            for _ in range(size):
                image, colour, shape, _ = draw_shape(rng, 32)
                buf = io.BytesIO()
                image.save(buf, "PNG")
                rows.append(
                    {
                        "image": {"bytes": buf.getvalue(), "path": None},
                        "prefix": "caption en",
                        "suffix": f"{colour} {shape} {n}",
                    }
                )
                n += 1
            name = f"{split}-{shard:05d}-of-{len(sizes):05d}.parquet"
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "data" / name))
    (root / "README.md").write_text(README)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return _write_repo(tmp_path_factory.mktemp("hub_repo") / "shapes")


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """load_dataset converts into its cache: keep that inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _entries(*raw):
    from pg_tune.config.recipe import _parse_dataset_entry

    return [_parse_dataset_entry(r, f"data.train[{i}]") for i, r in enumerate(raw)]


def _suffixes(samples, start, stop):
    return [samples[k].suffix for k in range(start, stop)]


def test_repository_folder_reads_like_load_dataset(repo):
    samples = build_samples(_entries({"format": "hf", "path": str(repo)}), "train", BadRows())
    assert len(samples) == 15
    assert [s.suffix.split()[-1] for s in samples] == [str(i) for i in range(15)]  # shard order
    val = build_samples(
        _entries({"format": "hf", "path": str(repo), "split": "validation"}), "eval", BadRows()
    )
    assert [s.suffix.split()[-1] for s in val] == ["15", "16", "17"]
    assert val[0].image.size == (32, 32)  # decoded from the parquet's PNG bytes


def test_stream_without_shuffle_is_the_table_in_file_order(repo):
    table = build_samples(_entries({"format": "hf", "path": str(repo)}), "train", BadRows())
    stream = build_samples(
        _entries({"format": "hf", "path": str(repo), "streaming": True}), "train", BadRows()
    )
    assert isinstance(stream, StreamingSamples) and len(stream) == 15  # sized from the parquet footers
    stream.shuffle = False
    assert _suffixes(stream, 0, 30) == [s.suffix for s in table] * 2  # epoch 1 is the same pass again
    # Rows are named by shard and row (bad-row messages must point at the data, not at the stream).
    assert stream[7].source == f"{repo}[shard 1 row 2]"


def test_stream_shuffle_is_a_permutation_per_pass_fixed_by_the_seed(repo):
    def order(seed):
        entries = _entries({"format": "hf", "path": str(repo), "streaming": True, "shuffle_buffer": 4})
        return _suffixes(build_samples(entries, "train", BadRows(), seed=seed), 0, 45)

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    passes = [first[i : i + 15] for i in (0, 15, 30)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # every row exactly once a pass
    assert passes[0] != passes[1]  # a new shuffle each pass
    assert passes[0] != sorted(passes[0], key=lambda s: int(s.split()[-1]))


def test_random_access_and_fast_forward_equal_reading_in_order(repo):
    """What a resumed run or a DataLoader worker does: jump ahead, come back, cross epochs."""
    entries = _entries(
        {"format": "hf", "path": str(repo), "streaming": True, "shuffle_buffer": 3, "weight": 2},
        {"format": "shapes", "num_samples": 4, "image_size": 32, "weight": 1.5},
    )
    in_order = build_samples(entries, "train", BadRows(), seed=3)
    expected = _suffixes(in_order, 0, 3 * len(in_order))
    jumping = build_samples(entries, "train", BadRows(), seed=3)
    for k in [40, 7, 8, 9, 70, 0, 35, 36, 100, 99]:
        assert jumping[k].suffix == expected[k], k


def test_dataloader_workers_and_resume_skip_read_the_same_rows(repo):
    """Two workers each take every other batch (skipping the rest of the stream); a loader
    resumed by accelerate's skip_first_batches starts mid-epoch: both see the single-process rows."""
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader

    from pg_tune.data.collate import SampleDataset
    from pg_tune.data.stream import EpochSampler

    entries = _entries({"format": "hf", "path": str(repo), "streaming": True, "shuffle_buffer": 4})
    samples = build_samples(entries, "train", BadRows(), seed=5)
    samples[3]  # the parent has live readers before the workers fork

    def loader(workers):
        return DataLoader(
            SampleDataset(samples),
            batch_size=2,
            sampler=EpochSampler(len(samples)),
            collate_fn=lambda rows: [s.suffix for _, s in rows],
            num_workers=workers,
        )

    expected = []
    single = loader(0)
    for epoch in range(2):
        single.sampler.set_epoch(epoch)
        expected += list(single)
    parallel, got = loader(2), []
    for epoch in range(2):
        parallel.sampler.set_epoch(epoch)
        got += list(parallel)
    assert got == expected
    assert len(expected) == 16 and expected[:8] != expected[8:]  # 8 batches an epoch, reshuffled
    resumed = loader(0)
    resumed.sampler.set_epoch(1)  # 8 batches an epoch: resume after batch 5 of epoch 1
    assert list(skip_first_batches(resumed, 5)) == expected[8 + 5 :]


def test_mixing_by_weight_draws_exact_counts_each_epoch(repo):
    entries = _entries(
        {"format": "hf", "path": str(repo), "streaming": True, "weight": 2},
        {"format": "shapes", "num_samples": 8, "image_size": 32, "weight": 0.5},
    )
    samples = build_samples(entries, "train", BadRows(), seed=0)
    assert len(samples) == 2 * 15 + 4
    for epoch in range(2):
        sources = Counter(samples.locate(k)[0] for k in range(epoch * 34, (epoch + 1) * 34))
        assert sources == {0: 30, 1: 4}
    # Weight 0.5 walks the in-memory entry: epochs 0 and 1 together show all 8 shapes once.
    shapes = [samples[k].source for k in range(68) if samples.locate(k)[0] == 1]
    assert len(set(shapes)) == 8
    # Interleaved, not one entry after the other.
    assert {samples.locate(k)[0] for k in range(10)} == {0, 1}


def test_buffer_shuffle_keeps_every_row_once():
    out = list(buffer_shuffled(iter(range(100)), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(buffer_shuffled(iter(range(5)), 1, random.Random(0))) == list(range(5))


def test_streaming_errors_name_the_entry(repo, tmp_path):
    with pytest.raises(DataError, match="needs limit"):
        build_samples(_entries({"format": "hf", "path": str(repo), "streaming": True}), "eval", BadRows())
    evals = build_samples(
        _entries({"format": "hf", "path": str(repo), "streaming": True, "limit": 2}), "eval", BadRows()
    )
    assert len(evals) == 2
    with pytest.raises(ConfigError, match=r"shuffle_buffer: must be >= 0"):
        from_dict(FORMATS["hf"].options, {"path": "x", "shuffle_buffer": -1}, "data.train[0]")
    with pytest.raises(DataError, match="not a save_to_disk folder, parquet file, dataset repository"):
        build_samples(_entries({"format": "hf", "path": str(tmp_path / "missing")}), "train", BadRows())


# --- training: streaming equals the table with shuffle off; resume is exact -----------------------


def _recipe(tmp_path, name, repo, extra=(), **train_entry):
    import yaml

    data = {
        "output_dir": str(tmp_path / name),
        "model": {"name_or_path": "tiny-paligemma2"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "attention"},
        "data": {
            "train": [{"format": "hf", "path": str(repo), **train_entry}, *extra],
            "max_text_length": 16,
        },
        "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 3},
        "eval": {"before_training": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
def test_streaming_training_equals_table_training_with_shuffle_off(tmp_path, repo):
    from pg_tune.train.loop import train

    runs = {}
    for name, streaming in (("table", False), ("stream", True)):
        recipe, resolved = load_recipe(
            _recipe(tmp_path, name, repo, streaming=streaming), ["data.shuffle=false"]
        )
        train(recipe, resolved, family_of(recipe))
        runs[name] = _losses(tmp_path / name)
    assert len(runs["table"]) == 6
    assert runs["stream"] == runs["table"]  # same rows, same order, same batches: bitwise


@pytest.mark.slow
def test_streaming_resume_is_exact(tmp_path, repo):
    """Resume mid-epoch from step 3 of a shuffled, mixed stream: steps 4-6 and the adapter match."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from pg_tune.train.loop import train

    shapes = {"format": "shapes", "num_samples": 6, "image_size": 32, "weight": 0.5}
    entry = {"streaming": True, "shuffle_buffer": 4, "extra": [shapes]}
    recipe, resolved = load_recipe(_recipe(tmp_path, "straight", repo, **entry))
    assert isinstance(build_samples(recipe.data.train, "train", BadRows()), StreamingSamples)
    train(recipe, resolved, family_of(recipe))  # 15 + 3 rows an epoch, batch 2: step 3 is mid-epoch
    recipe2, resolved2 = load_recipe(_recipe(tmp_path, "resumed", repo, **entry))
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "step-0000003",
        tmp_path / "resumed" / "checkpoints" / "step-0000003",
    )
    train(recipe2, resolved2, family_of(recipe2), resume="auto")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")[3:]
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
