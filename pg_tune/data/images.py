"""Opening images safely: clear errors naming the file, and a bound on decompression bombs."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from pg_tune.data.bad_rows import data_error

# 8192 x 8192: far above any resolution PaliGemma uses (896 px), far below what exhausts memory.
MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(image: str | Path | Image.Image, source: str = "") -> Image.Image:
    """Return an RGB image, or raise ``DataError`` saying which file and row were bad and why."""
    where = f"{source}: " if source else ""
    if isinstance(image, Image.Image):
        # Lazily opened in-memory images (hf rows' bytes) decode here: a truncated one is a bad row.
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise data_error(
                "corrupt_image", f"{where}cannot decode the image (corrupt or truncated?): {e}"
            ) from None
    path = Path(image)
    if not path.is_file():
        raise data_error("missing_image", f"{where}image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise data_error(
                        "image_too_large",
                        f"{where}image {path} is {im.width}x{im.height} pixels, over the "
                        f"{MAX_IMAGE_PIXELS:,}-pixel bound (a decompression bomb, or far too large to train on)",
                    )
                im.load()
                return im.convert("RGB")
    except ValueError as e:
        if getattr(e, "reason", None):
            raise
        raise data_error(
            "corrupt_image", f"{where}cannot read image {path} (corrupt or truncated?): {e}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise data_error(
            "image_too_large", f"{where}image {path} refused as a decompression bomb: {e}"
        ) from None
    except (OSError, SyntaxError) as e:
        raise data_error(
            "corrupt_image", f"{where}cannot read image {path} (corrupt or truncated?): {e}"
        ) from None


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
