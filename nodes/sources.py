"""The built-in sources: each renders one section of the prompt from DAG values named by its parameters.

A source returns text or a list of chat messages. Its tier and cache keys come from the recipe, not
from here, so the same function can serve recipes with different caching needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from turnflow.adapters import AdapterSet
from turnflow.nodes.text import CanonicalMessages, canonical_json, neutralise_control_tokens
from turnflow.recipe import Persona, Recipe
from turnflow.store import Participant, StoredMessage, UserContent


def persona_identity(persona: Persona) -> str:
    """Who the persona is: name and system prompt."""
    return f"You are {persona.name}.\n\n{persona.system_prompt.strip()}"


def recipe_rules(recipe: Recipe) -> str:
    """The recipe's house rules, shared by every persona."""
    return recipe.rules.strip()


def tool_definitions(persona: Persona) -> str:
    """The persona's tools, one canonical JSON line each, sorted by name."""
    if not persona.tools:
        return "Tools: none."
    tools = sorted(persona.tools, key=lambda t: t.function.name)
    lines = [canonical_json(tool.model_dump(mode="json", exclude_none=True)) for tool in tools]
    return "Tools you can call (OpenAI function definitions, one per line):\n" + "\n".join(lines)


def participants(room_participants: list[Participant], history_start: int) -> str:
    """Who was in the room when its visible history began, one line each in order of arrival.

    Who joins later is an event in the history (`[Bob joined the room]`), so a join appends to the prompt
    instead of changing the section every persona's cached history follows.
    """
    lines = [f"- {neutralise_control_tokens(p.display_name)} ({p.kind})"
             for p in room_participants if _listed(p, history_start)]
    return "\n".join(["In the room, in order of arrival:", *lines])


def _listed(participant: Participant, history_start: int) -> bool:
    return not history_start or participant.joined_after < history_start


def active_adapters(adapter_set: AdapterSet) -> str:
    """The adapters applied to this persona's replies: ids, kinds and scales, and nothing else."""
    parts = []
    voice = adapter_set.voice
    if voice is not None:
        how = f"LoRA at {voice.scale:.2f}" if voice.manifest.format == "lora" else "TTS voice profile"
        parts.append(f"voice {voice.id} ({how})")
    parts += [f"skill {a.id} (LoRA at {a.scale:.2f})" for a in adapter_set.skills]
    return "Active adapters: " + ("; ".join(parts) if parts else "none") + "."


def agent_instructions(instructions: str | None) -> str:
    """The LiveKit agent's own instructions (empty outside LiveKit Agents)."""
    return neutralise_control_tokens((instructions or "").strip())


def conversation_history(
    room_messages: list[StoredMessage], persona_id: str, hears: bool, room_participants: list[Participant],
    history_start: int, agent_history: list[dict[str, Any]] | None = None,
    history_stt: Callable[[StoredMessage], str] | None = None,
) -> list[dict[str, Any]]:
    """The room's history as this persona sees it: its own words as assistant, everyone else's as user, and who
    joined after the history began, where they joined; inside LiveKit Agents, the agent's chat context. For a
    model that does not hear, audio another persona's model heard itself is put into words by `history_stt`."""
    if agent_history is not None:
        return [_defused(message) for message in agent_history]
    joins: dict[int, list[Participant]] = {}
    for participant in room_participants:
        if not _listed(participant, history_start):
            joins.setdefault(participant.joined_after, []).append(participant)
    # a history only grows between turns: render what is new since the last rendering of the same room's history
    # for this persona (the same StoredMessage objects, from the store's memory) and keep the rest
    key = (persona_id, hears, tuple((after, p.display_name) for after, ps in sorted(joins.items()) for p in ps),
           room_messages[0].id if room_messages else 0)
    with _HISTORIES_LOCK:
        known = _HISTORIES.get(key)
    start, seen, canonical = 0, [], ""
    if known is not None and known.extended_by(room_messages):
        start, seen, canonical = known.count, list(known.seen), known.canonical
    lines: list[str] = [canonical]
    for at in range(start, len(room_messages)):
        stored = room_messages[at]
        answered = bool(stored.preface) and _answered_by(room_messages, at) == persona_id
        message, line = stored.seen_line(persona_id, hears=hears, transcript=history_stt, answered=answered)
        seen.append(message)
        lines.append(line)
        for joined in joins.get(stored.id, ()):
            name = neutralise_control_tokens(joined.display_name)
            event = {"role": "user", "content": f"[{name} joined the room]"}
            seen.append(event)
            lines.append(canonical_json(event) + "\n")
    rendered = _RenderedHistory(
        room_messages[0] if room_messages else None, room_messages[-1] if room_messages else None,
        len(room_messages), tuple(seen), "".join(lines),
    )
    with _HISTORIES_LOCK:
        _HISTORIES[key] = rendered
        _HISTORIES.move_to_end(key)
        while len(_HISTORIES) > 1024:
            _HISTORIES.popitem(last=False)
    return CanonicalMessages(seen, rendered.canonical)


