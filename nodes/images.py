"""Images a speaker shares in a turn: decoded, checked, and either shown to a model that sees or described.

A model that sees gets each image as an OpenAI `image_url` part (a base64 data URL: the same bytes give
the same part, so a past image keeps the prefix warm). A text-only model gets the description bridge's
words instead: any OpenAI-compatible vision chat endpoint, asked once per image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from turnflow.recipe.schema import HTTP_BRIDGE_KEYS

from .openai_http import OpenAiHttp, api_base

MAX_IMAGE_BYTES = 10 * 1024 * 1024

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class ImageError(ValueError):
    """An image that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Image:
    """One image: its bytes and media type."""

    data: bytes
    mime: str
    name: str = "image"

    @property
    def data_url(self) -> str:
        """The image as a base64 data URL."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes."""
        return hashlib.sha256(self.data).hexdigest()


def _sniff(data: bytes) -> str | None:
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def load_image(source: str | Path | bytes | dict[str, Any]) -> Image:
    """An image from a path, raw bytes, a data URL, or an OpenAI `image_url` part."""
    name = "image"
    if isinstance(source, dict):
        source = str((source.get("image_url") or {}).get("url") or source.get("url") or "")
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ImageError("an image data URL must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the image data URL is not valid base64: {exc}") from None
    elif isinstance(source, str | Path):
        path = Path(source)
        name = path.name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read image {str(path)!r}: {exc.strerror or exc}") from None
    else:
        data = bytes(source)
    if not data:
        raise ImageError(f"image {name!r} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image {name!r} is {len(data) / 1e6:.1f} MB; the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB")
    mime = _sniff(data)
    if mime is None:
        raise ImageError(f"{name!r} is not a PNG, JPEG, GIF or WebP image")
    return Image(data, mime, name)


class HttpDescriber(OpenAiHttp):
    """The description bridge: an OpenAI-compatible vision chat endpoint that describes an image in words."""

    prompt = "Describe this image for someone who cannot see it, in two plain sentences."

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout)
        self.url = api_base(url) + "/chat/completions"
        self.model = model

    def _error(self, message: str) -> Exception:
        return ImageError(f"the description bridge at {self.url} failed: {message}")

    def _unreachable(self, url: str, exc: httpx.HTTPError) -> Exception:
        return self._error(str(exc))

    def describe(self, image: Image) -> str:
        """A short description of the image."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": self.prompt},
                {"type": "image_url", "image_url": {"url": image.data_url}},
            ]}],
        }
        response = self._post(self.url, json=body)
        try:
            return str(response.json()["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, ValueError) as exc:
            raise self._error(str(exc)) from None


def make_describer(spec: str | dict[str, Any] | None) -> HttpDescriber | None:
    """The description bridge from a recipe value (`{url, model}`), or None when the recipe has none."""
    if spec in (None, "none"):
        return None
    if isinstance(spec, dict) and isinstance(spec.get("url"), str):
        allowed = HTTP_BRIDGE_KEYS["describe"]
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ValueError(f"the describe bridge does not take {unknown}; allowed keys: {sorted(allowed)}")
        return HttpDescriber(spec["url"], str(spec.get("model", "vision")), spec.get("api_key"),
                             float(spec.get("timeout", 60.0)))
    raise ValueError(f"unknown describe bridge {spec!r}; use {{'url': ..., 'model': ...}} or leave it out")
