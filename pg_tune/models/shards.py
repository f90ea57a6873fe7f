"""Safetensors checkpoints read tensor by tensor with plain reads, never memory-mapped.

``safe_open`` (and so ``from_pretrained``) memory-maps each shard, and every page a tensor was
read from then counts in the process's RSS for as long as the mapping lives; transformers keeps a
tensor loaded in the stored dtype as a view into that mapping, so one such tensor keeps its whole
shard mapped. At the PaliGemma 2 3B shape a QLoRA load therefore held the whole 6 GB bf16
checkpoint in RSS beside the 4-bit model (docs/performance.md, "Real shapes").

Here each tensor is read into its own fresh buffer (``os.pread``), so:

- a tensor kept in the stored dtype owns its memory, and nothing maps the file;
- a tensor that is converted (quantized to 4-bit, cast to another dtype, moved to a GPU) is
  released as soon as it is converted: the bf16 source of a quantized linear is never resident
  beside more than a few others;
- the kernel's page cache holds what was read, which RSS does not count and the kernel drops
  under pressure.

``lazy_state_dict(folder)`` hands ``from_pretrained(..., state_dict=...)`` one ``LazyTensor`` per
checkpoint key: transformers materialises each with ``tensor[...]`` exactly when it loads (and
quantizes) that parameter, renames the keys, ties the head and fills what the checkpoint lacks, as
for its own memory-mapped slices. The streaming export (``pg_tune.export.stream``) reads shards
with the same ``ShardReader``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
"""torch dtype -> safetensors dtype name (the writer's header)."""


class CheckpointLayoutError(ValueError):
    """A folder holds no safetensors checkpoint this module can read."""


def checkpoint_files(folder: Path) -> list[str]:
    """The safetensors shards of a checkpoint folder, in index order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise CheckpointLayoutError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (a safetensors checkpoint is needed)"
    )


class ShardReader:
    """One safetensors file read tensor by tensor with plain reads (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            header = json.loads(os.pread(self._fd, size, 8))
        except (ValueError, OSError) as e:
            os.close(self._fd)
            raise CheckpointLayoutError(f"{self.path}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + size
        self.entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))

    def layout(self) -> list[tuple[str, torch.dtype, list[int]]]:
        return [(key, _ST_DTYPES[e["dtype"]], e["shape"]) for key, e in self.entries.items()]

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self.entries[key]["dtype"]]

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        """A fresh tensor holding ``key``'s bytes (its own memory, nothing mapped)."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        view, offset = memoryview(buffer), self._start + begin
        while view:  # pread may return fewer bytes than asked (large reads, signals)
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise CheckpointLayoutError(f"{self.path}: {key} ends past the end of the file")
            view, offset = view[got:], offset + got
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class LazyTensor:
    """One checkpoint tensor, read only when indexed (``tensor[...]``), as transformers' loader asks.

    Quacks like safetensors' ``PySafeSlice`` for what ``from_pretrained`` uses: ``[...]`` (or any
    index) materialises, ``get_shape`` / ``get_dtype`` describe without reading.
    """

    def __init__(self, reader: ShardReader, key: str):
        self.reader, self.key = reader, key

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.reader.read(self.key)
        return tensor if index is Ellipsis else tensor[index]

    def get_shape(self) -> list[int]:
        return self.reader.shape(self.key)

    def get_dtype(self) -> str:
        return self.reader.entries[self.key]["dtype"]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.get_shape())

    @property
    def dtype(self) -> torch.dtype:
        return self.reader.dtype(self.key)


def lazy_state_dict(folder: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors checkpoint folder, unread (see the module docstring)."""
    folder = Path(folder)
    state: dict[str, LazyTensor] = {}
    for filename in checkpoint_files(folder):
        reader = ShardReader(folder / filename)
        for key in reader.entries:
            state[key] = LazyTensor(reader, key)
    return state
