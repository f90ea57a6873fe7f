"""The web playground at ``/``: one self-contained page (``playground.html``, inline CSS and JS).

Pick or drop an image, choose a task (or type any prompt), and the page sends it to
``/v1/chat/completions`` as an OpenAI client would (the image as a ``data:`` URL), then shows the
answer, the raw text and the parsed objects, with boxes and masks (COCO RLE, decoded in the page)
drawn on the image. It loads nothing from anywhere else: the Content-Security-Policy below lets it
talk only to this server, so it works offline and cannot leak an image to a third party.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def playground_html() -> str:
    return files("pg_tune.serve").joinpath("playground.html").read_text(encoding="utf-8")