def _answered_by(messages: list[StoredMessage], at: int) -> str | None:
    """The persona whose reply follows the person's message at `at` in the same turn (a turn commits the two
    together), or None."""
    said = messages[at]
    following = messages[at + 1] if at + 1 < len(messages) else None
    if following is None or following.turn != said.turn or following.speaker_kind != "persona":
        return None
    return following.speaker


@dataclass(frozen=True)
class _RenderedHistory:
    """A history as last rendered for one persona: its first and last stored message and how many there were,
    the chat messages, their canonical text."""

    first: StoredMessage | None
    last: StoredMessage | None
    count: int
    seen: tuple[dict[str, Any], ...]
    canonical: str

    def extended_by(self, messages: list[StoredMessage]) -> bool:
        """Whether `messages` are these messages and then perhaps more. The store keeps a room's messages as one
        list it only appends to (a compaction, or anything but an append, starts a new list of new objects), so
        the same first object and the same object at the last known position say so without comparing the rest."""
        if self.count == 0 or len(messages) < self.count:
            return False
        return messages[0] is self.first and messages[self.count - 1] is self.last


_HISTORIES: OrderedDict[tuple[Any, ...], _RenderedHistory] = OrderedDict()
_HISTORIES_LOCK = threading.Lock()


def _defused(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message with control tokens in its text defused (tool calls' names and arguments kept as they are)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": neutralise_control_tokens(content)}
    if isinstance(content, list):
        parts = [{**part, "text": neutralise_control_tokens(part["text"])} if isinstance(part.get("text"), str)
                 else part for part in content]
        return {**message, "content": parts}
    return message


def current_time(now: datetime) -> str:
    """The turn's wall-clock time, to the minute."""
    minute = (now.year, now.month, now.day, now.hour, now.minute, now.fold, now.tzinfo)
    text = _MINUTES.get(minute)
    if text is None:  # formatted once a minute (per time zone)
        if len(_MINUTES) >= 64:
            _MINUTES.clear()
        text = _MINUTES[minute] = "Current time: " + now.strftime("%A %d %B %Y, %H:%M %Z").strip() + "."
    return text


_MINUTES: dict[tuple[Any, ...], str] = {}


def user_turn(user_content: UserContent, speaker: str) -> list[dict[str, Any]]:
    """What the speaker said this turn, as one user message; control tokens in their words are defused.

    Nothing when nothing was said (a turn that goes on after tool results)."""
    if not user_content.text and not user_content.parts:
        return []
    return [user_content.as_message(neutralise_control_tokens(speaker))]


BUILTIN_SOURCES: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (
        persona_identity,
        agent_instructions,
        recipe_rules,
        tool_definitions,
        participants,
        active_adapters,
        conversation_history,
        current_time,
        user_turn,
    )
}
