"""A disk cache of projected image features, so training can skip SigLIP (``data.feature_cache``).

When the vision tower and the projector are frozen (no ``lora.vision``, projector not in
``lora.modules_to_save``) and preprocessing is deterministic (resize + scale, no augmentation:
pg_tune's only image pipeline), the projector's output for an image never changes during a run.
``FeatureCache.build`` runs the tower once over every distinct image and writes the features as
memory-mapped ``.npy`` shards; the training collator then reads rows from them instead of decoding,
resizing and encoding images.

Entries are keyed by the image's bytes (sha256 of the file, or of the pixels, mode and size of an
in-memory image, hashed again on every access, never remembered by ``id()``), and the cache
directory by a fingerprint of the vision weights and of the image processor's settings, so a changed checkpoint, resolution or normalisation never reads stale features.

Layout: ``DIR/<weights-fingerprint>-<preprocessing-fingerprint>/``
``index.json`` (``{"dtype": ..., "entries": {image_key: [shard, row]}}``) and ``shard-00000.npy`` ...
(``[images, image_tokens, text_hidden]``; bfloat16 is stored as its raw 16 bits).
See docs/performance.md for when it pays.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pg_tune.data.images import load_image
from pg_tune.data.sample import Sample

_STORED = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def image_key(image: str | Path | Image.Image) -> str:
    """Content key of one image: the same bytes give the same key wherever the file lives."""
    digest = hashlib.sha256()
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    else:
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def preprocessing_fingerprint(image_processor) -> str:
    """Hash of the image processor's settings (size, resample, mean/std, rescale)."""
    settings = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def weights_fingerprint(core: torch.nn.Module, family) -> str:
    """Hash of the image encoder and projector weights (names, shapes and a strided value sample)."""
    digest = hashlib.sha256()
    modules = dict(zip(("vision_tower", "projector"), family.vision_modules(core), strict=True))
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
            digest.update(f"{prefix}.{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Memory-mapped projected image features; ``features(samples)`` returns ``[b, tokens, hidden]``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = json.loads((self.directory / "index.json").read_text())
        self.dtype = getattr(torch, index["dtype"])
        self.entries: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in index["entries"].items()}
        self._shards: dict[int, np.ndarray] = {}
        # Image path -> key, so each file is hashed once per process. In-memory images are never
        # memoised: lazy formats (hf) make a new PIL image per access and Python reuses the ids of
        # freed objects, so an id() key could hand one row another image's features.
        self._path_keys: dict[str, str] = {}

    @classmethod
    def build(
        cls,
        root: str | Path,
        samples: Sequence[Sample],
        model: torch.nn.Module,
        image_processor,
        family,
        batch_size: int = 8,
    ) -> FeatureCache:
        """Encode every image of ``samples`` not yet cached under ``root``; return the cache.

        The model ``family`` names the vision modules and computes the features.
        """
        core = family.unwrap(model)
        if not family.vision_frozen(core):
            raise ValueError(
                "data.feature_cache: the vision tower or projector is trainable (lora.vision or "
                "modules_to_save), so its features change while training; turn one of them off"
            )
        directory = (
            Path(root) / f"{weights_fingerprint(core, family)}-{preprocessing_fingerprint(image_processor)}"
        )
        directory.mkdir(parents=True, exist_ok=True)
        index_path = directory / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"entries": {}}
        entries = index["entries"]
        missing: dict[str, Sample] = {}
        for sample in samples:
            key = image_key(sample.image)
            if key not in entries:
                missing.setdefault(key, sample)
        if missing:
            shard = 1 + max((int(v[0]) for v in entries.values()), default=-1)
            keys = list(missing)
            out = None
            device = next(core.parameters()).device
            for start in range(0, len(keys), batch_size):
                chunk = [missing[k] for k in keys[start : start + batch_size]]
                images = [load_image(s.image, s.source) for s in chunk]
                pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
                with torch.no_grad():
                    feats = family.image_features(core, {"pixel_values": pixels.to(device, core.dtype)})
                if out is None:
                    out = np.lib.format.open_memmap(
                        directory / f"shard-{shard:05d}.npy",
                        mode="w+",
                        dtype=_STORED[feats.dtype],
                        shape=(len(keys), *feats.shape[1:]),
                    )
                    index["dtype"] = str(feats.dtype).removeprefix("torch.")
                values = feats.cpu()
                values = values.view(torch.int16) if values.dtype == torch.bfloat16 else values
                out[start : start + len(chunk)] = values.numpy().view(out.dtype)
            out.flush()
            entries.update({k: [shard, row] for row, k in enumerate(keys)})
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)  # readers never see a half-written index
        return cls(directory)

    def _shard(self, shard: int) -> np.ndarray:
        # Opened lazily, so DataLoader workers each map the file themselves instead of pickling it.
        if shard not in self._shards:
            self._shards[shard] = np.load(self.directory / f"shard-{shard:05d}.npy", mmap_mode="r")
        return self._shards[shard]

    def __getstate__(self):
        return {**self.__dict__, "_shards": {}}

    def _key(self, image: str | Path | Image.Image) -> str:
        if not isinstance(image, (str, Path)):
            return image_key(image)  # content: pixel bytes, mode and size
        path = str(image)
        if path not in self._path_keys:
            self._path_keys[path] = image_key(path)
        return self._path_keys[path]

    def features(self, samples: Sequence[Sample]) -> torch.Tensor:
        rows = []
        for sample in samples:
            key = self._key(sample.image)
            if key not in self.entries:
                raise KeyError(
                    f"{sample.source}: image {sample.image!r} is not in the feature cache {self.directory}"
                )
            shard, row = self.entries[key]
            rows.append(np.asarray(self._shard(shard)[row]))
        values = torch.from_numpy(np.stack(rows))
        return values.view(torch.bfloat16) if self.dtype == torch.bfloat16 else values


class CachedFeatureCollator:
    """The training collator with ``image_features`` from the cache in place of ``pixel_values``;
    ``pairs``: its preference batches (one image's features per pair)."""

    def __init__(self, collator, cache: FeatureCache, pairs: bool = False):
        self.collator = collator
        self.cache = cache
        self.pairs = pairs

    def __call__(self, batch: Sequence[tuple[int, Sample]]) -> dict[str, torch.Tensor]:
        out = self.collator.preference_text_batch(batch) if self.pairs else self.collator.text_batch(batch)
        out["image_features"] = self.cache.features([sample for _, sample in batch])
        return out
