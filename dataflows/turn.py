"""The turn DAG's fixed nodes: room state in, stable-first prompt, pinned slot, streamed reply, report out.

The recipe adds one node per source between `user_content` and `prompt` (see `turnflow.driver`);
`sections` collects them; the voice nodes (`dataflows/voice.py`) hear and speak. Parameter names are the edges.
"""

from __future__ import annotations

import functools
import hashlib
import math
import zlib
from contextlib import ExitStack
from datetime import datetime
from typing import Any

from hamilton.function_modifiers import config

from turnflow.adapters import AdapterRegistry, AdapterSet, resolve_set
from turnflow.backend import AdapterLease, Backend
from turnflow.kv import KvKey, KvPrepared, kv_source, page_out_idle, prepare_slot
from turnflow.nodes.images import Image
from turnflow.nodes.llm import Affinity, ChatReply, ReplyStream
from turnflow.nodes.media import Audio
from turnflow.nodes.prompt import Prompt, SourceOutput, assemble, assemble_append_only, assemble_naive
from turnflow.nodes.speech import TtsVoice
from turnflow.nodes.streaming import SpokenReply
from turnflow.nodes.text import neutralise_control_tokens
from turnflow.recipe import Persona, Recipe
from turnflow.store import ConversationStore, Participant, RoomState, SlotClaim, StoredMessage


class TierViolationError(RuntimeError):
    """Raised in strict mode when a source broke its tier's promise."""


def persona_version(persona: Persona) -> str:
    """The persona's declared version plus a digest of its content, so edits are never served stale."""
    return f"{persona.version}+{persona.digest[:12]}"


def recipe_id(recipe: Recipe) -> str:
    """The recipe's id."""
    return recipe.recipe


def room_messages(room_state: RoomState) -> list[StoredMessage]:
    """The room's visible history."""
    return room_state.messages


def room_participants(room_state: RoomState) -> list[Participant]:
    """People and personas in the room, in order of arrival."""
    return room_state.participants


def participants_version(room_state: RoomState) -> str:
    """Changes whenever someone joins or leaves the room."""
    return str(room_state.participants_version)


def compaction_epoch(room_state: RoomState) -> int:
    """How many times the room's history was compacted: a new epoch may drop old messages."""
    return room_state.compaction_epoch


def history_start(room_state: RoomState) -> int:
    """The id of the first visible message: who joined before it is listed, who joined after is a history event."""
    return room_state.history_start


def history_tail_msg_ids(room_state: RoomState) -> str:
    """Ids of the newest messages: changes whenever the history grows."""
    return room_state.history_tail_msg_ids


def instructions_digest(instructions: str | None) -> str:
    """Changes whenever the LiveKit agent's instructions do (empty outside LiveKit Agents)."""
    return hashlib.sha256((instructions or "").encode()).hexdigest()[:16]


def adapter_set(persona: Persona, backend: Backend | None, adapter_registry: AdapterRegistry) -> AdapterSet:
    """The persona's voice and skill adapters, resolved from the registry for the backend's model."""
    voice, skills = persona.adapter_refs
    return resolve_set(voice, skills, adapter_registry, backend.base_model if backend is not None else None)


def adapter_set_digest(adapter_set: AdapterSet) -> str:
    """Changes whenever the persona's adapter files or scales do."""
    return adapter_set.digest


@config.when_not_in(assembly=["naive", "unordered", "append_only"])
def prompt__stable_first(sections: dict[str, SourceOutput], strict: bool, adapter_set: AdapterSet) -> Prompt:
    """The sources assembled stable-first behind the adapter set's salt; in strict mode a tier violation stops
    the turn here."""
    if strict:
        found = [v["message"] for output in sections.values() for v in output.violations]
        if found:
            raise TierViolationError("; ".join(found))
    return assemble(sections, salt=adapter_set.salt)


