"""Parquet files truncated or damaged mid-file, streamed or not (issue 22.5): under ``stop`` the file and
row group are named, under ``skip`` the rows are counted; never a pyarrow or ``datasets`` traceback."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pg_tune.config.datasets import HfOptions
from pg_tune.data.bad_rows import BadRows
from pg_tune.data.formats import BuildContext
from pg_tune.data.formats.hf import build
from pg_tune.data.safe_collate import BadRow, SafeSampleDataset
from pg_tune.data.sample import DataError


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(folder: Path, name: str = "train.parquet", damage: bool = True) -> Path:
    """30 rows in 3 row groups of 10; ``damage`` overwrites row group 1's page headers (footer intact)."""
    table = pa.table(
        {
            "image": [{"bytes": _png(), "path": None}] * 30,
            "prefix": ["caption en"] * 30,
            "suffix": [f"row {i}" for i in range(30)],
        }
    )
    path = folder / name
    pq.write_table(table, path, row_group_size=10)
    if damage:
        data = bytearray(path.read_bytes())
        group = pq.ParquetFile(path).metadata.row_group(1)
        start = min(group.column(i).data_page_offset for i in range(group.num_columns))
        data[start : start + group.total_byte_size // 2] = b"\xab" * (group.total_byte_size // 2)
        path.write_bytes(bytes(data))
    return path


def _build(path, policy: str, streaming: bool = False, split: str = "train"):
    options = HfOptions(path=str(path), streaming=streaming, num_rows=None)
    bad = BadRows(policy)
    return build(options, BuildContext(split, bad)), bad


def test_a_damaged_row_group_is_named_under_stop(tmp_path):
    path = _parquet(tmp_path)
    with pytest.raises(DataError) as e:
        _build(path, "stop")
    message = str(e.value)
    assert message.startswith(f"{path}: row group 1 (rows 10-19) is unreadable: ")
    assert "data.on_bad_row=stop" in message and "\n" not in message


def test_a_damaged_row_group_is_counted_row_by_row_under_skip(tmp_path):
    samples, bad = _build(_parquet(tmp_path), "skip")
    assert bad.counts == {"corrupt_parquet": 10}
    assert [samples[i].suffix for i in range(len(samples))] == [
        f"row {i}" for i in (*range(10), *range(20, 30))
    ]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_truncated_parquet_file_is_named(tmp_path, streaming, policy):
    path = _parquet(tmp_path, damage=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        DataError, match=rf"^{path}: not a readable parquet file \(truncated, or not parquet: "
    ):
        _build(path, policy, streaming=streaming)


def _read_stream(samples, policy: str):
    dataset = SafeSampleDataset(samples, policy)
    return [dataset[i][1] for i in range(len(samples))]


def test_a_streamed_damaged_row_group_is_counted_under_skip(tmp_path):
    stream, _ = _build(_parquet(tmp_path), "skip", streaming=True)
    from pg_tune.data.stream import StreamingSamples

    samples = StreamingSamples([stream], [1.0], seed=0, shuffle=False)
    rows = _read_stream(samples, "skip")
    bad = [r for r in rows if isinstance(r, BadRow)]
    assert len(rows) == 30 and len(bad) == 10 and {r.reason for r in bad} == {"corrupt_parquet"}
    assert "train.parquet: row group 1 (rows 10-19) is unreadable" in bad[0].message
    assert [r.suffix for r in rows if not isinstance(r, BadRow)] == [
        f"row {i}" for i in (*range(10), *range(20, 30))
    ]


def test_a_streamed_damaged_row_group_is_named_under_stop(tmp_path):
    stream, _ = _build(_parquet(tmp_path), "stop", streaming=True)
    from pg_tune.data.stream import StreamingSamples

    samples = StreamingSamples([stream], [1.0], seed=0, shuffle=False)
    dataset = SafeSampleDataset(samples, "stop")
    for i in range(10):
        dataset[i]
    with pytest.raises(
        DataError, match=r"shard 0 row 10\]: .*train.parquet: row group 1 \(rows 10-19\) is unreadable"
    ):
        dataset[10]


def test_data_validate_counts_a_damaged_row_group(tmp_path, capsys):
    import yaml

    from pg_tune.cli import main

    path = _parquet(tmp_path)
    recipe = {"output_dir": str(tmp_path / "run"), "data": {"train": [{"format": "hf", "path": str(path)}]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", "validate", str(tmp_path / "r.yaml")]) == 1
    out = capsys.readouterr()
    assert (
        "corrupt_parquet: 10" in out.out
        and "row group 1 (rows 10-19)" in out.out
        and "Traceback" not in out.err
    )
