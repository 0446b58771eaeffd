"""Stand-ins for servers that cannot run here, following what the real ones send (OpenAI's documented shapes)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], port: int = 0) -> Iterator[str]:
    """`handler` served on loopback (`port` 0: a free one) while the block runs; yields the `/v1` URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def speaking_model(loaded_adapters: Sequence[Path] = ()) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A model server that hears and speaks (OpenAI audio models; none runs here), with LoRA files "loaded"
    as llama-server lists them at `/lora-adapters`. Yields its `/v1` URL and the request bodies it got."""
    requests: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/models":
                body: Any = {"data": [{"id": "speaker", "architecture": {"input_modalities": ["text", "audio"],
                                                                       "output_modalities": ["text", "audio"]}}]}
            elif self.path == "/lora-adapters":
                body = [{"id": i, "path": str(path), "scale": 0.0} for i, path in enumerate(loaded_adapters)]
            else:
                self._send(404, b"{}", "application/json")
                return
            self._send(200, json.dumps(body).encode(), "application/json")

        def do_POST(self) -> None:  # noqa: N802
            requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(4800) / 24000) * 32767).astype("<i2").tobytes()
            chunks = [
                {"choices": [{"delta": {"audio": {"id": "a1", "transcript": "Hello there. "}}}]},
                *[{"choices": [{"delta": {"audio": {"data": base64.b64encode(tone).decode()}}}]} for _ in range(5)],
                {"choices": [{"delta": {"audio": {"transcript": "Bye."}}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 120, "completion_tokens": 9,
                           "prompt_tokens_details": {"cached_tokens": 100}}},
            ]
            payload = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            self._send(200, payload, "text/event-stream")

        def _send(self, status: int, payload: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with _serving(Handler) as url:
        yield url, requests


@contextmanager
def echo_model(reply: str, *, chat_template: str | None = None,
               requests: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """An OpenAI-compatible chat server whose every reply is `reply`, streamed in a few pieces, ignoring any
    `stop` it is sent (as a base model under a foreign template does). With `chat_template`, it serves
    llama-server's `/props` with that template. Request bodies go to `requests`. Yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            found = self.path == "/v1/models" or (self.path == "/props" and chat_template is not None)
            body = json.dumps({"data": [{"id": "echo"}]} if self.path == "/v1/models" else
                              {"chat_template": chat_template, "total_slots": 1} if found else {}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            got = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if requests is not None:
                requests.append(got)
            pieces = [reply[i:i + 7] for i in range(0, len(reply), 7)]
            chunks = [{"choices": [{"delta": {"content": p}}]} for p in pieces]
            chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 10, "completion_tokens": len(pieces)}})
            payload = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with _serving(Handler) as url:
        yield url


@contextmanager
def tool_calling_model(name: str, arguments: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OpenAI-compatible chat server that answers a request offering tools with a call of `name` (streamed in
    pieces, as OpenAI streams `tool_calls`), and a request that carries a tool result with a short reply.
    Yields its `/v1` URL and the request bodies it got."""
    requests: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            found = self.path == "/v1/models"
            body = json.dumps({"data": [{"id": "tool-caller"}]}).encode() if found else b"{}"
            self._send(200 if found else 404, body, "application/json")

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                self._send(404, b"{}", "application/json")
                return
            requests.append(body)
            answered = any(m.get("role") == "tool" for m in body["messages"])
            if body.get("tools") and not answered:
                half = len(arguments) // 2
                chunks: list[dict[str, Any]] = [
                    {"choices": [{"delta": {"role": "assistant", "tool_calls": [
                        {"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": name, "arguments": arguments[:half]}}]}}]},
                    {"choices": [{"delta": {"tool_calls": [
                        {"index": 0, "function": {"arguments": arguments[half:]}}]}}]},
                    {"choices": [{"delta": {}, "finish_reason": "tool_calls"}],
                     "usage": {"prompt_tokens": 200, "completion_tokens": 12}},
                ]
            else:
                chunks = [{"choices": [{"delta": {"content": "The release is blocked."}}]},
                          {"choices": [{"delta": {}, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 230, "completion_tokens": 6}}]
            payload = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            self._send(200, payload, "text/event-stream")

        def _send(self, status: int, payload: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with _serving(Handler) as url:
        yield url, requests


@contextmanager
def recording_model(reply: str = "Noted.", port: int = 0) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OpenAI-compatible chat server (as a router or a pod behind one sees requests) that records each chat
    request's headers and body and replies `reply`, on `port` (0: a free one). Yields its `/v1` URL and the records
    (`path`, `headers`, `body`)."""
    records: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"data": [{"id": "recorder"}]}).encode() if self.path == "/v1/models" else b"{}"
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            records.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body})
            chunks = [{"choices": [{"delta": {"content": reply}}]},
                      {"choices": [{"delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 1}}]
            payload = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with _serving(Handler, port) as url:
        yield url, records


@contextmanager
def keep_alive_model(reply: str, connections: list[int]) -> Iterator[str]:
    """An OpenAI-compatible chat server that keeps its connections open between requests (HTTP/1.1, the stream sent
    chunked as vLLM and OpenAI send it), ending each stream's body a moment after `[DONE]`. Each new connection
    appends to `connections`. Yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            connections.append(len(connections) + 1)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            chunks = [{"choices": [{"delta": {"content": reply}}]},
                      {"choices": [{"delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 3}}]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in [*(f"data: {json.dumps(c)}\n\n" for c in chunks), "data: [DONE]\n\n"]:
                data = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            time.sleep(0.05)  # the body's end comes after [DONE], as over a network
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    with _serving(Handler) as url:
        yield url