@config.when_in(assembly=["naive", "unordered"])
def prompt__naive(
    sections: dict[str, SourceOutput], now: datetime, persona_id: str, turn: int, adapter_set: AdapterSet,
    assembly: str,
) -> Prompt:
    """Baseline for benchmarks: sections in completion order under a timestamped system prompt (`naive`), or in
    completion order alone (`unordered`: the ablation without stable-first ordering)."""
    return assemble_naive(
        sections, now.isoformat(timespec="seconds"), zlib.crc32(f"{persona_id}:{turn}".encode()), adapter_set.salt,
        timestamp=assembly == "naive",
    )


@config.when(assembly="append_only")
def prompt__append_only(sections: dict[str, SourceOutput], adapter_set: AdapterSet) -> Prompt:
    """Baseline for benchmarks: what LiveKit Agents or Pipecat send (static instructions, the history appended,
    the turn's context in the newest user message)."""
    return assemble_append_only(sections, adapter_set.salt)


def tier_violations(sections: dict[str, SourceOutput]) -> list[dict[str, str]]:
    """Sources that broke their tier's promise this turn."""
    return [v for name in sorted(sections) for v in sections[name].violations]


def composition_cache_stats(sections: dict[str, SourceOutput]) -> dict[str, Any]:
    """Composition cache hits and misses over the cached sources, and each source's outcome."""
    return {
        "hits": sum(o.cache == "hit" for o in sections.values()),
        "misses": sum(o.cache == "miss" for o in sections.values()),
        "by_source": {name: sections[name].cache for name in sorted(sections)},
    }


@config.when(slot_pinning="off")
def slot_claim__unpinned() -> SlotClaim | None:
    """Baseline for benchmarks: no slot pinning, the server picks a slot."""
    return None


@config.when_not(slot_pinning="off")
def slot_claim__pinned(
    persona_id: str, backend: Backend, store: ConversationStore, turn_resources: ExitStack, prompt: Prompt,
    recipe: Recipe,
) -> SlotClaim | None:
    """The slot this turn holds: the persona's own while it keeps its KV, else (with KV paging) a free or the
    least recently used one, with the KV this turn will hold counted for it; None when the server has no slots
    to pin. The turn's commit lets it go (a failed turn lets it go as it ends)."""
    slots = backend.capabilities.total_slots
    if not slots:
        return None
    need = backend.estimate_tokens(prompt) + recipe.generation.max_tokens
    claim = store.claim_slot(backend.key, slots, persona_id, paging=backend.kv_paging, reserve=need)
    turn_resources.callback(store.release_slot, claim)
    return claim


def slot(slot_claim: SlotClaim | None) -> int | None:
    """The llama-server slot the turn runs on (`id_slot`)."""
    return slot_claim.slot if slot_claim is not None else None


def adapters(
    adapter_set: AdapterSet, slot_claim: SlotClaim | None, prompt: Prompt, backend: Backend, recipe: Recipe,
    turn_resources: ExitStack,
) -> AdapterLease:
    """The persona's LoRA adapters resident on the backend for this turn (paged in when missing), on a KV pool
    big enough for what the slots will hold (turns in flight included)."""
    need = backend.estimate_tokens(prompt) + recipe.generation.max_tokens
    held = slot_claim.others_tokens if slot_claim is not None else 0
    lease = backend.lease_adapters(adapter_set, slot_claim.slot if slot_claim else None, pool_needed=held + need)
    turn_resources.callback(lease.release)
    return lease


def kv(
    slot_claim: SlotClaim | None, adapters: AdapterLease, prompt: Prompt, adapter_set: AdapterSet, persona_id: str,
    backend: Backend, store: ConversationStore, recipe: Recipe,
) -> KvPrepared:
    """The persona's KV in its slot before the model call: already there, restored from disk, or recomputed."""
    if slot_claim is None or not backend.kv_paging:
        return KvPrepared("slot" if slot_claim is not None and slot_claim.own else "none")
    model = backend.model_digest
    files = backend.kv_files
    key = KvKey(model, persona_id, adapter_set.digest, prompt.invariant_sha256)
    prepared = prepare_slot(backend.url, slot_claim, key, adapters.lora, files, model=model)
    if backend.kv_budgeted and adapters.pool_tokens:
        need = backend.estimate_tokens(prompt) + recipe.generation.max_tokens
        paged, written = page_out_idle(backend.url, store, slot_claim, need, adapters.pool_tokens, files, model=model)
        prepared.paged_out, prepared.saved_bytes = paged, prepared.saved_bytes + written
    return prepared


