"""Images in a turn: `image_url` parts for a model that sees, the description bridge for one that does not.

No vision model runs here: the model that sees, and the description bridge (any OpenAI-compatible vision
chat endpoint), are stand-ins following OpenAI's documented request and response shapes. The text-only
model is the real embedded llama-server.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RECIPE, copy_recipe_folder, llama_server_or_skip, without_adapters

from turnflow.nodes.images import ImageError, load_image
from turnflow.recipe import default_backends_path, load_backends
from turnflow.server import EmbeddedServer
from turnflow.session import Session


def png_bytes(seed: int = 0) -> bytes:
    """A small real PNG (matplotlib's encoder)."""
    from matplotlib import image as mpimg

    buffer = io.BytesIO()
    mpimg.imsave(buffer, np.random.default_rng(seed).random((16, 24, 3)), format="png")
    return buffer.getvalue()


class _VisionStub(BaseHTTPRequestHandler):
    """Answers like an OpenAI-compatible vision chat model; records what it was sent."""

    received: list[dict[str, Any]] = []

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = {"data": [{"id": "vision", "architecture": {"input_modalities": ["text", "image"],
                                                            "output_modalities": ["text"]}}]}
        self._send(json.dumps(body).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _VisionStub.received.append(body)
        if body.get("stream"):
            chunks = [{"choices": [{"delta": {"content": "I see it."}, "finish_reason": "stop"}]}]
            payload = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            self._send(payload, "text/event-stream")
        else:
            answer = {"choices": [{"message": {"role": "assistant", "content": "A chart of sprint velocity."}}]}
            self._send(json.dumps(answer).encode(), "application/json")

    def _send(self, payload: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def vision_stub() -> Iterator[str]:
    """URL of a running stand-in vision endpoint."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VisionStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _VisionStub.received.clear()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_load_image_accepts_paths_bytes_and_data_urls(tmp_path: Path) -> None:
    data = png_bytes()
    path = tmp_path / "chart.png"
    path.write_bytes(data)
    from_path = load_image(path)
    assert from_path.mime == "image/png" and from_path.name == "chart.png"
    assert load_image(data).sha256 == from_path.sha256
    assert load_image(from_path.data_url).data == data
    assert load_image({"type": "image_url", "image_url": {"url": from_path.data_url}}).data == data


@pytest.mark.parametrize(
    ("source", "words"),
    [
        (b"%PDF-1.7 not an image", "is not a PNG, JPEG, GIF or WebP"),
        (b"", "is empty"),
        ("data:image/png;base64,@@@not base64@@@", "not valid base64"),
        ("data:image/png,rawtext", "must be base64"),
        (b"\x89PNG\r\n\x1a\n" + bytes(11 * 1024 * 1024), "limit is 10 MB"),
    ],
)
def test_bad_images_are_refused_clearly(source: bytes | str, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        load_image(source)


def test_model_that_sees_gets_image_url_parts(tmp_path: Path, vision_stub: str) -> None:
    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")  # the stand-in loads no LoRA files
    (recipe.parent / "backends.yaml").write_text(f"backends:\n  seer:\n    kind: openai\n    url: {vision_stub}\n")
    with Session(recipe, backend="seer", state_dir=tmp_path / "state") as session:
        result = session.turn(persona="maya", room="r", text="What do you make of this?", images=[png_bytes()])
    assert result.report["route"]["images_in"] == "native"
    assert result.report["invocations"]["describe"] == 0
    parts = _VisionStub.received[-1]["messages"][-1]["content"]
    image_parts = [p for p in parts if p["type"] == "image_url"]
    assert len(image_parts) == 1 and image_parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(image_parts[0]["image_url"]["url"].split(",", 1)[1]) == png_bytes()


@pytest.mark.server
def test_text_only_model_gets_the_description(home: Path, tmp_path: Path, vision_stub: str) -> None:
    llama_server_or_skip()
    EmbeddedServer("local", load_backends(default_backends_path())["local"]).up()
    recipe = copy_recipe_folder(tmp_path)
    recipe.write_text(recipe.read_text().replace(
        "  tts: espeak-ng", f"  tts: espeak-ng\n  describe: {{url: '{vision_stub}', model: vision}}"
    ))
    chart = tmp_path / "velocity.png"
    chart.write_bytes(png_bytes())
    with Session(recipe, backend="local", state_dir=tmp_path / "state") as session:
        result = session.turn(persona="maya", room="r", text="Look at this.", images=[chart])
        history = session.store.history("r")
    assert result.report["route"]["images_in"] == "describe"
    assert result.report["invocations"]["describe"] == 1
    sent = result.prompt.messages[-1]["content"]
    assert {"type": "text", "text": "[image velocity.png: A chart of sprint velocity.]"} in sent
    assert not any(p.get("type") == "image_url" for p in sent)  # the text-only server never gets the image
    asked = _VisionStub.received[-1]["messages"][0]["content"]
    assert any(p["type"] == "image_url" for p in asked)  # the bridge did
    assert history[-2].content == sent  # stored as the model saw it: the prefix stays warm next turn


@pytest.mark.server
def test_image_without_a_way_to_see_it_is_refused(home: Path, tmp_path: Path) -> None:
    llama_server_or_skip()
    EmbeddedServer("local", load_backends(default_backends_path())["local"]).up()
    with Session(RECIPE, backend="local", state_dir=tmp_path / "state") as session:
        with pytest.raises(ImageError, match="description bridge"):
            session.turn(persona="maya", room="r", text="Look.", images=[png_bytes()])
        assert session.store.history("r") == []
