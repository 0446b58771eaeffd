"""The composition cache: each source's output memoised under the keys its recipe declares.

Entries live in `diskcache` with the recipe's TTL. Invalidation is by events: an event bumps the epoch
of a scope (a persona, a recipe, a room's messages or participants), and every key that depends on that
scope includes its epoch, so old entries are simply never read again and expire on their own.

The cache also keeps the ledger that detects tier violations: a fingerprint of what each source rendered
under each key, kept longer than the entries themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diskcache

from turnflow.dependencies import scopes_of
from turnflow.nodes.text import canonical_json
from turnflow.paths import replace_text, replaced_stamp

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


CacheKey = str | tuple[Any, ...]
"""An entry's key: a SHA-256 (`entry:...`), or for an entry kept in this process the tuple it is made of."""

_PLAIN = (str, int, float, bool, type(None))
_FLAT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _key_blob(
    recipe_id: str, recipe_digest: str, source: str, key_values: dict[str, Any], scopes: tuple[str, ...],
    epochs: tuple[int, ...],
) -> str:
    """What an entry's key is the hash of: the recipe, the source, its key values by field name and the epochs of
    their scopes. Plain values (text, numbers) are one flat JSON list, without the sorting of nested keys
    `canonical_json` does; anything else is canonical JSON (an object, so the two never make the same text)."""
    values = sorted(key_values.items())
    if all(type(value) in _PLAIN for _, value in values):
        return _FLAT.encode([recipe_id, recipe_digest, source, values, scopes, epochs])
    return canonical_json({"recipe": [recipe_id, recipe_digest], "source": source, "key": key_values,
                           "epochs": dict(zip(scopes, epochs, strict=True))})


