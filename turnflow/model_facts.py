"""What turnflow reads from a model file once, kept on disk: its special tokens, its chat template, its bytes per
token.

Reading Gemma 3's 262,144-token vocabulary for its special tokens takes ~0.2-0.3 s of CPU, and `turnflow run` is
a new process every turn: without a record, every CLI turn on such a model would pay it (and a `/tokenize` of
its whole prompt for the first size estimate) as turnflow's own time. The record is a JSON file per model file
in the models cache, valid while the file keeps its size and modification time; it is written by renaming a
finished file, so concurrent processes see the old record or the new one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from turnflow.gguf_header import read_gguf
from turnflow.paths import models_dir, replace_text

_LOCK = threading.Lock()
_MEMORY: dict[str, dict[str, Any]] = {}


def _record_path(model: Path) -> Path:
    folder = models_dir() / "facts"
    folder.mkdir(exist_ok=True)
    return folder / f"{model.name}.{hashlib.sha256(str(model).encode()).hexdigest()[:12]}.json"


def _stamp(model: Path) -> list[int]:
    stat = model.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _read_header_facts(model: Path) -> dict[str, Any]:
    import gguf

    metadata = read_gguf(model, string_arrays=["tokenizer.ggml.tokens"])[0]
    tokens, types = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
    special: list[str] = []
    if tokens is not None and types is not None:
        kinds = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNKNOWN),
                 int(gguf.TokenType.UNUSED)}
        # runs of whitespace (Gemma declares `\n\n\n`, tabs and spaces user-defined) steer nothing, and defusing
        # them would change people's indentation
        special = [text for text, kind in zip(tokens, [int(t) for t in types], strict=False)
                   if kind in kinds and text.strip()]
    return {"special_tokens": special, "chat_template": str(metadata.get("tokenizer.chat_template") or "")}


def model_facts(model: str | Path) -> dict[str, Any]:
    """The facts of a GGUF model file: `special_tokens` (control, user-defined, unknown and unused ones) and
    `chat_template` (its packaged `tokenizer.chat_template`, or ''), plus `bytes_per_token` once noted.

    From memory, else from the file's record, else read from the model's header (and recorded).
    """
    path = Path(model).resolve()
    key = str(path)
    stamp = _stamp(path)
    with _LOCK:
        known = _MEMORY.get(key)
        if known is not None and known["stamp"] == stamp:
            return known
    record = _record_path(path)
    facts: dict[str, Any] | None = None
    try:
        stored = json.loads(record.read_text())
        if isinstance(stored, dict) and stored.get("stamp") == stamp:
            facts = stored
    except (OSError, ValueError):
        pass
    if facts is None:
        facts = {"stamp": stamp, **_read_header_facts(path)}
        _write(record, facts)
    with _LOCK:
        _MEMORY[key] = facts
    return facts


def note_bytes_per_token(model: str | Path, value: float) -> None:
    """Record a model's prompt bytes per token (from the server's count), for the next process's first estimate."""
    facts = model_facts(model)
    with _LOCK:
        facts["bytes_per_token"] = value
    _write(_record_path(Path(model).resolve()), facts)


def _write(record: Path, facts: dict[str, Any]) -> None:
    try:
        replace_text(record, json.dumps(facts, ensure_ascii=False))
    except OSError:
        pass  # a read-only cache: the facts are read from the model again next time
