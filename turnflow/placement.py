"""Placement over a pool of backends: each persona has a home member, chosen by rendezvous hashing.

Rendezvous (highest-random-weight) hashing ranks every member for a persona by a hash of (member, persona id,
adapter-set digest); the highest is its home. Adding a member moves only the personas for which the new member
ranks highest (about 1/N of them); removing one moves only that member's personas, each to its next-ranked
member. Every process computes the same ranking from the names alone: nothing to coordinate or store.

A member that fails a health check or a turn is skipped for `recheck_s`; its personas' turns go to their
next-ranked member meanwhile (the history lives in the store, so it is intact there; the KV is computed there
once) and go home when the member answers again.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from turnflow.backend import Backend, open_backend
from turnflow.nodes.llm import BackendError
from turnflow.recipe import BackendSpec
from turnflow.server import EmbeddedServer, ServerError, _healthy

Placement = Literal["home", "fallback"]
Strategy = Literal["rendezvous", "random", "round_robin"]
"""How a pool picks a turn's member: `rendezvous` (the persona's home), or the benchmark's baselines, `random` and
`round_robin` (per turn, regardless of the persona)."""


def placement_key(persona_id: str, adapter_set_digest: str) -> str:
    """What a persona is placed by: its id and the digest of its adapter set (other adapters, other KV)."""
    return f"{persona_id}\0{adapter_set_digest}"


def member_weight(member: str, key: str) -> int:
    """The rendezvous weight of `member` for `key`: 64 bits of SHA-256, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{member}\0{key}".encode()).digest()[:8], "big")


def rank_members(members: Sequence[str], key: str) -> list[str]:
    """The members by descending weight for `key`: the first is the home, the rest the fallbacks in order."""
    return sorted(members, key=lambda m: (-member_weight(m, key), m))


def home_member(members: Sequence[str], key: str) -> str:
    """The member a key lives on while every member is up."""
    return rank_members(members, key)[0]


@dataclass(frozen=True)
class Route:
    """Where one attempt of a turn runs: the member, its connected backend, and whether it is the persona's home."""

    member: str
    backend: Backend
    placement: Placement


@dataclass
class _Down:
    since: float
    until: float
    reason: str


class BackendPool:
    """The members of a `kind: pool` backend, connected on first use, with the ones that failed set aside."""

    def __init__(
        self, name: str, spec: BackendSpec, specs: dict[str, BackendSpec],
        opener: Callable[..., Backend] = open_backend, clock: Callable[[], float] = time.monotonic,
        strategy: Strategy = "rendezvous", seed: int = 0,
    ):
        if strategy not in ("rendezvous", "random", "round_robin"):
            raise ValueError(f"placement {strategy!r}: use 'rendezvous', or 'random' / 'round_robin' (baselines)")
        self.strategy = strategy
        self._random = random.Random(seed)
        self._turns = 0
        self.name = name
        self.spec = spec
        self.members = list(spec.members)
        self._specs = {m: specs[m] for m in self.members}
        self._open = opener
        self._clock = clock
        self._backends: dict[str, Backend] = {}
        self._down: dict[str, _Down] = {}
        self._retired: list[Backend] = []
        self._lock = threading.RLock()
        self._opening: dict[str, threading.Lock] = {m: threading.Lock() for m in self.members}

    def ranking(self, persona_id: str, adapter_set_digest: str) -> list[str]:
        """The members in the order the persona tries them (home first)."""
        return rank_members(self.members, placement_key(persona_id, adapter_set_digest))

    def routes(self, persona_id: str, adapter_set_digest: str) -> list[tuple[str, Placement]]:
        """The members to try for one turn, in order, skipping those set aside (a member whose wait is over is
        tried again in its place)."""
        ranked = self.ranking(persona_id, adapter_set_digest)
        if self.strategy != "rendezvous":  # a baseline: this turn's member first, whoever the persona is
            with self._lock:
                chosen = (self._random.choice(self.members) if self.strategy == "random"
                          else self.members[self._turns % len(self.members)])
                self._turns += 1
            ranked = [chosen, *(m for m in ranked if m != chosen)]
        now = self._clock()
        with self._lock:
            up = [m for m in ranked if m not in self._down or self._down[m].until <= now]
        return [(m, "home" if m == ranked[0] else "fallback") for m in up]

    def connect(self, member: str) -> Backend:
        """The member's backend, connected (an embedded member is started on its first use only; after a failure
        it must be running again, e.g. by `turnflow server up --backend POOL`, to be used)."""
        with self._opening[member]:
            with self._lock:
                known = self._backends.get(member)
                was_down = member in self._down
            if known is not None and not was_down and self._alive(known):
                return known
            spec = self._specs[member]
            if known is not None or was_down:  # a member coming back: it must answer, and may be on a new port
                if known is not None:
                    self._forget(member)
                if spec.kind == "embedded":
                    status = EmbeddedServer(member, spec).status()
                    if not status.get("running") or not status.get("healthy"):
                        raise ServerError(f"pool {self.name!r}: member {member!r} is not running")
                backend = self._open(member, spec, start=False)
            else:
                backend = self._open(member, spec, start=True)
            with self._lock:
                self._backends[member] = backend
                self._down.pop(member, None)
            return backend

    def _alive(self, backend: Backend) -> bool:
        """The cheap health check before each turn: an embedded member's process is alive and answers."""
        if backend.server is None:
            return True  # a URL member is checked by its turns
        status = backend.server.status()
        return bool(status.get("running")) and status.get("url") == backend.url and _healthy(backend.url)

    def mark_down(self, member: str, reason: str) -> None:
        """Set a member aside for `recheck_s` (it failed a health check or a turn)."""
        now = self._clock()
        with self._lock:
            self._down[member] = _Down(now, now + self.spec.recheck_s, reason)
            self._forget(member)

    def _forget(self, member: str) -> None:
        with self._lock:
            backend = self._backends.pop(member, None)
            if backend is not None:
                self._retired.append(backend)  # other threads' turns may still hold it

    def down(self) -> dict[str, str]:
        """The members set aside now, and why."""
        now = self._clock()
        with self._lock:
            return {m: d.reason for m, d in self._down.items() if d.until > now}

    def any_backend(self) -> Backend:
        """A connected member (the first that answers), for what needs one before any persona is known."""
        last: Exception | None = None
        for member in self.members:
            try:
                return self.connect(member)
            except (BackendError, ServerError) as exc:
                last = exc
        raise ServerError(f"pool {self.name!r}: no member answers ({last})")

    def close(self) -> None:
        """Close every member's client (embedded servers keep running)."""
        with self._lock:
            for backend in (*self._retired, *self._backends.values()):
                backend.close()
            self._backends.clear()
            self._retired.clear()
