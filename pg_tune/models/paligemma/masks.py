"""Masks to ``<segNNN>`` tokens and back: a PyTorch port of big_vision's VQ-VAE mask codec.

PaliGemma's referring-segmentation answers are ``<loc..>x4`` then 16 ``<segNNN>`` codes. The codes
come from a small VQ-VAE (big_vision ``pp/proj/paligemma/segmentation.py`` encodes,
``evaluators/proj/paligemma/transfers/segmentation.py`` decodes; the network is AiT's mask VQ-VAE,
arXiv 2301.02229, whose PyTorch weights big_vision publishes as ``vae-oid.npz``).

Layout of ``vae-oid.npz`` (PyTorch state-dict keys; conv weights ``(out, in, kh, kw)``, transposed
conv weights ``(in, out, kh, kw)`` as PyTorch stores them)::

    encoder.0/2/4/6      4x4 convs, stride 2, 1->16->32->64->128 channels, ReLU after each
    encoder.8.net/9.net  residual blocks at 128: conv3x3 (.0), ReLU, conv3x3 (.2), ReLU, conv1x1 (.4)
    encoder.10           1x1 conv 128->512
    _vq_vae._embedding   (128, 512) codebook (+ unused EMA buffers _ema_w, _ema_cluster_size)
    decoder.0            1x1 conv 512->128, ReLU
    decoder.2.net/3.net  residual blocks at 128
    decoder.4/6/8/10     4x4 transposed convs, stride 2, 128->128->64->32->16, ReLU after each
    decoder.12           1x1 conv 16->1

The kernel sizes and widths come from big_vision's decoder (``dim = 128``, halved after each
transposed conv), AiT's ``vae/configs/insseg/ait_insseg_vqvae.py`` (``hidden_dim=16``,
``codebook_dim=512``, ``num_tokens=128``, ``downsample_ratio=16``) and were checked against the
published file: these shapes saved with ``np.savez`` give exactly its 8,479,556 bytes (3x3 encoder
kernels would give 8,178,052). big_vision runs the encoder with TF ``"SAME"`` padding, which we
replicate exactly (for a 4x4 kernel on even sizes it equals PyTorch ``padding=1``, what AiT trained
with); the decoder's transposed convs are PyTorch ``padding=1``.

Resizing: encoding resizes the box crop to 64x64 with ``torch.nn.functional.interpolate(bilinear,
antialias=True)``, the PyTorch counterpart of big_vision's ``tf.image.resize(bilinear,
antialias=True)`` (same triangle filter; results may differ in the last float bits). Decoding
resizes with PIL ``BILINEAR`` on the float output, exactly as big_vision's evaluator does.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pg_tune.models.paligemma.boxes import NUM_SEG_TOKENS, Detection, encode_box, parse_detections

__all__ = [
    "MASK_SIZE",
    "NUM_CODES",
    "EMBEDDING_DIM",
    "VAE_URL",
    "VAE_SHA256",
    "VAE_NUM_BYTES",
    "MaskCodec",
    "MaskCodecUnavailableError",
    "conv2d_tf_same",
    "crop_mask_to_64",
    "make_random_vae_weights",
    "nearest_codes",
    "paste_mask_64",
    "save_npz",
    "tf_same_padding",
    "vae_weight_shapes",
]

MASK_SIZE = 64
NUM_CODES = 128
EMBEDDING_DIM = 512
VAE_URL = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"
VAE_SHA256 = "5586010257b8536dddefab65e7755077f21d5672d5674dacf911f73ae95a4447"
VAE_NUM_BYTES = 8_479_556
VAE_FILENAME = "vae-oid.npz"

_ENCODER_WIDTHS = (1, 16, 32, 64, 128)
_DECODER_WIDTHS = (128, 128, 64, 32, 16)
_HIDDEN = 128


def _resblock_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for index, kernel in ((0, 3), (2, 3), (4, 1)):
        shapes[f"{prefix}.{index}.weight"] = (_HIDDEN, _HIDDEN, kernel, kernel)
        shapes[f"{prefix}.{index}.bias"] = (_HIDDEN,)
    return shapes


def vae_weight_shapes(include_ema: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of the published ``vae-oid.npz`` and its shape (see the module docstring).

    ``include_ema`` adds the VQ layer's EMA training buffers: the codec never reads them, but the
    published file has them, and a random file that mirrors it byte for byte needs them too.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(4):
        c_in, c_out = _ENCODER_WIDTHS[i], _ENCODER_WIDTHS[i + 1]
        shapes[f"encoder.{2 * i}.weight"] = (c_out, c_in, 4, 4)
        shapes[f"encoder.{2 * i}.bias"] = (c_out,)
    shapes.update(_resblock_shapes("encoder.8.net"))
    shapes.update(_resblock_shapes("encoder.9.net"))
    shapes["encoder.10.weight"] = (EMBEDDING_DIM, _HIDDEN, 1, 1)
    shapes["encoder.10.bias"] = (EMBEDDING_DIM,)
    shapes["decoder.0.weight"] = (_HIDDEN, EMBEDDING_DIM, 1, 1)
    shapes["decoder.0.bias"] = (_HIDDEN,)
    shapes.update(_resblock_shapes("decoder.2.net"))
    shapes.update(_resblock_shapes("decoder.3.net"))
    for i, layer in enumerate((4, 6, 8, 10)):
        c_in, c_out = _DECODER_WIDTHS[i], _DECODER_WIDTHS[i + 1]
        shapes[f"decoder.{layer}.weight"] = (c_in, c_out, 4, 4)  # ConvTranspose2d layout
        shapes[f"decoder.{layer}.bias"] = (c_out,)
    shapes["decoder.12.weight"] = (1, _DECODER_WIDTHS[-1], 1, 1)
    shapes["decoder.12.bias"] = (1,)
    shapes["_vq_vae._embedding"] = (NUM_CODES, EMBEDDING_DIM)
    if include_ema:
        shapes["_vq_vae._ema_cluster_size"] = (NUM_CODES,)
        shapes["_vq_vae._ema_w"] = (NUM_CODES, EMBEDDING_DIM)
    return shapes


def make_random_vae_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in the published key layout, for tests and the offline demo.

    He-scaled so activations stay finite through the network; they encode nothing meaningful.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for key, shape in vae_weight_shapes().items():
        if key.endswith(".weight"):
            is_transposed = key in {f"decoder.{i}.weight" for i in (4, 6, 8, 10)}
            fan_in = (shape[0] if is_transposed else shape[1]) * shape[2] * shape[3]
            array = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
        elif key.endswith(".bias"):
            array = rng.normal(0.0, 0.01, size=shape)
        elif key == "_vq_vae._ema_cluster_size":
            array = np.ones(shape)
        else:
            array = rng.normal(0.0, 1.0, size=shape)
        weights[key] = array.astype(np.float32)
    return weights


def save_npz(weights: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write weights like the published file (uncompressed ``np.savez``), returning the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **{k: np.asarray(v) for k, v in weights.items()})
    return path


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``"SAME"`` padding for one dimension: ``(before, after)``; the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d_tf_same(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int
) -> torch.Tensor:
    """``tf.nn.conv2d(padding="SAME")`` on NCHW tensors with PyTorch ``(out, in, kh, kw)`` weights.

    TF pads asymmetrically when the total is odd (e.g. 3x3 kernel, stride 2, even input: 0 before,
    1 after), which no PyTorch ``padding=`` value reproduces, so we pad explicitly.
    """
    top, bottom = tf_same_padding(x.shape[-2], weight.shape[-2], stride)
    left, right = tf_same_padding(x.shape[-1], weight.shape[-1], stride)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, weight, bias, stride=stride)


def nearest_codes(vectors: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Index of the L2-nearest codebook row for each vector ``(N, D)`` -> ``(N,)``.

    Distances are taken in float64 so near-ties are not decided by float32 cancellation in the
    ``|a|^2 + |b|^2 - 2ab`` expansion big_vision uses.
    """
    a = vectors.to(torch.float64)
    b = embedding.to(torch.float64)
    distances = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.T
    return distances.argmin(dim=1)


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size!r}")
    return width, height


