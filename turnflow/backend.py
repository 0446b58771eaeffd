"""Backends: a named model server, its client, and what it can do, asked of the server itself.

Capabilities come from what the server reports (`/props` of llama-server: slots, context, modalities;
`/v1/models`: input and output modalities), overridable per backend in `backends.yaml`. They decide the
DAG's branches, so one built driver is cached per capability profile.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnflow.adapters import AdapterError, AdapterSet, BaseModelRef, resolve_base
from turnflow.gguf_header import read_gguf
from turnflow.kv import KvFiles
from turnflow.model_facts import note, recorded, remembered
from turnflow.nodes.llm import ChatClient
from turnflow.nodes.prompt import Prompt
from turnflow.nodes.text import ControlTokens, message_text
from turnflow.recipe import BackendSpec
from turnflow.server import EmbeddedServer, LoraFile, ServerError, lora_field


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


@dataclass
class AdapterLease:
    """A persona's adapters on the backend for one turn: the request's `lora` list and what was resident."""

    lora: list[dict[str, Any]] | None
    resident: list[str]
    paged_in: list[str] = field(default_factory=list)
    page_ms: float = 0.0
    release: Callable[[], None] = lambda: None
    pool_tokens: int = 0
    """The KV pool the server has (embedded servers), after any growth this turn."""


class Backend:
    """A named model server ready for turns."""

    def __init__(self, name: str, spec: BackendSpec, url: str, server: EmbeddedServer | None = None):
        self.name = name
        self.spec = spec
        self.url = url
        self.server = server
        self._api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        self.client = self._client(url)
        self.capabilities = self._probe()
        self._base_model: BaseModelRef | None | bool = False
        self._loaded_adapters: list[dict[str, Any]] | None = None
        self._bytes_per_token: float | None = None  # prompt bytes per server token, learned from each turn
        self._bytes_per_token_of: dict[str, float] = {}  # the same, per invariant prefix
        self._kv_files: KvFiles | None = None
        self._swap = threading.Lock()
        self._control_tokens: ControlTokens | None = None
        self._stops: list[str] | None = None
        self._retired: list[ChatClient] = []

    @property
    def control_tokens(self) -> ControlTokens:
        """The model's own control tokens: its GGUF's special tokens (embedded servers), else those its chat
        template writes, as the server's tokenizer confirms them (`/props`, `/tokenize`)."""
        if self._control_tokens is None:
            found: list[str] = []
            if self.server is not None:
                found = gguf_special_tokens(self.server.model_path)
            elif self.capabilities.server == "llama.cpp":
                found = self._template_tokens()
            self._control_tokens = ControlTokens(found)
        return self._control_tokens

    @property
    def stop_sequences(self) -> list[str]:
        """Where a reply ends: the turn markers of the model's chat template (its GGUF's for embedded servers,
        else the one the llama.cpp server applies, from `/props`), plus `request_defaults.stop`. A base model
        that does not stop at its template's end marker is cut there, so the marker and what follows never
        reach history or speech."""
        if self._stops is None:
            template = ""
            if self.server is not None:
                template = gguf_chat_template(self.server.model_path)
            if not template and self.capabilities.server == "llama.cpp":
                # a GGUF without a template (Gemma 3 270M's) is served with llama-server's default: ask for it
                template = str((self.client.get_json("/props", root=True) or {}).get("chat_template") or "")
            extra = self.spec.request_defaults.get("stop") or []
            self._stops = template_stops(template) + [s for s in ([extra] if isinstance(extra, str) else extra)]
        return self._stops

    def _template_tokens(self) -> list[str]:
        props = self.client.get_json("/props", root=True) or {}
        template = str(props.get("chat_template") or "")
        candidates = sorted(set(_MARKUP_IN_TEMPLATE.findall(template)))
        return [c for c in candidates if self.client.count_tokens(c, special=True) == 1]

    # -- KV

    @property
    def kv_paging(self) -> bool:
        """Whether turnflow saves and restores personas' KV (embedded servers, unless turned off)."""
        if self.server is None:
            return False
        return self.spec.kv_paging is not False

    @property
    def kv_budgeted(self) -> bool:
        """Whether the KV pool has a fixed budget (idle personas are paged out rather than the pool grown)."""
        return self.server is not None and self.server.budgeted

    @property
    def kv_files(self) -> KvFiles:
        """The saved KV files of this server's model and cache type."""
        if self._kv_files is None:
            assert self.server is not None
            self._kv_files = KvFiles(self.server.slot_dir, self.spec.kv_disk_budget_mb)
        return self._kv_files

    @functools.cached_property
    def model_digest(self) -> str:
        """SHA-256 of the model file (embedded servers; empty for a server reached by URL)."""
        return self.server.model_digest if self.server is not None else ""

    @functools.cached_property
    def kv_bytes_per_token(self) -> float | None:
        """KV bytes per token of context, from the model file (embedded servers)."""
        return self.server.bytes_per_token() if self.server is not None else None

    def estimate_tokens(self, prompt: Prompt) -> int:
        """About how many tokens a prompt is: its bytes over the bytes per token of the last prompt with the same
        invariant prefix (the same persona and adapter set; their ratios differ by a few per cent), else of the
        last prompt (the first time, the server counts the prompt's text with `/tokenize`; an embedded server's
        model keeps that count on disk for the next process)."""
        size = prompt.invariant_bytes + prompt.semi_stable_bytes + prompt.volatile_bytes
        own = self._bytes_per_token_of.get(prompt.invariant_sha256)
        if own is not None:
            return int(size / own) + 16
        if self._bytes_per_token is None:
            noted = recorded(self.server.model_path, "bytes_per_token") if self.server is not None else None
            if noted:
                self._bytes_per_token = float(noted)
            else:
                text = "".join(message_text(m) for m in prompt.messages)
                counted = self.client.count_tokens(text) if self.capabilities.server == "llama.cpp" else None
                self._bytes_per_token = max(0.5, len(text.encode()) / counted) if counted else 3.0
                if counted and self.server is not None:
                    note(self.server.model_path, "bytes_per_token", self._bytes_per_token)
        return int(size / self._bytes_per_token) + 16

    def learn_token_size(self, prompt: Prompt, prompt_tokens: int | None) -> None:
        """Refine the bytes-per-token estimate from a turn the server counted."""
        size = prompt.invariant_bytes + prompt.semi_stable_bytes + prompt.volatile_bytes
        if prompt_tokens and size:
            self._bytes_per_token = ratio = max(0.5, size / prompt_tokens)
            if len(self._bytes_per_token_of) >= 4096:  # prefixes of personas and adapter sets long gone
                self._bytes_per_token_of.clear()
            self._bytes_per_token_of[prompt.invariant_sha256] = ratio

    def note_kv_usage(self, tokens_in_slots: int) -> None:
        """Tell an embedded server how much KV its slots hold (its next start sizes the pool from the peak)."""
        if self.server is not None:
            self.server.note_usage(tokens_in_slots)

    def _client(self, url: str) -> ChatClient:
        return ChatClient(url, model=self.spec.model if self.spec.kind == "openai" else None, api_key=self._api_key)

    @property
    def base_model(self) -> BaseModelRef | None:
        """The model the backend runs (architecture, sha256 of the GGUF), when turnflow knows its file."""
        if self._base_model is False:
            self._base_model = None
            if self.spec.kind == "embedded":
                self._base_model = resolve_base(self.spec.model or "generated:tiny")[0]
        return self._base_model if isinstance(self._base_model, BaseModelRef) else None

    def lease_adapters(self, adapters: AdapterSet, slot: int | None, *, pool_needed: int = 0) -> AdapterLease:
        """Make the persona's LoRA adapters resident for this turn and give the request's `lora` list.

        An embedded server pages missing adapters in (a restart that keeps every slot's KV); a server of
        the user's own must already have loaded them (`GET /lora-adapters`), else the turn fails here,
        before the model call. Release the lease once the reply has been read.
        """
        scales = {a.key: a.scale for a in adapters.loras}
        if self.server is not None:
            needed = [LoraFile(a.key, a.id, str(a.path)) for a in adapters.loras]
            try:
                lease = self.server.lease(needed, slot=slot, slot_set=sorted(scales.items()), pool_needed=pool_needed)
            except ServerError as exc:
                raise AdapterError(str(exc)) from None
            with self._swap:
                if lease.url != self.url:  # the restart moved to another port; other turns may still hold the old
                    self._retired.append(self.client)
                    self.url = lease.url
                    client = self._client(lease.url)
                    client.llama_cpp = self.client.llama_cpp  # the same server, restarted on another port
                    self.client = client
            names = {entry["key"]: entry["id"] for entry in lease.resident}
            return AdapterLease(
                lora_field(lease.lora_ids(), scales), [names[k] for k in lease.lora_ids()], lease.paged_in,
                lease.page_ms, lease.release, lease.pool_tokens,
            )
        loaded = self._server_adapters(refresh=False)
        ids = _match_loaded(adapters, loaded)
        if len(ids) < len(adapters.loras):
            ids = _match_loaded(adapters, self._server_adapters(refresh=True))
        missing = [a for a in adapters.loras if a.key not in ids]
        if missing:
            have = ", ".join(Path(str(e.get("path", "?"))).name for e in self._loaded_adapters or []) or "none"
            raise AdapterError(
                f"backend {self.name!r} at {self.url} has not loaded adapter(s) "
                f"{', '.join(f'{a.id} ({a.path.name})' for a in missing)} (it has: {have}); start it with "
                f"--lora FILE,... --lora-init-without-apply"
            )
        by_id = {ids[key]: scale for key, scale in scales.items()}
        loaded = self._loaded_adapters or []
        lora = [{"id": int(e["id"]), "scale": float(by_id.get(int(e["id"]), 0.0))} for e in loaded] or None
        # what the server holds, by registry id: the persona's own adapters, else the registry's entry for the
        # file, else (a file the registry does not know) the file's name
        from turnflow.adapters import AdapterRegistry

        persona_ids = {ids[a.key]: a.id for a in adapters.loras}
        registry: AdapterRegistry | None = None
        resident = []
        for entry in loaded:
            known = persona_ids.get(int(entry["id"]))
            if known is None:
                registry = registry or AdapterRegistry()
                known = registry.id_for_file(str(entry.get("path", ""))) or Path(str(entry.get("path", ""))).name
            resident.append(known)
        return AdapterLease(lora, resident)

    def _server_adapters(self, *, refresh: bool) -> list[dict[str, Any]]:
        if self._loaded_adapters is None or refresh:
            data = self.client.get_json_list("/lora-adapters")
            self._loaded_adapters = [e for e in data if isinstance(e, dict) and "id" in e]
        return self._loaded_adapters

    @property
    def key(self) -> str:
        """Identity of this server for slot assignments."""
        return f"{self.name}@{self.url}"

    def refresh(self) -> Capabilities:
        """Ask the server again (after it changed)."""
        self.capabilities = self._probe()
        return self.capabilities

    def _probe(self) -> Capabilities:
        """What the server can do; its client is told whether it is a llama-server (every stop string is sent to
        one, and its timings asked for in every event)."""
        capabilities = probe(self.client, self.spec.capabilities)
        self.client.llama_cpp = capabilities.server == "llama.cpp"
        return capabilities

    def close(self) -> None:
        """Close the client."""
        for client in (*self._retired, self.client):
            client.close()

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
        return Backend(name, spec, url, server)
    if not spec.url:
        raise ServerError(f"backend {name!r} has no url in backends.yaml")
    return Backend(name, spec, spec.url)