def kv_report(
    kv: KvPrepared, reply: ChatReply, slot_claim: SlotClaim | None, prompt: Prompt, adapter_set: AdapterSet,
    persona_id: str, adapters: AdapterLease, backend: Backend,
) -> dict[str, Any]:
    """Where the prompt's KV came from (`slot`, `host-cache`, `disk`, `recomputed`) and what the pool holds."""
    if slot_claim is not None:  # what the slot holds now, for the next turn that takes it
        slot_claim.persona_id, slot_claim.adapters = persona_id, adapter_set.digest
        slot_claim.prefix = prompt.invariant_sha256
        slot_claim.tokens = (reply.prompt_tokens or 0) + (reply.completion_tokens or 0)
        backend.note_kv_usage(slot_claim.others_tokens + slot_claim.tokens)
    backend.learn_token_size(prompt, reply.prompt_tokens)
    return {
        "source": kv_source(kv, reply.prompt_tokens, reply.prompt_tokens_cached),
        "restore_ms": kv.restore_ms,
        "saved_bytes": kv.saved_bytes,
        "paged_out": kv.paged_out or [],
        "bytes_per_token": backend.kv_bytes_per_token,
        "pool_tokens": adapters.pool_tokens or backend.capabilities.n_ctx,
        **({"not_restored": kv.note} if kv.note and kv.before == "none" else {}),
    }


def affinity(persona_id: str, room_id: str, backend: Backend) -> Affinity:
    """The conversation's stable affinity key, persona@room, sent as the backend's settings say (`affinity:`)."""
    settings = backend.spec.affinity
    return Affinity(f"{persona_id}@{room_id}", user_field=settings.user, header=settings.header)


def reply_stream(
    prompt: Prompt, slot: int | None, backend: Backend, recipe: Recipe, persona: Persona, route_audio_out: str,
    audio_sink: Any, on_text: Any, adapters: AdapterLease, tts_voice: TtsVoice, kv: KvPrepared, cancel: Any,
    agent_tools: list[dict[str, Any]] | None, agent_tool_choice: Any, affinity: Affinity,
    room_participants: list[Participant], persona_id: str, speaker: str,
) -> ReplyStream:
    """The streamed chat completion on the persona's slot with its adapters applied and prompt caching on, once
    the slot's KV is in place (`kv`), offering the caller's tools (`agent_tools`); setting `cancel` stops it.
    With `generation.stop_at_speakers`, it ends where the model starts a line of someone in the room."""
    generation = recipe.generation
    speaks = route_audio_out == "native" and audio_sink is not None
    stop, labels = backend.stop_sequences, None
    if generation.stop_at_speakers:
        stop, labels = _speaker_stops(
            backend.control_tokens.digest, tuple(stop), persona.name, persona_id, speaker, tuple(room_participants)
        )
    stream = backend.client.stream(
        prompt.messages,
        max_tokens=generation.max_tokens,
        temperature=generation.temperature,
        seed=generation.seed,
        id_slot=slot,
        lora=adapters.lora,
        audio_out={"voice": tts_voice.voice, "format": "pcm16"} if speaks else None,
        tools=agent_tools,
        tool_choice=agent_tool_choice,
        # llama-server refuses a grammar of the backend's besides tools: the tools' own grammar holds the reply then
        extra={k: v for k, v in backend.spec.request_defaults.items() if not (agent_tools and k == "grammar")},
        affinity=affinity,
        stop=stop,
        labels=labels,
    )
    stream.on_delta = on_text
    stream.cancel = cancel
    return stream


