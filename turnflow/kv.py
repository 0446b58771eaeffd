"""The KV memory model and KV paging: what a token of context costs, and personas' KV saved to disk and back.

`KvShape.of(model.gguf)` reads a model's attention shape (layers, KV heads, head dimensions, sliding-window
layers) and says how many bytes of KV cache one token of context costs for a cache type (`f16`, `q8_0`,
...). The embedded server's KV is one shared pool sized from that and from what the slots actually use.

When personas outnumber slots, a slot taken by another persona first has its KV saved
(`/slots/N?action=save`) to a file keyed by (model digest, persona, adapter-set digest, prefix digest);
when the persona comes back its file is restored into whatever slot it gets. A file that is missing,
truncated, changed, from another model or adapter set, or whose prefix digest no longer matches is never
restored: the turn recomputes, and its report says so. Files are kept least recently used first within a
disk budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from turnflow.paths import replace_text

CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32,
    "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}
"""Bytes per cached value for each llama.cpp KV cache type (block formats include their scales)."""

SWA_PATTERNS: dict[str, int] = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gpt-oss": 2, "gemma3n": 5}
"""Every n-th layer attends globally, the rest in a sliding window (llama.cpp's defaults per architecture)."""


@dataclass(frozen=True)
class KvShape:
    """The attention shape of a model, as far as its KV cache is concerned."""

    architecture: str
    n_layer: int
    n_head_kv: tuple[int, ...]
    key_length: int
    value_length: int
    sliding_window: int = 0
    swa_layers: tuple[int, ...] = ()
    """The layers that attend only to the last `sliding_window` tokens."""

    @classmethod
    def of(cls, path: str | Path) -> KvShape:
        """Read the shape from a GGUF file's header."""
        from turnflow.gguf_header import read_gguf

        metadata = read_gguf(path)[0]

        def value(key: str) -> Any:
            return metadata.get(key)

        arch = value("general.architecture") or "llama"
        n_layer = int(value(f"{arch}.block_count") or 0)
        heads = value(f"{arch}.attention.head_count")
        kv_heads = value(f"{arch}.attention.head_count_kv")
        heads_n = int(heads[0] if isinstance(heads, list) else heads or 1)
        per_layer = kv_heads if isinstance(kv_heads, list) else [kv_heads or heads_n] * n_layer
        embd = int(value(f"{arch}.embedding_length") or 0)
        key_length = int(value(f"{arch}.attention.key_length") or embd // max(1, heads_n))
        value_length = int(value(f"{arch}.attention.value_length") or key_length)
        window = int(value(f"{arch}.attention.sliding_window") or 0)
        pattern = value(f"{arch}.attention.sliding_window_pattern")
        swa: tuple[int, ...] = ()
        if window:
            if isinstance(pattern, list):
                swa = tuple(i for i, flag in enumerate(pattern) if flag)
            else:
                every = int(pattern or SWA_PATTERNS.get(arch, 0))
                swa = tuple(i for i in range(n_layer) if every and (i + 1) % every != 0)
        return cls(arch, n_layer, tuple(int(h) for h in per_layer), key_length, value_length, window, swa)

    @classmethod
    def recorded(cls, path: str | Path) -> KvShape:
        """`of(path)`, worked out once per model file and recorded for later processes (a 262k-token vocabulary
        makes its header walk ~70 ms, and reading any header imports `gguf`, ~20-40 ms more)."""
        from turnflow.model_facts import remembered

        fields: dict[str, Any] = remembered(path, "kv_shape", lambda p: asdict(cls.of(p)))
        return cls(fields["architecture"], int(fields["n_layer"]), tuple(fields["n_head_kv"]),
                   int(fields["key_length"]), int(fields["value_length"]), int(fields["sliding_window"]),
                   tuple(fields["swa_layers"]))

    def _layer_bytes(self, layer: int, cache_type: str) -> float:
        return self.n_head_kv[layer] * (self.key_length + self.value_length) * cache_type_bytes(cache_type)

    def bytes_per_token(self, cache_type: str = "f16", *, swa_full: bool = False) -> float:
        """KV bytes one more token of context costs: the layers that attend to the whole context (every layer
        with `swa_full`, llama-server's `--swa-full`, which keeps the sliding-window layers' whole context too)."""
        return float(sum(self._layer_bytes(i, cache_type) for i in range(self.n_layer)
                         if swa_full or i not in self.swa_layers))

    def swa_bytes_per_slot(self, cache_type: str = "f16", *, swa_full: bool = False) -> float:
        """The fixed KV a slot's sliding-window layers hold (window tokens each), whatever the context (none
        with `swa_full`: they are in the per-token figure)."""
        if swa_full:
            return 0.0
        return float(sum(self._layer_bytes(i, cache_type) for i in self.swa_layers) * self.sliding_window)

    def pool_bytes(self, tokens: int, cache_type: str = "f16", slots: int = 1, *, swa_full: bool = False) -> float:
        """KV bytes of a pool of `tokens` tokens shared by `slots` slots."""
        return (tokens * self.bytes_per_token(cache_type, swa_full=swa_full)
                + slots * self.swa_bytes_per_slot(cache_type, swa_full=swa_full))


def cache_type_bytes(cache_type: str) -> float:
    """Bytes per value of a KV cache type, or a ValueError naming the known types."""
    try:
        return CACHE_TYPE_BYTES[cache_type]
    except KeyError:
        raise ValueError(f"KV cache type {cache_type!r}: use one of {', '.join(CACHE_TYPE_BYTES)}") from None


QWEN3_4B = KvShape("qwen3", 36, (8,) * 36, 128, 128)
"""Qwen3-4B's published attention shape (36 layers, 8 KV heads of 128 dims): 144 KiB of f16 KV per token."""


def reference_arithmetic(personas: int = 6, tokens: int = 8192, *, weights_gb: float = 2.5,
                         slot_context: int = 32768) -> dict[str, Any]:
    """The memory a Qwen3-4B-class model needs for `personas` x `tokens` of KV, sized to use vs per full slot."""
    rows = {}
    for cache_type in ("f16", "q8_0"):
        per_token = QWEN3_4B.bytes_per_token(cache_type)
        used = personas * tokens * per_token
        full = personas * slot_context * per_token
        rows[cache_type] = {
            "bytes_per_token": round(per_token),
            "kv_gb_sized": round(used / 1e9, 2),
            "resident_gb_sized": round(weights_gb + used / 1e9, 2),
            "kv_gb_full_slots": round(full / 1e9, 2),
            "resident_gb_full_slots": round(weights_gb + full / 1e9, 2),
        }
    return {"model": "Qwen3-4B-class (36 layers, 8 KV heads x 128)", "personas": personas, "tokens": tokens,
            "weights_gb": weights_gb, "slot_context": slot_context, "by_cache_type": rows}


# --------------------------------------------------------------------------------------------- paging files


@dataclass(frozen=True)
class KvKey:
    """What a saved KV file holds: whose prefix, computed by which model under which adapters."""

    model: str
    persona: str
    adapters: str
    prefix: str

    @property
    def filename(self) -> str:
        """The file name in the server's slot-save folder (llama-server takes a bare name)."""
        return f"kv-{self.model[:12]}-{self.persona}-{self.adapters[:12]}-{self.prefix[:12]}.bin"


@dataclass
class KvFile:
    """A saved KV file and what was checked about it when it was written."""

    key: KvKey
    tokens: int
    bytes: int
    blake2b: str
    saved_at: float


def _blake2b(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class KvFiles:
    """Personas' saved KV in one folder (the server's `--slot-save-path`), LRU within a disk budget."""

    def __init__(self, folder: Path, budget_mb: float = 4096.0):
        self.folder = folder
        self.budget_bytes = budget_mb * 1e6
        folder.mkdir(parents=True, exist_ok=True)

    def _meta(self, key: KvKey) -> Path:
        return self.folder / (key.filename + ".json")

    def recorded(self, key: KvKey, tokens: int) -> KvFile:
        """Note the file the server just wrote for `key` (its size and hash), then keep within the budget."""
        path = self.folder / key.filename
        entry = KvFile(key, tokens, path.stat().st_size, _blake2b(path), time.time())
        meta = asdict(entry)
        replace_text(self._meta(key), json.dumps(meta))
        self._stale_versions(key)
        self.evict()
        return entry

    def _stale_versions(self, key: KvKey) -> None:
        """A persona's older files under the same model and adapters hold a prefix it no longer has."""
        prefix = f"kv-{key.model[:12]}-{key.persona}-{key.adapters[:12]}-"
        for other in self.folder.glob(prefix + "*.bin"):
            if other.name != key.filename:
                other.unlink(missing_ok=True)
                (self.folder / (other.name + ".json")).unlink(missing_ok=True)

    def find(self, key: KvKey) -> tuple[KvFile | None, str]:
        """The saved file for exactly `key`, checked, or None and why it cannot be used."""
        path, meta_path = self.folder / key.filename, self._meta(key)
        if not path.is_file() or not meta_path.is_file():
            return None, "no saved KV for this persona, model, adapter set and prefix"
        try:
            meta = json.loads(meta_path.read_text())
            entry = KvFile(KvKey(**meta["key"]), int(meta["tokens"]), int(meta["bytes"]), str(meta["blake2b"]),
                           float(meta["saved_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None, "its record is unreadable"
        if entry.key != key:
            return None, "it was saved for another model, adapter set or prefix"
        size = path.stat().st_size
        if size != entry.bytes:
            return None, f"it is {size} bytes, {entry.bytes} were saved (truncated or replaced)"
        if _blake2b(path) != entry.blake2b:
            return None, "its bytes changed since they were saved"
        os.utime(meta_path)  # recently used
        return entry, ""

    def forget(self, key: KvKey) -> None:
        """Drop a saved file (it failed to restore)."""
        (self.folder / key.filename).unlink(missing_ok=True)
        self._meta(key).unlink(missing_ok=True)

    def evict(self) -> None:
        """Remove the least recently used files until the folder fits its budget."""
        files = []
        for meta in self.folder.glob("kv-*.bin.json"):
            data = self.folder / meta.name[: -len(".json")]
            try:
                files.append((meta.stat().st_mtime, data.stat().st_size, data, meta))
            except OSError:
                continue
        total = sum(size for _, size, _, _ in files)
        for _, size, data, meta in sorted(files):
            if total <= self.budget_bytes:
                break
            data.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            total -= size


# --------------------------------------------------------------------------------------------- a turn's slot


@dataclass
class KvPrepared:
    """What was done to the persona's slot before the model call."""

    before: str
    """`slot` (it held the persona's KV), `disk` (restored from a saved file) or `none`."""
    restore_ms: float | None = None
    saved_bytes: int = 0
    """Bytes of another persona's KV saved to disk so this turn could take the slot (and page-outs)."""
    paged_out: list[str] | None = None
    note: str = ""
    """Why nothing was restored, when nothing was."""


def prepare_slot(
    url: str, claim: Any, key: KvKey, lora: list[dict[str, Any]] | None, files: KvFiles, *, model: str,
) -> KvPrepared:
    """Save the slot's previous persona's KV, then restore this persona's (primed with its LoRA set) if saved.

    `claim` is the turn's `SlotClaim`; `key` says whose KV the turn needs (model, persona, adapter set,
    prefix). A file is restored only when its key matches exactly and its size and hash are as saved.
    """
    from turnflow.server import ServerError, prime, slot_action

    saved = 0
    previous = claim.previous
    if previous is not None and previous.tokens > 0:
        prev_key = KvKey(model, previous.persona_id, previous.adapters, previous.prefix)
        try:
            answer = slot_action(url, claim.slot, "save", prev_key.filename)
            files.recorded(prev_key, int(answer.get("n_saved") or previous.tokens))
            saved = int(answer.get("n_written") or 0)
        except (ServerError, OSError):
            pass  # the other persona recomputes when it returns
    if claim.own:
        return KvPrepared("slot", saved_bytes=saved)
    entry, why = files.find(key)
    if entry is None:
        return KvPrepared("none", saved_bytes=saved, note=why)
    try:
        prime(url, claim.slot, lora)
        answer = slot_action(url, claim.slot, "restore", key.filename)
    except (ServerError, OSError) as exc:
        files.forget(key)
        return KvPrepared("none", saved_bytes=saved, note=f"restoring it failed: {exc}")
    restore_ms = float((answer.get("timings") or {}).get("restore_ms") or 0.0)
    return KvPrepared("disk", restore_ms=round(restore_ms, 3), saved_bytes=saved)


def kv_source(prepared: KvPrepared, prompt_tokens: int | None, cached: int | None) -> str:
    """Where the turn's prompt KV came from, judged by what the server says it reused."""
    share = (cached or 0) / prompt_tokens if prompt_tokens else 0.0
    if share < 0.5:
        return "recomputed"
    if prepared.before in ("slot", "disk"):
        return prepared.before
    return "host-cache"


def page_out_idle(
    url: str, store: Any, claim: Any, need: int, pool: int, files: KvFiles, *, model: str,
) -> tuple[list[str], int]:
    """Make room in a budgeted pool: save idle slots' KV to disk and erase them, least recently used first, until
    the slots' KV and this turn's `need` (an estimate, with its margin) fit.

    Returns the personas paged out and the bytes written.
    """
    from turnflow.server import ServerError, slot_action, with_estimate_margin

    held = sum(o.tokens for o in claim.others)
    paged, written = [], 0
    for owner in sorted(claim.others, key=lambda o: o.last_used):
        if with_estimate_margin(held + need) <= pool:  # llama-server would purge an idle slot it could not fit
            break
        if owner.busy or not owner.tokens or owner.persona_id is None:
            continue
        token = store.take_idle_slot(claim.backend, claim.total_slots, owner.slot)
        if token is None:
            continue
        key = KvKey(model, owner.persona_id, owner.adapters, owner.prefix)
        try:
            answer = slot_action(url, owner.slot, "save", key.filename)
            files.recorded(key, int(answer.get("n_saved") or owner.tokens))
            written += int(answer.get("n_written") or 0)
            slot_action(url, owner.slot, "erase")
        except (ServerError, OSError):
            pass
        store.clear_slot(claim.backend, claim.total_slots, owner.slot, token)
        held -= owner.tokens
        paged.append(owner.persona_id)
    return paged, written