def _match_loaded(adapters: AdapterSet, loaded: list[dict[str, Any]]) -> dict[str, int]:
    """Adapter key -> the server's id, matching the server's loaded files by path or file name."""
    ids: dict[str, int] = {}
    for adapter in adapters.loras:
        for entry in loaded:
            path = str(entry.get("path", ""))
            if path == str(adapter.path) or Path(path).name == adapter.path.name:
                ids[adapter.key] = int(entry["id"])
                break
    return ids


_MARKUP_IN_TEMPLATE = re.compile(r"<[^<>\s'\"{}]{1,64}>|\[[A-Z_/]{2,32}\]")

_NOT_A_TURN_MARKER = re.compile(r"bos|begin_of_text|image|audio|vision|tool|think|pad", re.I)


def template_stops(template: str) -> list[str]:
    """The turn markers a chat template writes (`<|im_end|>`, `<|im_start|>`, `<end_of_turn>`, ...): text a reply
    never contains, so where one appears the reply has ended. Ordered by first use in the template."""
    found: list[str] = []
    for marker in _MARKUP_IN_TEMPLATE.findall(template):
        if marker not in found and not _NOT_A_TURN_MARKER.search(marker) and not marker.startswith("</"):
            found.append(marker)
    return found


def gguf_chat_template(path: Path) -> str:
    """A GGUF model's packaged chat template (`tokenizer.chat_template`), or ''."""
    return str(remembered(path, "tokenizer", _tokenizer_facts)["chat_template"])


def gguf_special_tokens(path: Path) -> list[str]:
    """The special tokens of a GGUF model's tokenizer: control, user-defined, unknown and unused ones.

    Runs of whitespace (Gemma's vocabulary declares `\\n\\n\\n`, tabs and spaces as user-defined tokens) are left
    out: they steer nothing, and defusing them would change people's indentation."""
    return list(remembered(path, "tokenizer", _tokenizer_facts)["special_tokens"])


def _tokenizer_facts(path: Path) -> dict[str, Any]:
    """A GGUF model's special tokens and chat template, from its header (~0.3 s for a 262k-token vocabulary: the
    answer is recorded per model file)."""
    import gguf

    metadata = read_gguf(path, string_arrays=["tokenizer.ggml.tokens"])[0]
    tokens, types = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
    special: list[str] = []
    if tokens is not None and types is not None:
        kinds = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNKNOWN),
                 int(gguf.TokenType.UNUSED)}
        special = [text for text, kind in zip(tokens, [int(t) for t in types], strict=False)
                   if kind in kinds and text.strip()]
    return {"special_tokens": special, "chat_template": str(metadata.get("tokenizer.chat_template") or "")}
