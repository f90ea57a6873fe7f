"""A request's ``image_url`` read into an RGB image, within the limits, from where it may come from.

- ``data:image/...;base64,...``: always; its size is checked from the base64 length before decoding.
- a local file (``file:///abs/path`` or a path relative to the folder): only under the folder the
  user named with ``--images-dir`` (symlinks resolved first, so none leads out of it).
- ``http(s)://``: only with ``--allow-remote-images`` (the server would fetch any address a client
  names, including ones inside your network); read up to the byte limit, with a timeout.

Every image is checked by its header before a pixel is decoded (``pg_tune.data.images``: width x
height over the bound is a decompression bomb) and must be PNG, JPEG, WebP, GIF or BMP.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from pg_tune.data.images import decode_image_bytes
from pg_tune.data.sample import DataError
from pg_tune.serve.requests import Limits, RequestError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
REMOTE_TIMEOUT_S = 10.0
_DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.I)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from (``--images-dir``, ``--allow-remote-images``)."""

    images_dir: Path | None = None
    allow_remote: bool = False


def read_image(url: str, limits: Limits, policy: ImagePolicy) -> Image.Image:
    """The image ``url`` names, decoded; ``RequestError`` (400, or 413 over the byte limit) says why not."""
    if url[:5].lower() == "data:":
        data = _data_url_bytes(url, limits)
    elif url.lower().startswith(("http://", "https://")):
        data = _remote_bytes(url, limits, policy)
    else:
        data = _local_bytes(url, limits, policy)
    try:
        return decode_image_bytes(data, "image_url", limits.max_image_pixels, FORMATS)
    except DataError as e:
        raise RequestError(400, str(e), "messages") from None


def _too_large(size: int, limits: Limits) -> RequestError:
    return RequestError(
        413,
        f"image_url: the image is {size:,} bytes, over the server's {limits.max_image_bytes:,}-byte limit "
        "(--max-image-mb)",
        "messages",
    )


def _data_url_bytes(url: str, limits: Limits) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise RequestError(400, "image_url: a data URL must be data:image/<type>;base64,<data>", "messages")
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > limits.max_image_bytes + 2:  # decoded size, known before decoding
        raise _too_large(len(payload) * 3 // 4, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(
            400, f"image_url: the data URL's base64 does not decode: {e}", "messages"
        ) from None


def _local_bytes(url: str, limits: Limits, policy: ImagePolicy) -> bytes:
    if policy.images_dir is None:
        raise RequestError(
            400,
            f"image_url {url[:100]!r}: local files are read only under a folder the server names with "
            "--images-dir; send the image as a data: URL",
            "messages",
        )
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(400, f"image_url {url[:100]!r}: a file URL on another host", "messages")
        raw = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # "c:" is a drive letter, not a scheme
        raise RequestError(
            400,
            f"image_url {url[:100]!r}: scheme {parsed.scheme!r}; use data:, file:, or http(s):",
            "messages",
        )
    else:
        raw = Path(url)
    root = policy.images_dir.resolve()
    path = (root / raw).resolve()  # an absolute raw replaces root; symlinks resolved either way
    if not path.is_relative_to(root):
        raise RequestError(400, f"image_url {url[:100]!r}: outside --images-dir {root}", "messages")
    if not path.is_file():
        raise RequestError(400, f"image_url {url[:100]!r}: no such file under --images-dir", "messages")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise _too_large(size, limits)
    return path.read_bytes()


def _remote_bytes(url: str, limits: Limits, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise RequestError(
            400,
            f"image_url {url[:100]!r}: remote images are not fetched unless the server runs with "
            "--allow-remote-images; send the image as a data: URL",
            "messages",
        )
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "pg_tune-serve"})
    try:
        with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise _too_large(int(declared), limits)
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RequestError(400, f"image_url {url[:100]!r}: could not fetch it: {e}", "messages") from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(len(data), limits)
    return data
