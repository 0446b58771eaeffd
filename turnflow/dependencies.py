"""What a prompt source may depend on, declared once.

A source function takes DAG values by parameter name (`SOURCE_INPUTS`) and its recipe declares the cache keys
it is memoised under (`CACHE_KEYS`). Each input says which cache keys must be declared for a cached result to
follow it (or that it changes every turn), and each cache key says which invalidation scopes an event reaches
it through. The recipe schema, its lints and the composition cache all read these two tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheKey:
    """A cache key a source may declare."""

    means: str
    scopes: tuple[str, ...] = ()
    """Invalidation scopes (`persona`, `room`, `participants`, `messages`) whose events make it stale."""


@dataclass(frozen=True)
class SourceInput:
    """A DAG value a source function may take as a parameter."""

    means: str
    covered_by: tuple[str, ...] = ()
    """The cache keys a cached source taking this input must declare."""
    per_turn: bool = False
    """New every turn: only a volatile source may take it."""


CACHE_KEYS: dict[str, CacheKey] = {
    "persona_id": CacheKey("the persona taking the turn", ("persona",)),
    "persona_version": CacheKey("the persona file's declared version and content", ("persona",)),
    "recipe_id": CacheKey("the recipe and its content"),
    "room_id": CacheKey("the room", ("room",)),
    "participants_version": CacheKey("who is in the room", ("room", "participants")),
    "history_tail_msg_ids": CacheKey("the newest messages of the room's history", ("room", "messages")),
    "adapter_set_digest": CacheKey("the persona's adapter files and scales", ("persona",)),
    "instructions_digest": CacheKey("the LiveKit agent's instructions"),
}

SOURCE_INPUTS: dict[str, SourceInput] = {
    "persona_id": SourceInput("id of the persona taking the turn", ("persona_id",)),
    "persona": SourceInput("the Persona model", ("persona_id", "persona_version")),
    "persona_version": SourceInput("the persona's version key", ("persona_version",)),
    "recipe": SourceInput("the Recipe model", ("recipe_id",)),
    "recipe_id": SourceInput("the recipe's id", ("recipe_id",)),
    "room_id": SourceInput("id of the room", ("room_id",)),
    "room_participants": SourceInput(
        "list of Participant (people and personas in the room)", ("room_id", "participants_version")
    ),
    "participants_version": SourceInput("changes whenever someone joins or leaves", ("participants_version",)),
    "room_messages": SourceInput("the room's history, list of StoredMessage", ("room_id", "history_tail_msg_ids")),
    "history_tail_msg_ids": SourceInput("ids of the newest messages of the room", ("history_tail_msg_ids",)),
    "history_start": SourceInput(  # compaction bumps participants_version
        "id of the first visible message of the room (changes when the history is compacted)",
        ("room_id", "participants_version"),
    ),
    "turn": SourceInput("the turn's number in the room (1, 2, ...)", per_turn=True),
    "now": SourceInput("the turn's timestamp (timezone-aware datetime)", per_turn=True),
    "speaker": SourceInput("who is speaking this turn", per_turn=True),
    "user_content": SourceInput("what the speaker said this turn (UserContent)", per_turn=True),
    # fixed per driver; the cache namespace includes the capability profile
    "hears": SourceInput("whether the backend's model hears audio (decided when the driver is built)"),
    "history_stt": SourceInput(
        "for a model that does not hear: the words of a past message's audio another persona's model heard itself "
        "(called with the StoredMessage; None when the model hears)", ("history_tail_msg_ids",),
    ),
    "adapter_set": SourceInput(
        "the persona's adapters as applied (AdapterSet: voice, skills, scales)", ("adapter_set_digest",)
    ),
    "adapter_set_digest": SourceInput("digest of the persona's adapter files and scales", ("adapter_set_digest",)),
    "instructions": SourceInput(
        "the LiveKit agent's instructions (None outside LiveKit Agents)", ("instructions_digest",)
    ),
    "instructions_digest": SourceInput("digest of the LiveKit agent's instructions", ("instructions_digest",)),
    # a chat context's digest stands in for the tail ids
    "agent_history": SourceInput(
        "the LiveKit agent's chat context as OpenAI messages (None outside LiveKit Agents)",
        ("history_tail_msg_ids",),
    ),
}


def scopes_of(key: str) -> tuple[str, ...]:
    """The invalidation scopes of a declared cache key (none for a key turnflow does not know)."""
    found = CACHE_KEYS.get(key)
    return found.scopes if found else ()
