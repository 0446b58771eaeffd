"""What turnflow reads from a large model file once, kept on disk: its SHA-256, its header's facts, its special
tokens and chat template, its prompt bytes per token.

A real model costs real time to read: Gemma 3 270M (250 MB, a 262,144-token vocabulary) takes ~0.2 s to hash,
~0.2 s to walk its header and ~0.3 s to read its special tokens on this machine's 2 cores, and `turnflow run` is
a new process every turn. Without a record, every CLI turn on such a model would pay that (and a `/tokenize` of
its whole prompt for the first size estimate). The record is one JSON file per model file in the models cache,
valid while the file keeps its path, size and modification time; it is written by renaming a finished file, so
concurrent processes see the old record or the new one. Files under `LARGE` bytes are read again instead.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from turnflow.paths import models_dir, replace_text

LARGE = 16 << 20
"""Files at least this big (16 MB) get a record; a smaller one is hashed or read in a few ms."""

_T = TypeVar("_T")
_LOCK = threading.Lock()
_MEMORY: dict[str, dict[str, Any]] = {}


def _record_path(model: Path) -> Path:
    folder = models_dir() / "facts"
    folder.mkdir(exist_ok=True)
    return folder / f"{model.name}.{hashlib.sha256(str(model).encode()).hexdigest()[:12]}.json"


def _entry(model: Path) -> dict[str, Any]:
    """The model's facts known so far (memory, else its record; empty for a file that changed)."""
    stat = model.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    key = str(model)
    with _LOCK:
        entry = _MEMORY.get(key)
    if entry is not None and entry["stamp"] == stamp:
        return entry
    entry = {"stamp": stamp}
    try:
        stored = json.loads(_record_path(model).read_text())
        if isinstance(stored, dict) and stored.get("stamp") == stamp:
            entry = stored
    except (OSError, ValueError):
        pass
    with _LOCK:
        _MEMORY[key] = entry
    return entry


def remembered(model: str | Path, name: str, compute: Callable[[Path], _T]) -> _T:
    """The fact `name` of a model file (JSON-serialisable): recorded, else `compute(path)`, then recorded. An
    exception from `compute` records nothing."""
    path = Path(model).resolve()
    entry = _entry(path)
    if name in entry:
        return entry[name]  # type: ignore[no-any-return]
    value = compute(path)
    note(path, name, value)
    return value


def recorded(model: str | Path, name: str) -> Any:
    """The fact `name` of a model file, or None when it was never noted (or the file changed since)."""
    return _entry(Path(model).resolve()).get(name)


def note(model: str | Path, name: str, value: Any) -> None:
    """Record a fact of a model file for later processes."""
    path = Path(model).resolve()
    entry = _entry(path)
    with _LOCK:
        entry[name] = value
        text = json.dumps(entry, ensure_ascii=False)
    try:
        replace_text(_record_path(path), text)
    except OSError:
        pass  # a read-only cache: the fact is worked out again next time
