"""Stable-first prompt assembly: invariant, then semi-stable, then volatile, deterministic inside each tier.

The layout, for chat models:

- one system message: the invariant text sections, then the semi-stable text sections (each tier sorted
  by source name, so declaration and completion order never matter);
- the message-list sources (e.g. conversation history), invariant ones first, then semi-stable;
- one final user message: the volatile text sections (e.g. the time) followed by what the speaker said.

Only the final user message is new each turn, so the model server reuses the KV cache of everything
before it. The prefix hashes in the report prove it turn by turn.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from turnflow.nodes.text import CanonicalMessages, canonical_json, sha256_text, text_digest, with_preface

TIER_ORDER = ("invariant", "semi_stable", "volatile")


@dataclass(frozen=True)
class SourceOutput:
    """What one source contributed to this turn's prompt."""

    name: str
    tier: str
    value: str | list[dict[str, Any]]
    cache: str  # "hit" | "miss" | "off"
    user_defined: bool = False
    violations: tuple[dict[str, str], ...] = ()
    known_canonical: str | None = field(default=None, compare=False, repr=False)
    """The canonical text when the caller already made it (serialising a long history is not free)."""

    @property
    def canonical(self) -> str:
        """The output's canonical text: the bytes that decide prefix reuse (made once)."""
        text = self.known_canonical
        if text is None:
            text = canonical_text(self.value)
            object.__setattr__(self, "known_canonical", text)
        return text


def canonical_text(value: str | list[dict[str, Any]]) -> str:
    """Text as is; a message list as one canonical JSON line per message (so appending keeps a byte prefix)."""
    if isinstance(value, str):
        return value
    if isinstance(value, CanonicalMessages):
        return value.canonical
    return "".join(canonical_json(message) + "\n" for message in value)


@dataclass(frozen=True)
class Prompt:
    """The assembled chat messages, with the hashes that show the prefix stayed stable."""

    messages: list[dict[str, Any]]
    user_message: dict[str, Any]
    """The message new this turn (what the speaker said, behind the volatile sections; or the tool results the
    turn goes on from)."""
    invariant_sha256: str
    invariant_bytes: int
    semi_stable_sha256: str
    """SHA-256 over the semi-stable sections' own SHA-256s (each section only grows; their concatenation does not)."""
    semi_stable_bytes: int
    volatile_bytes: int
    order: list[str] = field(default_factory=list)
    preface: str = ""
    """The volatile text sections in front of what the speaker said in `user_message`: the history shows them to
    the persona that answered only (the baselines leave it empty: everyone sees the message as it was sent)."""


def _prompt(
    system: str, middle: list[dict[str, Any]], volatile_messages: list[dict[str, Any]],
    user_message: dict[str, Any], order: list[str],
) -> Prompt:
    """The chat messages (system, the semi-stable middle, the volatile tail ending in the user's message) and
    their hashes."""
    semi_stable = canonical_text(middle)
    return Prompt(
        messages=[{"role": "system", "content": system}, *middle, *volatile_messages[:-1], user_message],
        user_message=user_message,
        invariant_sha256=sha256_text(system),
        invariant_bytes=len(system.encode()),
        semi_stable_sha256=sha256_text(semi_stable),
        semi_stable_bytes=len(semi_stable.encode()),
        volatile_bytes=len(canonical_text([user_message]).encode()),
        order=order,
    )


def assemble(outputs: dict[str, SourceOutput], salt: str = "") -> Prompt:
    """Assemble the sources' outputs stable-first into chat messages, the `salt` first of all.

    The salt (the digest of the persona's adapter set) makes two adapter sets share at most its bytes of
    prefix, so no model server cache can hand one set the KV computed under another.
    """
    by_tier: dict[str, list[SourceOutput]] = {tier: [] for tier in TIER_ORDER}
    for output in outputs.values():
        by_tier[output.tier].append(output)
    for tier in TIER_ORDER:
        by_tier[tier].sort(key=lambda o: o.name)

    system_sections: list[str] = [salt] if salt else []
    middle: list[dict[str, Any]] = []
    tier_text: dict[str, list[str]] = {tier: [] for tier in TIER_ORDER}
    tier_text["invariant"] = [salt] if salt else []
    for tier in ("invariant", "semi_stable"):
        for output in by_tier[tier]:
            tier_text[tier].append(output.canonical)
            if isinstance(output.value, str):
                if output.value:
                    system_sections.append(output.value)
            else:
                middle.extend(output.value)
    system, (invariant_sha256, invariant_bytes) = _system_and_digest(system_sections, tier_text["invariant"])

    volatile_text = [o.value for o in by_tier["volatile"] if isinstance(o.value, str) and o.value]
    volatile_messages = [m for o in by_tier["volatile"] if not isinstance(o.value, str) for m in o.value]
    messages: list[dict[str, Any]] = []
    if system_sections:
        messages.append({"role": "system", "content": system})
    messages.extend(middle)
    if not volatile_messages and middle and middle[-1].get("role") == "tool":
        # The turn goes on after tool results: nothing new was said, and the volatile sections went out with the
        # turn's user message already; the prompt ends with the results.
        user_message = middle[-1]
        tier_text["volatile"] = [""]
        preface = ""
    else:
        preface = "\n".join(volatile_text)
        user_message = _final_user_message(preface, volatile_messages)
        tier_text["volatile"] = [canonical_text([user_message])]
        messages.extend(volatile_messages[:-1] if volatile_messages else [])
        messages.append(user_message)

    # the semi-stable sections each only grow, their concatenation does not: hash each, then their digests
    sections = [text_digest(text) for text in tier_text["semi_stable"]]
    order = [o.name for tier in TIER_ORDER for o in by_tier[tier]]
    return Prompt(
        messages=messages,
        user_message=user_message,
        invariant_sha256=invariant_sha256,
        invariant_bytes=invariant_bytes,
        # a short text new every turn: hashed as it is, not looked up among the texts that extend earlier ones
        semi_stable_sha256=hashlib.sha256("\x1e".join(digest for digest, _ in sections).encode()).hexdigest(),
        semi_stable_bytes=sum(size for _, size in sections) + max(0, len(sections) - 1),
        volatile_bytes=len(tier_text["volatile"][0].encode()),
        order=order,
        preface=preface,
    )


