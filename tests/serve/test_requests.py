"""Request bodies and images: what is accepted, and every refusal names the field and the limit."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest
from PIL import Image, ImageFile

from pg_tune.serve.images import ImagePolicy, read_image
from pg_tune.serve.requests import Limits, RequestError, parse_chat_request, parse_json_body
from tests.serve.helpers import chat_body, data_url, shape_images
from tests.test_bad_input import _png_claiming

LIMITS = Limits(max_tokens=32, max_image_bytes=4096, max_image_pixels=512 * 512)
IMAGE = shape_images(1, size=48)[0]


def _refused(body, status=400, match=""):
    with pytest.raises(RequestError) as err:
        parse_chat_request(body, LIMITS)
    assert err.value.status == status and match in err.value.message, err.value.message
    return err.value


def test_a_full_request_is_read():
    body = chat_body(IMAGE, "detect circle", model="m", max_tokens=8, temperature=0.7, top_p=0.9, seed=3,
                     stop=["\n"], stream=True, stream_options={"include_usage": True}, task="detect", n=1, user="u")  # fmt: skip
    chat = parse_chat_request(body, LIMITS)
    assert (chat.prompt, chat.task, chat.max_tokens, chat.temperature, chat.top_p) == (
        "detect circle",
        "detect",
        8,
        0.7,
        0.9,
    )
    assert (chat.seed, chat.stop, chat.stream, chat.include_usage, chat.model) == (
        3,
        ("\n",),
        True,
        True,
        "m",
    )
    assert chat.image_url.startswith("data:image/png;base64,") and chat.sampling


def test_defaults_are_greedy_with_the_servers_token_budget():
    chat = parse_chat_request(chat_body(IMAGE, "caption en"), LIMITS)
    assert (chat.temperature, chat.max_tokens, chat.stop, chat.stream, chat.sampling) == (
        0.0,
        32,
        (),
        False,
        False,
    )
    assert parse_chat_request(chat_body(IMAGE, "caption en", max_completion_tokens=5), LIMITS).max_tokens == 5


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_tokens": 33}, "between 1 and 32"),
        ({"max_tokens": 0}, "between 1 and 32"),
        ({"max_tokens": True}, "max_tokens must be int"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "not both"),
        ({"temperature": 3}, "temperature=3: between 0 and 2"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, "top_p=0 keeps no token"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "non-empty string"),
        ({"n": 2}, "n=2 is not supported"),
        ({"logprobs": True}, "logprobs=True is not supported"),
        ({"tools": []}, "unrecognised request argument 'tools'"),
        ({"stream_options": {"include_usage": True}}, "needs stream: true"),
        ({"stream": "yes"}, "stream must be bool"),
    ],
)
def test_bad_fields_are_refused_by_name(fields, match):
    _refused(chat_body(IMAGE, "caption en", **fields), match=match)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": []}], "exactly one user message"),
        ([{"role": "user", "content": "caption en"}], "the model needs an image"),
        ([{"role": "user", "content": [{"type": "text", "text": "caption en"}]}], "exactly one image_url part, got 0"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "exactly one non-empty text"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "a text or image_url part"),
        ([], "non-empty list"),
    ],
)  # fmt: skip
def test_only_one_user_turn_with_one_image_and_one_prompt(messages, match):
    _refused({"messages": messages}, match=match)


def test_a_body_that_is_not_a_json_object_is_refused():
    with pytest.raises(RequestError, match="not JSON"):
        parse_json_body(b"{nope")
    with pytest.raises(RequestError, match="must be a JSON object, got list"):
        parse_json_body(b"[1]")


# ---- images --------------------------------------------------------------------------------------


def test_a_data_url_image_is_decoded():
    image = read_image(data_url(IMAGE), LIMITS, ImagePolicy())
    assert image.size == IMAGE.size and image.mode == "RGB"
    assert read_image(data_url(IMAGE, "JPEG"), LIMITS, ImagePolicy()).size == IMAGE.size


def test_an_oversized_image_is_refused_413_before_decoding():
    noise = Image.effect_noise((96, 96), 80).convert("RGB")  # incompressible: > 4096 bytes as PNG
    with pytest.raises(RequestError) as err:
        read_image(data_url(noise), LIMITS, ImagePolicy())
    assert (
        err.value.status == 413 and "over the server's 4,096-byte limit (--max-image-mb)" in err.value.message
    )


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    bomb = _png_claiming(tmp_path / "bomb.png", 2_000, 2_000).read_bytes()  # 75 bytes claiming 4 Mpx
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    with pytest.raises(RequestError) as err:
        read_image(url, LIMITS, ImagePolicy())
    assert err.value.status == 400 and "2000x2000 pixels, over the 262,144-pixel bound" in err.value.message
    assert decoded == [], "the pixels were decoded before the size check"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("data:image/png;base64,@@@@", "does not decode"),
        ("data:text/plain,hello", "a data URL must be data:image/<type>;base64"),
        ("data:image/png;base64," + base64.b64encode(b"GIF89a-not-really").decode(), "cannot read image"),
    ],
)
def test_bad_data_urls_are_refused(url, match):
    with pytest.raises(RequestError, match=match):
        read_image(url, LIMITS, ImagePolicy())


def test_only_png_jpeg_webp_gif_bmp_are_decoded():
    buffer = io.BytesIO()
    IMAGE.resize((16, 16)).save(buffer, "TIFF")
    url = "data:image/tiff;base64," + base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(RequestError, match="cannot read image"):
        read_image(url, LIMITS, ImagePolicy())


def test_local_files_only_under_images_dir(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    IMAGE.save(root / "sub" / "a.png")
    IMAGE.save(tmp_path / "secret.png")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    policy = ImagePolicy(images_dir=root)
    assert read_image("sub/a.png", LIMITS, policy).size == IMAGE.size
    assert read_image((root / "sub" / "a.png").as_uri(), LIMITS, policy).size == IMAGE.size
    with pytest.raises(RequestError, match="only under a folder the server names with --images-dir"):
        read_image("sub/a.png", LIMITS, ImagePolicy())
    for outside in (
        "../secret.png",
        str(tmp_path / "secret.png"),
        (tmp_path / "secret.png").as_uri(),
        "escape.png",
    ):
        with pytest.raises(RequestError, match="outside --images-dir"):
            read_image(outside, LIMITS, policy)
    with pytest.raises(RequestError, match="no such file under --images-dir"):
        read_image("sub/none.png", LIMITS, policy)
    with pytest.raises(RequestError, match="scheme 'ftp'"):
        read_image("ftp://example/a.png", LIMITS, policy)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    payloads: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.payloads.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def test_remote_images_only_with_allow_remote_images_and_within_the_limit():
    small = io.BytesIO()
    IMAGE.save(small, "PNG")
    big = io.BytesIO()
    Image.effect_noise((96, 96), 80).convert("RGB").save(big, "PNG")
    _ImageHandler.payloads = {"/small.png": small.getvalue(), "/big.png": big.getvalue()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(
            RequestError, match="not fetched unless the server runs with --allow-remote-images"
        ):
            read_image(f"{base}/small.png", LIMITS, ImagePolicy())
        allowed = ImagePolicy(allow_remote=True)
        assert read_image(f"{base}/small.png", LIMITS, allowed).size == IMAGE.size
        with pytest.raises(RequestError) as err:
            read_image(f"{base}/big.png", LIMITS, allowed)
        assert err.value.status == 413
        with pytest.raises(RequestError, match="could not fetch it"):
            read_image(f"{base}/missing.png", LIMITS, allowed)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