class CompositionCache:
    """Source outputs under recipe-declared keys, with TTL, event invalidation and the tier ledger."""

    def __init__(self, directory: str | Path, *, memory_entries: int = 4096):
        self.directory = Path(directory)
        # JSON on disk, never pickles: a shared $TURNFLOW_HOME cannot make this process run code
        self._store = diskcache.Cache(str(self.directory), size_limit=2**30, disk=JsonOnlyDisk)
        self._epochs: dict[str, int] | None = None
        self._epochs_file = self.directory / "epochs.stamp"
        """Replaced (a new inode) whenever an event is published: a turn reads the epochs only when it changed."""
        self._epochs_seen: tuple[tuple[int, int, int] | None, dict[str, int]] | None = None
        self._memory: OrderedDict[CacheKey, tuple[float, Any]] = OrderedDict()
        """Entries and ledger records this process read or wrote, with their expiry (`time.time()`): a hit is
        served from here without decoding the disk's JSON. Keys carry the epochs, so events still reach them."""
        self._memory_entries = memory_entries
        self._key_scopes: dict[Any, tuple[str, ...]] = {}
        self._keys: dict[Any, str] = {}
        self._lock = threading.Lock()

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
            replace_text(self._epochs_file, str(sum(epochs.values())))
        self._epochs = epochs

    def begin_turn(self) -> None:
        """Take the epochs for the turn, so events published by other processes are seen (read again only when
        the stamp file says an event was published since they were last read)."""
        try:
            stamp: tuple[int, int, int] | None = replaced_stamp(self._epochs_file)
        except OSError:
            stamp = None
        if self._epochs_seen is not None and self._epochs_seen[0] == stamp:
            self._epochs = self._epochs_seen[1]
            return
        self._epochs = dict(self._read("epochs", {}))  # read after the stamp: a later event changes the stamp again
        self._epochs_seen = (stamp, self._epochs)

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
        scope_values = scope_values or {}
        # a scope follows the persona or the room: the scopes are worked out once per field names, persona and room
        who = (key_values.get("persona_id", scope_values.get("persona_id")),
               key_values.get("room_id", scope_values.get("room_id")))
        fields = tuple(key_values)
        scopes = self._scopes(recipe_id, fields, who)
        if self._epochs is None:
            self.begin_turn()
        current = self._epochs or {}
        epochs = tuple([current.get(scope, 0) for scope in scopes])
        try:  # key values are short strings: the key is worked out once per values and epochs
            memo: Any = (recipe_id, recipe_digest, source, fields, tuple(key_values.values()), scopes, epochs)
            key = self._keys.get(memo)
        except TypeError:
            memo, key = None, None
        if key is None:
            key = "entry:" + fingerprint(_key_blob(recipe_id, recipe_digest, source, key_values, scopes, epochs))
            if memo is not None:
                self._remember_key(self._keys, memo, key)
        return key

    def key_of(
        self, spec: tuple[str, str, str, tuple[str, ...]], values: tuple[Any, ...], persona_id: str, room_id: str,
        *, local: bool = False,
    ) -> CacheKey:
        """`key` for one source node: `spec` is its (recipe id, recipe digest, source, key fields), `values` the
        fields' values this turn (the same key, without building its arguments every turn).

        `local=True` is for entries kept in this process only (`shared=False`): their key may be the tuple of what
        the key is made of, neither encoded nor hashed (a key that changes with every message is new every turn)."""
        recipe_id, recipe_digest, source, fields = spec
        scopes = self._key_scopes.get((recipe_id, fields, (persona_id, room_id)))
        if scopes is None and local:
            scopes = self._scopes(recipe_id, fields, (persona_id, room_id))
        if scopes is not None:
            if self._epochs is None:
                self.begin_turn()
            current = self._epochs or {}
            epochs = tuple([current.get(scope, 0) for scope in scopes])
            memo = (recipe_id, recipe_digest, source, fields, values, scopes, epochs)
            try:
                if local:
                    hash(memo)  # the values are hashable: the tuple serves as the key
                    return memo
                key = self._keys.get(memo)
            except TypeError:
                key = None
            if key is not None:
                return key
        return self.key(recipe_id, recipe_digest, source, dict(zip(fields, values, strict=True)),
                        {"persona_id": persona_id, "room_id": room_id})

    def _scopes(self, recipe_id: str, fields: tuple[str, ...], who: tuple[Any, Any]) -> tuple[str, ...]:
        """The scopes (`recipe:…`, `persona:…`, `room:…`) whose events make a key of these fields stale, for a
        persona and room `who` (worked out once per field names, persona and room)."""
        scopes = self._key_scopes.get((recipe_id, fields, who))
        if scopes is None:
            values = {"persona_id": who[0], "room_id": who[1]}
            found = {f"recipe:{recipe_id}"}
            for field in fields:
                for scope in scopes_of(field):
                    value = values.get(_SCOPE_VALUE_FIELD[scope])
                    found.add(f"{scope}:{'*' if value is None else value}")
            scopes = tuple(sorted(found))
            self._remember_key(self._key_scopes, (recipe_id, fields, who), scopes)
        return scopes

    @staticmethod
    def _remember_key(table: dict[Any, Any], memo: Any, value: Any) -> None:
        if len(table) >= 8192:  # bounded: a new history tail every turn makes new keys
            table.clear()
        table[memo] = value

    def get(self, key: CacheKey, *, shared: bool = True) -> tuple[bool, Any]:
        """(True, value) on a hit, (False, None) on a miss or an expired entry; `shared=False`: an entry kept in
        this process only (see `set`)."""
        value = self._remembered(key)
        if value is _MISSING and shared and isinstance(key, str):
            value, expire_time = self._read_with_expiry(key)
            if value is not _MISSING:
                self._remember(key, value, expire_time)
        return (False, None) if value is _MISSING else (True, value)

    def _remembered(self, key: CacheKey) -> Any:
        with self._lock:
            found = self._memory.get(key)
            if found is None:
                return _MISSING
            if found[0] <= time.time():
                del self._memory[key]
                return _MISSING
            self._memory.move_to_end(key)
            return found[1]

    def _remember(self, key: CacheKey, value: Any, expire_time: float | None) -> None:
        with self._lock:
            self._memory[key] = (expire_time if expire_time is not None else math.inf, value)
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)

    def _read_with_expiry(self, key: str) -> tuple[Any, float | None]:
        try:
            value, expire_time = self._store.get(key, default=_MISSING, expire_time=True)
        except (ValueError, zlib.error):
            return _MISSING, None
        return value, expire_time

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

    def set(self, key: CacheKey, value: Any, ttl_s: float, *, shared: bool = True) -> None:
        """Store a source's output for `ttl_s` seconds; `shared=False` keeps it in this process only (for keys that
        change with every message: another process would rarely meet the key again, and writing a long history
        to disk every turn costs more than rendering it)."""
        self._remember(key, value, time.time() + ttl_s)
        if shared and isinstance(key, str):
            self._store.set(key, value, expire=ttl_s)

    # -- tier ledger

    def _ledger_read(self, key: str, *, shared: bool) -> Any:
        value = self._remembered(key)
        if value is _MISSING:
            value = self._read(key) if shared else None
        return value

    def _ledger_write(self, key: str, value: Any, *, shared: bool) -> None:
        self._remember(key, value, time.time() + _LEDGER_TTL_S)
        if shared:
            self._store.set(key, value, expire=_LEDGER_TTL_S)

    def check_invariant(
        self, source: str, ledger_key: str, text: str, *, digest: str | None = None, shared: bool = True
    ) -> Violation | None:
        """Record what an invariant source rendered; a violation if it rendered differently under the same key.

        `digest` is `fingerprint(text)` when the caller has it already; `shared=False` keeps the record in this
        process (see `set`).
        """
        key = f"ledger:inv:{source}:{ledger_key}"
        now = digest or fingerprint(text)
        before = self._ledger_read(key, shared=shared)
        if before != now:
            self._ledger_write(key, now, shared=shared)
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
        self, source: str, ledger_key: str, text: str, *, digest: str | None = None, shared: bool = True
    ) -> Violation | None:
        """Record a semi-stable source's rendering; a violation unless it only appended to the last one.

        `digest` is `fingerprint(text)` when the caller has it already. The text this process recorded last is
        kept in memory, so an append is recognised by comparing, not hashing, what came before. `shared=False`
        keeps the record in this process (a source whose key changes with every message is recorded every turn).
        """
        key = f"ledger:semi:{source}:{ledger_key}"
        if not shared:  # kept in this process: the text itself is the record, compared and never hashed
            previous = self._remembered(f"{key}:text")
            self._remember(f"{key}:text", (text, None), time.time() + _LEDGER_TTL_S)
            if previous is _MISSING or text.startswith(previous[0]):
                return None
            return _not_append_only(source)
        before = self._ledger_read(key, shared=shared)
        digest = digest or fingerprint(text)
        self._ledger_write(key, (len(text), digest), shared=shared)
        previous = self._remembered(f"{key}:text")
        self._remember(f"{key}:text", (text, digest), time.time() + _LEDGER_TTL_S)
        if before is None:
            return None
        length, digest_before = before
        if len(text) == length and digest == digest_before:
            return None
        if len(text) > length:
            if previous is not _MISSING and previous[1] == digest_before:  # the text recorded last is at hand
                appended = text.startswith(previous[0])
            else:
                appended = fingerprint(text[:length]) == digest_before
            if appended:
                return None
        return _not_append_only(source)


def _not_append_only(source: str) -> Violation:
    return Violation(
        source,
        "semi_stable",
        "not_append_only",
        f"semi-stable source {source!r} changed what it rendered before instead of only appending; "
        f"the model server must re-process everything after it",
    )


_MISSING = object()
