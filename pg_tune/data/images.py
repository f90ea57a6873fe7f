"""Opening images safely: clear errors naming the file, and a bound on decompression bombs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from pg_tune.data.bad_rows import data_error

# 8192 x 8192: far above any resolution PaliGemma uses (896 px), far below what exhausts memory.
MAX_IMAGE_PIXELS = 8192 * 8192


# PIL's modes for 16- and 32-bit integer pixels (16-bit grayscale PNGs open as I;16 or I).
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grayscale is scaled (65535 -> 255), not clipped: PIL's own ``convert``
    clips every value above 255 to white."""
    if image.mode in _WIDE_INT_MODES:
        import numpy as np

        wide = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs hold 0..65535; an "I" image beyond that range is clipped into it first.
        eight = np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    return image.convert("RGB")


def load_image(image: str | Path | Image.Image, source: str = "") -> Image.Image:
    """Return an RGB image, or raise ``DataError`` saying which file and row were bad and why."""
    where = f"{source}: " if source else ""
    if isinstance(image, Image.Image):
        # Lazily opened in-memory images (hf rows' bytes) decode here: a truncated one is a bad row.
        try:
            return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise data_error(
                "corrupt_image", f"{where}cannot decode the image (corrupt or truncated?): {e}"
            ) from None
    path = Path(image)
    if not path.is_file():
        raise data_error("missing_image", f"{where}image file not found: {path}")
    return _decode_bounded(path, f"image {path}", where, MAX_IMAGE_PIXELS)


def decode_image_bytes(
    data: bytes, source: str, max_pixels: int = MAX_IMAGE_PIXELS, formats: Sequence[str] | None = None
) -> Image.Image:
    """An RGB image from encoded bytes (an upload, a ``data:`` URL), refused as ``DataError`` when its
    header says it is over ``max_pixels`` (checked before any pixel is decoded: a decompression bomb
    is a small file with huge dimensions), when it is not one of ``formats`` (PIL format names), or
    when it does not decode."""
    import io

    return _decode_bounded(io.BytesIO(data), "image", f"{source}: " if source else "", max_pixels, formats)


def _decode_bounded(
    fp, what: str, where: str, max_pixels: int, formats: Sequence[str] | None = None
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=list(formats) if formats else None) as im:
                if im.width * im.height > max_pixels:
                    raise data_error(
                        "image_too_large",
                        f"{where}{what} is {im.width}x{im.height} pixels, over the "
                        f"{max_pixels:,}-pixel bound (a decompression bomb, or far too large to use)",
                    )
                im.load()
                return to_rgb(im)
    except ValueError as e:
        if getattr(e, "reason", None):
            raise
        raise data_error("corrupt_image", f"{where}cannot read {what} (corrupt or truncated?): {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise data_error("image_too_large", f"{where}{what} refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError) as e:
        raise data_error("corrupt_image", f"{where}cannot read {what} (corrupt or truncated?): {e}") from None


def image_size(image: str | Path | Image.Image, source: str = "") -> tuple[int, int]:
    """(width, height) read from the header only, without decoding the pixels."""
    if isinstance(image, Image.Image):
        return image.size
    path = Path(image)
    if not path.is_file():
        raise data_error("missing_image", f"{source + ': ' if source else ''}image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise data_error(
            "corrupt_image", f"{source + ': ' if source else ''}cannot read image {path}: {e}"
        ) from None