@functools.lru_cache(maxsize=1024)
def _speaker_stops(
    model_tokens: str, stops: tuple[str, ...], name: str, persona_id: str, speaker: str,
    participants: tuple[Participant, ...],
) -> tuple[list[str], list[str]]:
    """The template's stops and a `\nName:` for every name a room's lines are labelled with (the persona's own name
    and id, the speaker's, each participant's id and display name, as the prompt writes them); the persona's own
    labels. A reply that opens with its own label loses it; one that opens with someone else's is left as the model
    wrote it. Cached per model (`model_tokens`, the digest of the control tokens defused in names)."""
    own = _names([name, persona_id])
    names = _names([*own, speaker, *(n for p in participants for n in (p.participant, p.display_name))])
    return [*stops, *(f"\n{n}:" for n in names)], [f"{n}:" for n in own]


def _names(names: list[str]) -> list[str]:
    """Speaker names as the prompt writes them (control tokens defused), each once, in order."""
    return list(dict.fromkeys(neutralise_control_tokens(name) for name in names if name.strip()))


def turn_report(
    persona_id: str,
    room_id: str,
    turn: int,
    now: datetime,
    prompt: Prompt,
    reply: ChatReply,
    speech: SpokenReply,
    transcript: str | None,
    media: Audio | None,
    route_audio_in: str,
    images: list[Image],
    route_images_in: str,
    slot: int | None,
    backend: Backend,
    composition_cache_stats: dict[str, Any],
    tier_violations: list[dict[str, str]],
    adapter_set: AdapterSet,
    adapters: AdapterLease,
    voice_fingerprint: dict[str, Any] | None,
    kv_report: dict[str, Any],
    affinity: Affinity,
) -> dict[str, Any]:
    """Everything measured about this turn (the session adds total timings)."""
    return {
        "persona": persona_id,
        "room": room_id,
        "turn": turn,
        "at": now.isoformat(),
        "prefix": {
            "invariant_sha256": prompt.invariant_sha256,
            "invariant_bytes": prompt.invariant_bytes,
            "semi_stable_sha256": prompt.semi_stable_sha256,
            "semi_stable_bytes": prompt.semi_stable_bytes,
            "volatile_bytes": prompt.volatile_bytes,
            "order": prompt.order,
        },
        "llm": {
            "backend": backend.name,
            "affinity_key": affinity.key,
            "slot": slot,
            "prompt_tokens": reply.prompt_tokens,
            "prompt_tokens_processed": reply.prompt_tokens_processed,
            "prompt_tokens_cached": reply.prompt_tokens_cached,
            "completion_tokens": reply.completion_tokens,
            "finish_reason": reply.finish_reason,
            "ttft_ms": _round(reply.ttft_ms),
            # the server's own clock: its prompt processing, and its time per generated token (how fast the machine
            # ran: a benchmark's latencies compare only where this one matches)
            "server_prompt_ms": _round(_number(reply.server_timings.get("prompt_ms"))),
            "server_decode_ms_per_token": _round(_number(reply.server_timings.get("predicted_per_token_ms"))),
        },
        "route": {
            "audio_in": route_audio_in if media is not None else "none",
            "audio_out": speech.route,
            "images_in": route_images_in if images else "none",
        },
        "invocations": {
            "stt": int(transcript is not None),
            "tts": len(speech.sentences) if speech.route == "tts" else 0,
            "llm": 1,
            "describe": len(images) if route_images_in == "describe" else 0,
        },
        "transcript": transcript,
        "speech": {
            "sentences": len(speech.sentences),
            "audio_s": round(speech.duration_s, 3),
            "first_audio_ms": _round(speech.first_audio_ms),
            "first_audio_at_char": speech.first_audio_at_char,
            "tts_ttfb_ms": _round(speech.tts_ttfb_ms),
            "voice_fingerprint": voice_fingerprint,
        },
        "adapters": {
            **{k: v for k, v in adapter_set.describe().items() if k != "detail"},
            "lora": adapters.lora or [],
            "resident": adapters.resident,
            "paged_in": adapters.paged_in,
            "page_ms": adapters.page_ms,
            "salt": adapter_set.salt,
        },
        "kv": kv_report,
        "composition_cache": composition_cache_stats,
        "tier_violations": tier_violations,
        "reply": reply.text,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _number(value: Any) -> float | None:
    """A number the server reported, or None (missing, not a number, or not finite: one generated token)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value)