def _mask_as_unit_float(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D HxW array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if mask.dtype == np.uint8:  # big_vision's masks are uint8 0/255
        return mask.astype(np.float32) / 255.0
    values = mask.astype(np.float32)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(
            f"float mask values must lie in [0, 1], got [{values.min()}, {values.max()}]; "
            "pass a bool mask or uint8 0..255"
        )
    return values


def crop_mask_to_64(mask: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray:
    """Crop an HxW mask to its pixel box and resize to 64x64, values in [0, 1] (big_vision's rule).

    Rows ``round(y0)..round(y1)`` and columns ``round(x0)..round(x1)`` are kept, which is
    big_vision's ``round(h * ymin)`` etc. for a box given in pixels. Mask: bool, float in [0, 1],
    or uint8 in [0, 255].
    """
    values = _mask_as_unit_float(mask)
    height, width = values.shape
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    top, bottom = min(max(round(y0), 0), height), min(max(round(y1), 0), height)
    left, right = min(max(round(x0), 0), width), min(max(round(x1), 0), width)
    if bottom <= top or right <= left:
        raise ValueError(f"box {list(box_xyxy)!r} covers no pixels of the {width}x{height} mask")
    crop = torch.from_numpy(np.ascontiguousarray(values[top:bottom, left:right]))[None, None]
    resized = F.interpolate(
        crop, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0, 0].clamp(0.0, 1.0).numpy()


def paste_mask_64(mask64: np.ndarray, box_xyxy: Sequence[float], image_size: Sequence[int]) -> np.ndarray:
    """Resize a 64x64 decoder output to the box, threshold at 0, paste into a full-size bool mask.

    Follows big_vision's evaluator: box corners are truncated with ``int()``, the resize is PIL
    bilinear on floats. A box that covers no pixel gives an all-False mask (the evaluator scores
    such a prediction as empty).
    """
    width, height = _check_image_size(image_size)
    full = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (int(float(v)) for v in box_xyxy)
    x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
    y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
    if x1 <= x0 or y1 <= y0:
        return full
    image = Image.fromarray(np.ascontiguousarray(mask64, dtype=np.float32))
    resized = np.asarray(image.resize((x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR))
    full[y0:y1, x0:x1] = resized > 0.0
    return full


class MaskCodecUnavailableError(RuntimeError):
    """The VQ-VAE weights are not on disk and could not be downloaded."""


def _http_download(url: str, destination: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as f:
        shutil.copyfileobj(response, f)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _default_cache_dir() -> Path:
    root = os.environ.get("PG_TUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pg_tune")
    return Path(root)


class MaskCodec:
    """big_vision's mask VQ-VAE in PyTorch: 64x64 masks <-> 16 codes, plus the crop/paste around it."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        expected = vae_weight_shapes(include_ema=False)
        missing = sorted(k for k in expected if k not in weights)
        wrong = sorted(
            f"{k}: {tuple(np.shape(weights[k]))} (want {shape})"
            for k, shape in expected.items()
            if k in weights and tuple(np.shape(weights[k])) != shape
        )
        if missing or wrong:
            raise ValueError(
                f"VQ-VAE weights do not match vae-oid.npz's layout; missing {missing}, wrong shapes {wrong}"
            )
        self.params = {k: torch.from_numpy(np.asarray(weights[k], dtype=np.float32).copy()) for k in expected}

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> MaskCodec:
        """Load weights saved in the published layout (the real ``vae-oid.npz`` or ``save_npz`` output)."""
        with np.load(Path(path), allow_pickle=False) as data:
            return cls({k: data[k] for k in data.files})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        *,
        url: str = VAE_URL,
        sha256: str = VAE_SHA256,
        num_bytes: int = VAE_NUM_BYTES,
        download: Callable[[str, Path], None] = _http_download,
    ) -> MaskCodec:
        """Load ``path`` if it exists; otherwise use (or download into) ``cache_dir/vae-oid.npz``.

        A download (or an existing cached copy) is checked against the published size and sha256
        before it is used; a file passed as ``path`` is trusted as is. Without
        network this raises ``MaskCodecUnavailableError`` saying how to fetch the file by hand.
        ``cache_dir`` defaults to ``$PG_TUNE_CACHE`` or ``~/.cache/pg_tune``.
        """
        if path is not None and Path(path).is_file():
            return cls.from_npz(path)
        cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        target = cache / VAE_FILENAME
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=cache, suffix=".part")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                try:
                    download(url, tmp)
                except (urllib.error.URLError, OSError, TimeoutError) as err:
                    where = f"{path!s} does not exist and " if path is not None else ""
                    raise MaskCodecUnavailableError(
                        f"{where}could not download the mask VQ-VAE weights from {url} ({err}). "
                        f"Download vae-oid.npz manually on a machine with network access "
                        f"(expected {num_bytes} bytes, sha256 {sha256}), then pass its path: "
                        f"MaskCodec.load('/path/to/vae-oid.npz'), or put it at {target}."
                    ) from err
                size, digest = tmp.stat().st_size, _sha256(tmp)
                if size != num_bytes or digest != sha256:
                    raise ValueError(
                        f"downloaded {url} is corrupt: {size} bytes, sha256 {digest}; "
                        f"expected {num_bytes} bytes, sha256 {sha256}"
                    )
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            size, digest = target.stat().st_size, _sha256(target)
            if size != num_bytes or digest != sha256:
                raise ValueError(
                    f"cached {target} is not the published file ({size} bytes, sha256 {digest}; expected "
                    f"{num_bytes} bytes, sha256 {sha256}): delete it to download again, or pass your own path"
                )
        return cls.from_npz(target)

    # -- the network -------------------------------------------------------------------------

    def _resblock(self, x: torch.Tensor, prefix: str, tf_same: bool) -> torch.Tensor:
        p = self.params
        h = x
        for index in (0, 2, 4):
            weight, bias = p[f"{prefix}.{index}.weight"], p[f"{prefix}.{index}.bias"]
            h = conv2d_tf_same(h, weight, bias, 1) if tf_same else F.conv2d(h, weight, bias, padding="same")
            if index != 4:
                h = F.relu(h)
        return x + h

    @torch.no_grad()
    def encode_grid(self, masks64: torch.Tensor) -> torch.Tensor:
        """Masks ``(B, 64, 64)`` in [0, 1] -> encoder output ``(B, 512, 4, 4)`` before quantisation."""
        p = self.params
        x = 2.0 * (masks64.to(torch.float32)[:, None] - 0.5)
        for i in range(4):
            x = F.relu(conv2d_tf_same(x, p[f"encoder.{2 * i}.weight"], p[f"encoder.{2 * i}.bias"], 2))
        x = self._resblock(x, "encoder.8.net", tf_same=True)
        x = self._resblock(x, "encoder.9.net", tf_same=True)
        return conv2d_tf_same(x, p["encoder.10.weight"], p["encoder.10.bias"], 1)

    @torch.no_grad()
    def encode_codes(self, masks64: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Masks ``(B, 64, 64)`` in [0, 1] -> codes ``(B, 16)``, row-major over the 4x4 grid."""
        masks64 = torch.as_tensor(masks64, dtype=torch.float32)
        if masks64.ndim != 3 or tuple(masks64.shape[1:]) != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks64 must be (B, 64, 64), got {tuple(masks64.shape)}")
        grid = self.encode_grid(masks64)
        batch = grid.shape[0]
        vectors = grid.permute(0, 2, 3, 1).reshape(-1, EMBEDDING_DIM)
        return nearest_codes(vectors, self.params["_vq_vae._embedding"]).reshape(batch, NUM_SEG_TOKENS)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Codes ``(B, 16)`` -> decoder output ``(B, 64, 64)``, trained to lie in [-1, 1] (0 = edge)."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != NUM_SEG_TOKENS:
            raise ValueError(f"codes must be (B, 16), got shape {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= NUM_CODES):
            raise ValueError(f"codes must lie in [0, {NUM_CODES - 1}], got {codes.tolist()}")
        p = self.params
        x = p["_vq_vae._embedding"][codes].reshape(-1, 4, 4, EMBEDDING_DIM).permute(0, 3, 1, 2)
        x = F.relu(F.conv2d(x, p["decoder.0.weight"], p["decoder.0.bias"]))
        x = self._resblock(x, "decoder.2.net", tf_same=False)
        x = self._resblock(x, "decoder.3.net", tf_same=False)
        for layer in (4, 6, 8, 10):
            x = F.relu(F.conv_transpose2d(x, p[f"decoder.{layer}.weight"], p[f"decoder.{layer}.bias"], 2, 1))
        x = F.conv2d(x, p["decoder.12.weight"], p["decoder.12.bias"])
        return x[:, 0]

    # -- pixels <-> codes ----------------------------------------------------------------------

    def encode_mask(
        self, mask: np.ndarray, box_xyxy: Sequence[float], image_size: Sequence[int]
    ) -> list[int]:
        """Full-image HxW mask and its pixel box -> the 16 ``<seg>`` codes for it."""
        width, height = _check_image_size(image_size)
        if np.shape(mask) != (height, width):
            raise ValueError(
                f"mask shape {np.shape(mask)} does not match image_size {tuple(image_size)} (w, h)"
            )
        mask64 = crop_mask_to_64(mask, box_xyxy)
        return self.encode_codes(mask64[None])[0].tolist()

    def decode_mask(
        self, codes16: Sequence[int], box_xyxy: Sequence[float], image_size: Sequence[int]
    ) -> np.ndarray:
        """16 codes and a pixel box -> full-size HxW bool mask (False outside the box)."""
        mask64 = self.decode_codes([list(codes16)])[0].numpy()
        return paste_mask_64(mask64, box_xyxy, image_size)

    def encode_segment(self, mask: np.ndarray, box_xyxy: Sequence[float], image_size: Sequence[int]) -> str:
        """Referring-segmentation suffix: ``"<loc..>x4<seg..>x16"`` (big_vision puts no space between)."""
        codes = self.encode_mask(mask, box_xyxy, image_size)
        return encode_box(box_xyxy, image_size) + "".join(f"<seg{c:03d}>" for c in codes)

    def parse_segment(
        self, text: str, image_size: Sequence[int]
    ) -> list[tuple[Detection, np.ndarray | None]]:
        """Every object in generated text with its decoded mask (None when it had no 16 seg codes).

        Tolerates the same garbage as ``parse_detections``; the mask is pasted into the decoded box.
        """
        results: list[tuple[Detection, np.ndarray | None]] = []
        for detection in parse_detections(text, image_size):
            mask = (
                None if detection.seg is None else self.decode_mask(detection.seg, detection.box, image_size)
            )
            results.append((detection, mask))
        return results


_LOADED: dict[str, MaskCodec] = {}


def load_codec(vae_path: str | os.PathLike | None) -> MaskCodec | None:
    """The one loader of the mask VQ-VAE: ``vae_path``, else a copy in the local cache, else None.

    Never downloads (use ``MaskCodec.load`` for that). Each file is loaded once per process. A
    ``vae_path`` that does not exist raises ``FileNotFoundError`` naming it.
    """
    if vae_path is None:
        cached = _default_cache_dir() / VAE_FILENAME
        if not cached.is_file():
            return None
        vae_path = cached
    key = str(Path(vae_path).resolve())
    if key not in _LOADED:
        if not Path(vae_path).is_file():
            raise FileNotFoundError(
                f"VQ-VAE weights not found: {vae_path} (big_vision's vae-oid.npz, sha256 {VAE_SHA256[:12]}...; "
                f"set model.vae_path to where you saved it)"
            )
        _LOADED[key] = MaskCodec.from_npz(vae_path)
    return _LOADED[key]