def _system_and_digest(system_sections: list[str], invariant: list[str]) -> tuple[str, tuple[str, int]]:
    """The system message's text, and the SHA-256 and size of the invariant sections; worked out again only when a
    section is not the very text object of an earlier turn (a cached section is), so a long prompt's stable part is
    neither joined nor compared again."""
    memo_key = tuple(map(id, system_sections)) + (-1,) + tuple(map(id, invariant))
    with _SYSTEMS_LOCK:
        known = _SYSTEMS.get(memo_key)
    # the entry holds the texts themselves, so their ids are not reused while it is kept
    if known is not None and all(a is b for a, b in zip(known[0], (*system_sections, *invariant), strict=True)):
        return known[1], known[2]
    system = "\n\n".join(system_sections)
    digest = text_digest("\x1e".join(invariant))
    with _SYSTEMS_LOCK:
        if len(_SYSTEMS) >= 64:
            _SYSTEMS.clear()
        _SYSTEMS[memo_key] = ((*system_sections, *invariant), system, digest)
    return system, digest


_SYSTEMS: dict[tuple[int, ...], tuple[tuple[str, ...], str, tuple[str, int]]] = {}
_SYSTEMS_LOCK = threading.Lock()


def assemble_naive(
    outputs: dict[str, SourceOutput], now_iso: str, shuffle_seed: int, salt: str = "", *, timestamp: bool = True
) -> Prompt:
    """The baseline most voice pipelines use: sections in completion order, a timestamp on top of the system prompt.

    Completion order is simulated by a seeded shuffle per turn (sources that run concurrently finish in
    varying order). Used only to measure what stable-first saves; without `timestamp` it is the ablation
    that keeps everything of turnflow but its ordering.
    """
    import random

    shuffled = list(outputs.values())
    random.Random(shuffle_seed).shuffle(shuffled)
    system_sections = [salt] if salt else []
    if timestamp:
        system_sections.append(f"Timestamp: {now_iso}")
    middle, volatile_text, volatile_messages = _baseline_layout(
        shuffled, system_sections, lambda o: o.tier == "volatile"
    )
    user_message = _final_user_message("\n".join(volatile_text), volatile_messages)
    system = "\n\n".join(s for s in system_sections if s)
    return _prompt(system, middle, volatile_messages, user_message, [o.name for o in shuffled])


def assemble_append_only(outputs: dict[str, SourceOutput], salt: str = "") -> Prompt:
    """The append-only chat of LiveKit Agents or Pipecat: static instructions, the history appended, and the
    turn's dynamic context (participants, retrieved notes, tool results, the time) put in the newest user message.

    The system message holds only the invariant text sections; every other text section goes in front of what
    the speaker said. Used only to measure turnflow against what peers do.
    """
    ordered = sorted(outputs.values(), key=lambda o: (TIER_ORDER.index(o.tier), o.name))
    system_sections: list[str] = [salt] if salt else []
    middle, context, volatile_messages = _baseline_layout(
        [o for o in ordered if not (isinstance(o.value, str) and not o.value)], system_sections,
        lambda o: o.tier != "invariant",
    )
    user_message = _final_user_message("\n".join(context), volatile_messages)
    system = "\n\n".join(system_sections)
    return _prompt(system, middle, volatile_messages, user_message, [o.name for o in ordered])


def _baseline_layout(
    outputs: list[SourceOutput], system_sections: list[str], in_user_message: Callable[[SourceOutput], bool]
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """A baseline's sections in the given order: text sections to `system_sections`, or (when `in_user_message`)
    in front of what the speaker said; message lists to the middle, or (volatile ones) to the end."""
    middle: list[dict[str, Any]] = []
    context: list[str] = []
    volatile_messages: list[dict[str, Any]] = []
    for output in outputs:
        if isinstance(output.value, str):
            (context if in_user_message(output) else system_sections).append(output.value)
        elif output.tier == "volatile":
            volatile_messages.extend(output.value)
        else:
            middle.extend(output.value)
    return middle, context, volatile_messages


def _final_user_message(preface: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The last user message, with the volatile text sections (`preface`) in front of what the speaker said."""
    last = messages[-1] if messages else {"role": "user", "content": ""}
    return {**last, "content": with_preface(last.get("content", ""), preface)} if preface else last
