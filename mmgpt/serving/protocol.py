"""The OpenAI-compatible API's requests, checked field by field before anything is decoded or queued, and its
responses. A bad field is an APIError: its HTTP status and a message that says what is wrong and what to send.

Extensions to OpenAI's fields (the `openai` client sends them through `extra_body`): `top_k`, and `features`, a
(P, F) list of numbers given instead of images (the model's context features, as infer.py reads them from .npz).
"""
from __future__ import annotations

import base64
import binascii
import math
import re
import time
import uuid
from dataclasses import dataclass

from mmgpt.runtime.sampling import MIN_TEMPERATURE, SEED_MAX

DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*)*;base64,", re.ASCII)


class APIError(Exception):
    """An answer other than 200: the status, and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """Sizes checked before any decoding: the raw body, each image's decoded bytes, choices per request, and the
    images a request may carry."""
    max_body_bytes: int = 1 << 20
    max_image_bytes: int = 256 << 10
    max_images: int = 16
    max_n: int = 8


@dataclass
class GenerationParams:
    """What a completion or chat request asks for, checked."""
    model: str
    prompt: str  # text after the BOS token
    images: list[bytes]  # decoded image files, in the order given
    features: list | None  # (P, F) nested lists of numbers
    max_tokens: int
    n: int
    stream: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None: each choice draws a fresh seed


def _field(body: dict, name: str, kind, default, check=None, hint: str = ""):
    value = body.get(name, default)
    if value is None:
        value = default
    if value is None:
        return None
    ok_kind = (isinstance(value, bool) if kind is bool else
               isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
               isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
    if not ok_kind or (kind is float and not math.isfinite(value)) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}'={value!r} is invalid: {hint}", param=name)
    return value


def _common(body: dict, limits: Limits, default_max_tokens: int) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: a model name from GET /v1/models", param="model")
    temperature = _field(body, "temperature", float, 1.0, lambda t: 0 <= t <= 2 and (t == 0 or t >= MIN_TEMPERATURE),
                         f"temperature must lie in [0, 2] (0 = greedy; not below {MIN_TEMPERATURE} otherwise)")
    return dict(
        model=model,
        max_tokens=_field(body, "max_tokens", int, default_max_tokens, lambda v: v >= 1, "max_tokens must be >= 1"),
        n=_field(body, "n", int, 1, lambda v: 1 <= v <= limits.max_n, f"n must lie in [1, {limits.max_n}]"),
        stream=_field(body, "stream", bool, False, hint="stream must be true or false"),
        temperature=float(temperature),
        top_p=float(_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "top_p must lie in (0, 1]")),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "top_k must be >= 0 (0 = off)"),
        seed=_field(body, "seed", int, None, lambda v: 0 <= v <= SEED_MAX, "seed must lie in [0, 2**63 - 1]"),
        features=_features(body.get("features")))


def _features(value) -> list | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value)
            or len({len(row) for row in value}) != 1 or not value[0]):
        raise APIError(400, "'features' must be a (P, F) list of P lists of F numbers each, as the model's context "
                            "features", param="features")
    for row in value:
        for x in row:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise APIError(400, f"'features' holds {x!r}: every entry must be a finite number (float32)",
                               param="features")
    return value


def parse_completion(body: dict, limits: Limits, default_max_tokens: int = 16) -> GenerationParams:
    """POST /v1/completions: `prompt` (a string) and optionally `features`."""
    common = _common(body, limits, default_max_tokens)
    prompt = _field(body, "prompt", str, "", hint="prompt must be a string")
    return GenerationParams(prompt=prompt, images=[], **common)


def parse_chat(body: dict, limits: Limits, default_max_tokens: int = 16) -> GenerationParams:
    """POST /v1/chat/completions: the user messages' text is the prompt; their `image_url` parts (data URLs) are the
    images, in order."""
    common = _common(body, limits, default_max_tokens)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    texts, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           param="messages")
        content = message.get("content")
        if message["role"] != "user":
            continue  # a captioning model has no chat template: only what the user gives is context
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of content parts",
                           param="messages")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if len(images) == limits.max_images:
                    raise APIError(400, f"more than {limits.max_images} images in one request", param="messages")
                images.append(decode_data_url(url, limits, f"messages[{i}].content[{j}]"))
            else:
                raise APIError(400, f"messages[{i}].content[{j}] must be a text part or an image_url part",
                               param="messages")
    return GenerationParams(prompt="".join(texts), images=images, **common)


def decode_data_url(url, limits: Limits, where: str) -> bytes:
    """A base64 image data URL -> its bytes, size-checked before decoding. Anything else (file://, http(s)://) is
    refused: the server reads no local file and fetches nothing."""
    if not isinstance(url, str):
        raise APIError(400, f"{where}: image_url.url must be a string", param="messages")
    match = DATA_URL.match(url)
    if match is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise APIError(400, f"{where}: image_url {shown!r} is not a base64 image data URL; send the image inline as "
                            "data:image/png;base64,... (file paths and remote URLs are never fetched)",
                       param="messages")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(413, f"{where}: the image is {len(payload) * 3 // 4} bytes, more than the "
                            f"{limits.max_image_bytes} allowed; downscale it", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URL's payload is not valid base64", param="messages") from None


# ---------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def completion_response(rid: str, model: str, chat: bool, choices: list[dict], usage: dict) -> dict:
    """choices: index, text, token_ids, finish_reason (token_ids: an extension, every generated id of the decoded
    modality, so a non-text modality's tokens come back too)."""
    if chat:
        choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                    "finish_reason": c["finish_reason"], "token_ids": c["token_ids"]} for c in choices]
    else:
        choices = [{**c, "logprobs": None} for c in choices]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


def chunk(rid: str, model: str, chat: bool, index: int, text: str, token_ids: list[int],
          finish_reason: str | None, first: bool) -> dict:
    """One streamed event of one choice."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "token_ids": token_ids}
    else:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "token_ids": token_ids,
                  "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
