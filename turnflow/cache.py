"""The composition cache: each source's output memoised under the keys its recipe declares.

Entries live in `diskcache` with the recipe's TTL. Invalidation is by events: an event bumps the epoch
of a scope (a persona, a recipe, a room's messages or participants), and every key that depends on that
scope includes its epoch, so old entries are simply never read again and expire on their own.

The cache also keeps the ledger that detects tier violations: a fingerprint of what each source rendered
under each key, kept longer than the entries themselves.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diskcache

from turnflow.dependencies import scopes_of
from turnflow.nodes.text import canonical_json

_SCOPE_VALUE_FIELD = {"persona": "persona_id", "room": "room_id", "participants": "room_id", "messages": "room_id"}
_LEDGER_TTL_S = 30 * 24 * 3600.0


class JsonOnlyDisk(diskcache.JSONDisk):
    """diskcache's JSON disk that also refuses to read a pickle: `JSONDisk` itself would still unpickle a row
    stored with diskcache's pickle mode, so a foreign row in a shared cache could run code here."""

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise ValueError("refusing a pickled cache key")
        return super().get(key, raw)

    def fetch(self, mode: int, filename: str, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise ValueError("refusing a pickled cache value")
        return super().fetch(mode, filename, value, read)


@dataclass(frozen=True)
class Event:
    """Something that happened which makes cached sections stale."""

    kind: Literal["persona_changed", "recipe_changed", "message_added", "participants_changed", "room_reset"]
    id: str

    @property
    def scope(self) -> str:
        """The epoch this event bumps."""
        return {
            "persona_changed": "persona",
            "recipe_changed": "recipe",
            "message_added": "messages",
            "participants_changed": "participants",
            "room_reset": "room",
        }[self.kind] + f":{self.id}"

    @classmethod
    def persona_changed(cls, persona_id: str) -> Event:
        """A persona's file changed."""
        return cls("persona_changed", persona_id)

    @classmethod
    def recipe_changed(cls, recipe_id: str) -> Event:
        """A recipe's file changed."""
        return cls("recipe_changed", recipe_id)

    @classmethod
    def message_added(cls, room_id: str) -> Event:
        """A message was added to a room."""
        return cls("message_added", room_id)

    @classmethod
    def participants_changed(cls, room_id: str) -> Event:
        """Someone joined or left a room."""
        return cls("participants_changed", room_id)

    @classmethod
    def room_reset(cls, room_id: str) -> Event:
        """Everything about a room is stale."""
        return cls("room_reset", room_id)


@dataclass(frozen=True)
class Violation:
    """A source that broke its tier's promise."""

    source: str
    tier: str
    kind: Literal["changed_without_key_change", "not_append_only"]
    message: str

    def as_dict(self) -> dict[str, str]:
        """The violation as it appears in the turn report."""
        return {"source": self.source, "tier": self.tier, "kind": self.kind, "message": self.message}


def fingerprint(text: str) -> str:
    """SHA-256 of text."""
    return hashlib.sha256(text.encode()).hexdigest()


class CompositionCache:
    """Source outputs under recipe-declared keys, with TTL, event invalidation and the tier ledger."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        # JSON on disk, never pickles: a shared $TURNFLOW_HOME cannot make this process run code
        self._store = diskcache.Cache(str(self.directory), size_limit=2**30, disk=JsonOnlyDisk)
        self._epochs: dict[str, int] | None = None

    def close(self) -> None:
        """Close the cache files."""
        self._store.close()

    # -- events

    def publish(self, event: Event) -> None:
        """Invalidate every entry whose key depends on the event's scope."""
        with self._store.transact():
            epochs = dict(self._read("epochs", {}))
            epochs[event.scope] = epochs.get(event.scope, 0) + 1
            self._store.set("epochs", epochs)
        self._epochs = epochs

    def begin_turn(self) -> None:
        """Read the epochs once for the turn, so events published by other processes are seen."""
        self._epochs = dict(self._read("epochs", {}))

    def _epoch(self, scope: str) -> int:
        if self._epochs is None:
            self.begin_turn()
        assert self._epochs is not None
        return self._epochs.get(scope, 0)

    # -- entries

    def key(
        self, recipe_id: str, recipe_digest: str, source: str, key_values: dict[str, Any],
        scope_values: dict[str, Any] | None = None,
    ) -> str:
        """The entry key for a source under its declared key values and the epochs of their scopes.

        `scope_values` are the turn's `persona_id` and `room_id`: a key field that follows a room (its
        history, its participants) is scoped to the turn's room even when `room_id` is not a declared key,
        so an event about that room reaches exactly the entries it makes stale.
        """
        values = {**(scope_values or {}), **key_values}
        scopes = {f"recipe:{recipe_id}"}
        for field in key_values:
            for scope in scopes_of(field):
                scopes.add(f"{scope}:{values.get(_SCOPE_VALUE_FIELD[scope], '*')}")
        epochs = {scope: self._epoch(scope) for scope in sorted(scopes)}
        blob = canonical_json(
            {"recipe": [recipe_id, recipe_digest], "source": source, "key": key_values, "epochs": epochs}
        )
        return "entry:" + fingerprint(blob)

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, value) on a hit, (False, None) on a miss or an expired entry."""
        value = self._read(key, _MISSING)
        return (False, None) if value is _MISSING else (True, value)

    def _read(self, key: str, default: Any = None) -> Any:
        """A stored value; a pickled or undecodable row is never read: it counts as absent (and is rewritten)."""
        try:
            return self._store.get(key, default=default)
        except (ValueError, zlib.error):
            return default

    def marker(self, name: str) -> Any:
        """A small value the session keeps beside the entries (e.g. the digest of a file it last saw)."""
        return self._read(f"marker:{name}")

    def set_marker(self, name: str, value: Any) -> None:
        """Keep a small value beside the entries."""
        self._store.set(f"marker:{name}", value)

    def set(self, key: str, value: Any, ttl_s: float) -> None:
        """Store a source's output for `ttl_s` seconds."""
        self._store.set(key, value, expire=ttl_s)

    # -- tier ledger

    def check_invariant(
        self, source: str, ledger_key: str, text: str, *, digest: str | None = None
    ) -> Violation | None:
        """Record what an invariant source rendered; a violation if it rendered differently under the same key.

        `digest` is `fingerprint(text)` when the caller has it already.
        """
        key = f"ledger:inv:{source}:{ledger_key}"
        now = digest or fingerprint(text)
        before = self._read(key)
        self._store.set(key, now, expire=_LEDGER_TTL_S)
        if before is not None and before != now:
            return Violation(
                source,
                "invariant",
                "changed_without_key_change",
                f"invariant source {source!r} rendered different bytes while its cache key did not change; "
                f"declare it volatile, or add the value it follows to its cache_key",
            )
        return None

    def check_semi_stable(
        self, source: str, ledger_key: str, text: str, *, digest: str | None = None
    ) -> Violation | None:
        """Record a semi-stable source's rendering; a violation unless it only appended to the last one.

        `digest` is `fingerprint(text)` when the caller has it already.
        """
        key = f"ledger:semi:{source}:{ledger_key}"
        before = self._read(key)
        digest = digest or fingerprint(text)
        self._store.set(key, (len(text), digest), expire=_LEDGER_TTL_S)
        if before is None:
            return None
        length, digest_before = before
        if len(text) == length and digest == digest_before:
            return None
        if len(text) > length and fingerprint(text[:length]) == digest_before:
            return None
        return Violation(
            source,
            "semi_stable",
            "not_append_only",
            f"semi-stable source {source!r} changed what it rendered before instead of only appending; "
            f"the model server must re-process everything after it",
        )


_MISSING = object()
