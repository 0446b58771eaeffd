"""Backends: a named model server, its client, and what it can do, asked of the server itself.

Capabilities come from what the server reports (`/props` of llama-server: slots, context, modalities;
`/v1/models`: input and output modalities), overridable per backend in `backends.yaml`. They decide the
DAG's branches, so one built driver is cached per capability profile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from turnflow.nodes.llm import ChatClient
from turnflow.recipe import BackendSpec
from turnflow.server import EmbeddedServer, ServerError


@dataclass(frozen=True)
class Capabilities:
    """What a backend accepts and emits, and how its KV cache is organised."""

    audio_in: bool = False
    audio_out: bool = False
    vision: bool = False
    total_slots: int | None = None
    n_ctx: int | None = None
    server: str = "openai"

    @property
    def profile(self) -> dict[str, str]:
        """The part that shapes the DAG (Hamilton config): which branches the turn takes."""
        return {
            "route_audio_in": "native" if self.audio_in else "stt",
            "route_audio_out": "native" if self.audio_out else "tts",
            "route_images_in": "native" if self.vision else "describe",
        }


def probe(client: ChatClient, overrides: dict[str, bool] | None = None) -> Capabilities:
    """Ask the server what it can do; `overrides` (from backends.yaml) win."""
    props = client.get_json("/props", root=True) or {}
    models = client.get_json("/models") or {}
    modalities = props.get("modalities") or {}
    inputs: set[str] = set()
    outputs: set[str] = set()
    for entry in models.get("data") or []:
        arch = entry.get("architecture") or {}
        inputs.update(arch.get("input_modalities") or [])
        outputs.update(arch.get("output_modalities") or [])
    found = {
        "audio_in": bool(modalities.get("audio")) or "audio" in inputs,
        "audio_out": "audio" in outputs,
        "vision": bool(modalities.get("vision")) or "image" in inputs,
    }
    found.update(overrides or {})
    slots = props.get("total_slots")
    n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx") or props.get("n_ctx")
    return Capabilities(
        audio_in=found["audio_in"],
        audio_out=found["audio_out"],
        vision=found["vision"],
        total_slots=int(slots) if slots else None,
        n_ctx=int(n_ctx) if n_ctx else None,
        server="llama.cpp" if props else "openai",
    )


class Backend:
    """A named model server ready for turns."""

    def __init__(self, name: str, spec: BackendSpec, url: str):
        self.name = name
        self.spec = spec
        self.url = url
        api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        model = spec.model if spec.kind == "openai" else None
        self.client = ChatClient(url, model=model, api_key=api_key)
        self.capabilities = probe(self.client, spec.capabilities)

    @property
    def key(self) -> str:
        """Identity of this server for slot assignments."""
        return f"{self.name}@{self.url}"

    def refresh(self) -> Capabilities:
        """Ask the server again (after it changed)."""
        self.capabilities = probe(self.client, self.spec.capabilities)
        return self.capabilities

    def close(self) -> None:
        """Close the client."""
        self.client.close()

    def describe(self) -> dict[str, Any]:
        """Name, URL and capabilities, for reports and the CLI."""
        return {"name": self.name, "url": self.url, **self.capabilities.__dict__}


def open_backend(name: str, spec: BackendSpec, *, start: bool = True) -> Backend:
    """Connect to a backend, starting the embedded server first when it is one and `start` is set."""
    if spec.kind == "embedded":
        server = EmbeddedServer(name, spec)
        if start:
            url = server.up()
        else:
            status = server.status()
            if not status.get("running"):
                raise ServerError(f"embedded backend {name!r} is not running; start it with `turnflow server up`")
            url = status["url"]
        return Backend(name, spec, url)
    if not spec.url:
        raise ServerError(f"backend {name!r} has no url in backends.yaml")
    return Backend(name, spec, spec.url)
