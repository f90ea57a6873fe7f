"""An OpenAI ``POST /v1/chat/completions`` body read into one ``ChatRequest``, within the limits.

What is accepted (anything else is refused with a 400 naming the field, as OpenAI refuses
unrecognised arguments)::

    {"model": "demo-shapes",                        # optional; if given, the served model's id
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": "caption en"}]}], # exactly one user turn: one image, one prompt
     "max_tokens": 32,                              # or max_completion_tokens; at most --max-tokens
     "temperature": 0,                              # 0 or absent: greedy, as pg-tune eval decodes
     "top_p": 1, "seed": 7, "stop": ["\\n"],         # sampling settings; up to 4 stop strings
     "stream": false, "stream_options": {"include_usage": true},
     "task": "detect"}                              # pg_tune's: how to read the answer (else from the prompt)

The user text IS the model's prompt: the family maps it as it maps a dataset row's prefix
(PaliGemma: ``caption en``, ``detect cat ; dog`` as is; chat families: big_vision prefixes become
instructions, other text passes through). The models were fine-tuned on one image and one prompt,
so system or earlier turns are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pg_tune.data.images import MAX_IMAGE_PIXELS

MAX_STOP_STRINGS = 4  # OpenAI's own limit


class RequestError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "server_overloaded",
            503: "service_unavailable",
            504: "timeout",
        }.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``pg-tune serve`` flags)."""

    max_body_bytes: int = 32 * 2**20
    """Whole request body (a base64 image is 4/3 of its bytes)."""
    max_image_bytes: int = 20 * 2**20
    """One encoded image (OpenAI's limit for image inputs)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Width x height from the image header, checked before decoding (decompression bombs)."""
    max_tokens: int = 256
    """Default and upper bound of ``max_tokens``."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request, validated; the image still as its URL (``images.py`` reads it)."""

    prompt: str
    image_url: str
    task: str | None
    """Named outright (``task``), else read from the prompt by the server."""
    max_tokens: int
    temperature: float
    """0: greedy."""
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str | None

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


_KNOWN = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "stream", "stream_options", "n", "user", "task", "frequency_penalty", "presence_penalty", "logprobs",
}  # fmt: skip
_NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "n": 1}
"""Arguments accepted only at the value that changes nothing (``n: 1``)."""


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat_request(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """Validate a chat completion body; ``RequestError`` (400) names the first bad field."""
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise RequestError(
            400,
            f"unrecognised request argument {unknown[0]!r}; supported: {', '.join(sorted(_KNOWN))}",
            unknown[0],
        )
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] is not None and body[key] != neutral:
            raise RequestError(400, f"{key}={body[key]!r} is not supported (only {neutral!r})", key)
    prompt, image_url = _user_turn(body.get("messages"))
    model = _optional(body, "model", str)
    task = _optional(body, "task", str)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _optional(body, key, int)
    if max_tokens is None:
        max_tokens = limits.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(
            400, f"{key}={max_tokens}: between 1 and {limits.max_tokens} (the server's --max-tokens)", key
        )
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError(400, "top_p=0 keeps no token; use temperature=0 for greedy decoding", "top_p")
    seed = _optional(body, "seed", int)
    stop = _stop(body.get("stop"))
    stream = _optional(body, "stream", bool) or False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError(400, "stream_options needs stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(400, 'stream_options: only {"include_usage": bool}', "stream_options")
        include_usage = bool(options.get("include_usage", False))
    return ChatRequest(
        prompt=prompt,
        image_url=image_url,
        task=task,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        model=model,
    )


def _optional(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python: refuse true for an integer field, and 1 for a boolean one.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(400, f"{key} must be {kind.__name__}, got {value!r}", key)
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"{key} must be a number, got {value!r}", key)
    if not low <= value <= high:
        raise RequestError(400, f"{key}={value}: between {low:g} and {high:g}", key)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _user_turn(messages: Any) -> tuple[str, str]:
    """The prompt and the image URL of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user"]:
        raise RequestError(
            400,
            f"messages: exactly one user message (one image and its prompt), got roles {roles}; these models "
            "were fine-tuned on a single turn, without system prompts or history",
            "messages",
        )
    content = messages[0].get("content")
    if isinstance(content, str):
        raise RequestError(
            400, "messages[0].content: a list with one image_url part and one text part (the model needs an image)",
            "messages",
        )  # fmt: skip
    if not isinstance(content, list):
        raise RequestError(400, "messages[0].content must be a list of parts", "messages")
    texts, images = [], []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(
                    400, f"messages[0].content[{k}].image_url.url must be a string", "messages"
                )
            images.append(url)
        else:
            raise RequestError(
                400, f"messages[0].content[{k}]: a text or image_url part, got {str(part)[:80]}", "messages"
            )
    if len(images) != 1:
        raise RequestError(
            400, f"messages[0].content: exactly one image_url part, got {len(images)}", "messages"
        )
    if len(texts) != 1 or not texts[0].strip():
        raise RequestError(
            400,
            f"messages[0].content: exactly one non-empty text part (the prompt, e.g. 'caption en'), got {len(texts)}",
            "messages",
        )
    return texts[0], images[0]
