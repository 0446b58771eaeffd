"""The Python entry point: open a recipe and a backend, run turns, publish events.

    with turnflow.Session("recipes/voice-chat.yaml") as session:
        result = session.turn(persona="maya", room="standup", text="What's on the board?")
        print(result.reply, result.report["llm"]["prompt_tokens_processed"])

A turn is one execution of the recipe's DAG; its history is committed only when the whole turn
succeeded, so a failed turn (a dead model server, a tier violation in strict mode) leaves the room as
it was.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from turnflow.adapters import AdapterError, AdapterRegistry
from turnflow.backend import Backend, Capabilities, open_backend
from turnflow.cache import CompositionCache, Event
from turnflow.dataflows.turn import TierViolationError
from turnflow.driver import ASSEMBLIES, build_driver, collect_node_timings, stop_collecting
from turnflow.nodes.images import ImageError
from turnflow.nodes.llm import BackendError, ChatReply
from turnflow.nodes.media import Audio, AudioError
from turnflow.nodes.prompt import Prompt
from turnflow.nodes.publish import WavSink
from turnflow.nodes.speech import SpeechBridges
from turnflow.nodes.text import canonical_json, control_tokens_for, neutralise_control_tokens
from turnflow.paths import home
from turnflow.recipe import Persona, Recipe, backends_for, find_persona, load_recipe
from turnflow.server import ServerError
from turnflow.store import ConversationStore, Participant


class TurnError(RuntimeError):
    """A turn failed; the room's history is unchanged."""


INTERRUPTED_QUOTE_WORDS = 8
"""How many of the last words heard an `[interrupted after “…”]` note quotes."""


@dataclass
class TurnResult:
    """One finished turn."""

    reply: str
    report: dict[str, Any]
    prompt: Prompt
    llm: ChatReply
    audio: Audio | None = None


class Session:
    """A recipe bound to a backend, a conversation store and a composition cache."""

    def __init__(
        self,
        recipe: str | Path | Recipe,
        *,
        backend: str | None = None,
        state_dir: str | Path | None = None,
        strict: bool = False,
        assembly: str = "stable_first",
        warn: Callable[[str], None] | None = None,
        pin_slots: bool = True,
        composition_cache: bool = True,
    ):
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.strict = strict
        if assembly not in ASSEMBLIES:
            raise ValueError(
                f"assembly {assembly!r}: use 'stable_first', or a benchmark baseline: "
                "'naive', 'unordered', 'append_only'"
            )
        self.assembly = assembly
        baseline = assembly in ("naive", "append_only")  # peers pin no slot and keep no composition cache
        self.pin_slots = pin_slots and not baseline
        """Pin each persona to a slot (`id_slot`); off, the server picks one (a benchmark ablation)."""
        self.use_composition_cache = composition_cache and not baseline
        """Serve cached sections from the composition cache; off, every source runs every turn (an ablation)."""
        self._warn = warn or (lambda message: print(message, file=sys.stderr))
        root = Path(state_dir) if state_dir else home()
        self.store = ConversationStore(root / "rooms.sqlite3")
        self.cache = CompositionCache(root / "composition-cache.json")
        self.adapters = AdapterRegistry()
        backends = backends_for(self.recipe)
        self.backend_name = backend or self.recipe.backend
        if self.backend_name not in backends:
            raise ValueError(f"unknown backend {self.backend_name!r}; known: {', '.join(sorted(backends))}")
        self._backend_spec = backends[self.backend_name]
        self._backend: Backend | None = None
        self._personas: dict[str, Persona] = {}
        self._lock = threading.RLock()  # a Session may be shared by threads, each running its own turns
        self._retired: list[Backend] = []
        speech = self.recipe.speech
        self.bridges = SpeechBridges(speech.stt, speech.tts, speech.describe)
        recipe_id = self.recipe.recipe
        self._publish_if_changed(f"recipe:{recipe_id}", self.recipe.digest, Event.recipe_changed(recipe_id))

    # -- lifecycle

    @property
    def backend(self) -> Backend:
        """The backend, connected (and for embedded backends, started) on first use."""
        with self._lock:
            if self._backend is None:
                self._backend = open_backend(self.backend_name, self._backend_spec)
            return self._backend

    def _drop_backend(self) -> None:
        """Forget the connection after a failure: the next turn reconnects and asks the server again what it
        can do (an embedded server that died is started again)."""
        with self._lock:
            if self._backend is not None:  # closed with the session: other threads' turns may still use it
                self._retired.append(self._backend)
                self._backend = None

    def close(self) -> None:
        """Close the store, the cache and the backend client (an embedded server keeps running)."""
        for backend in (*self._retired, *([self._backend] if self._backend else [])):
            backend.close()
        self.store.close()
        self.cache.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- events

    def publish(self, event: Event) -> None:
        """Invalidate the cached sections that depend on what the event says changed."""
        self.cache.publish(event)

    def _publish_if_changed(self, what: str, digest: str, event: Event) -> None:
        """Publish `event` when a file's content differs from what this state directory saw last."""
        marker = f"digest:{what}"
        seen = self.cache.marker(marker)
        if seen != digest:
            if seen is not None:
                self.publish(event)
            self.cache.set_marker(marker, digest)

    def persona(self, persona_id: str) -> Persona:
        """Load a persona beside the recipe (once per session)."""
        with self._lock:
            return self._load_persona(persona_id)

    def _load_persona(self, persona_id: str) -> Persona:
        if persona_id not in self._personas:
            if self.recipe.personas is not None and persona_id not in self.recipe.personas:
                raise ValueError(
                    f"persona {persona_id!r} is not served by recipe {self.recipe.recipe!r} "
                    f"(personas: {', '.join(self.recipe.personas)})"
                )
            persona = find_persona(self.recipe, persona_id)
            self._publish_if_changed(f"persona:{persona_id}", persona.digest, Event.persona_changed(persona_id))
            self._personas[persona_id] = persona
        return self._personas[persona_id]

    def join(self, room: str, participant: str, *, kind: str = "person", display_name: str | None = None) -> None:
        """Add a person (or persona) to a room."""
        who = Participant(participant, "persona" if kind == "persona" else "person",
                          neutralise_control_tokens(display_name or participant))
        if self.store.join(room, who):
            self.publish(Event.participants_changed(room))

    def mark_interrupted(self, room: str, persona: str, heard: str) -> str | None:
        """Note in the room's history that `persona`'s last reply was cut after the words `heard`.

        The history only grows (the reply stays as the model wrote it, so the prefix stays cached); the
        note after it quotes the last words the listeners heard. Returns the note, or None when the
        persona has no reply in the room to mark.
        """
        turn = self.store.last_turn_of(room, persona, "persona")
        if turn is None:
            return None
        words = neutralise_control_tokens(heard).split()
        if not words:
            note = "[interrupted before any of the reply above was heard]"
        else:
            tail = " ".join(words[-INTERRUPTED_QUOTE_WORDS:])
            note = f"[interrupted after \u201c{'…' if len(words) > INTERRUPTED_QUOTE_WORDS else ''}{tail}\u201d]"
        persona_who = Participant(persona, "persona", self.persona(persona).name)
        self.store.add_message(room, turn, persona_who, note, note)
        return note

    # -- turns

    def _compact_if_over_budget(self, room: str, prompt: Prompt, prompt_tokens: int | None) -> None:
        """Past 90 % of the recipe's prompt budget, hide the room's older history in one large block.

        What stays is the newest history that fits in half the room left for history, so many turns pass
        (with the prefix warm) before the next compaction; never one message a turn.
        """
        budget = self.recipe.budget.max_prompt_tokens
        if not prompt_tokens or prompt_tokens <= 0.9 * budget:
            return
        messages = self.store.room(room).messages
        prompt_bytes = prompt.invariant_bytes + prompt.semi_stable_bytes + prompt.volatile_bytes
        tokens_per_byte = prompt_tokens / max(1, prompt_bytes)
        sizes = [len(canonical_json(m.content).encode()) * tokens_per_byte for m in messages]
        base = prompt_tokens - sum(sizes)
        room_for_history = max(0.0, (0.9 * budget - base) / 2)
        keep, kept_tokens = 0, 0.0
        for size in reversed(sizes):
            if kept_tokens + size > room_for_history:
                break
            kept_tokens += size
            keep += 1
        if self.store.compact(room, keep=keep):
            self.publish(Event.message_added(room))
            self.publish(Event.participants_changed(room))  # who is listed vs joined in the history moved

    def driver(self, *, connect: bool = True) -> Any:
        """The built Hamilton driver for this recipe and the backend's capability profile.

        Without `connect`, a backend not yet connected is assumed text-only (enough to assemble prompts).
        """
        caps = self.backend.capabilities if connect or self._backend else Capabilities()
        profile = {**caps.profile, "assembly": self.assembly, "slot_pinning": "on" if self.pin_slots else "off"}
        if connect or self._backend:  # what sources defuse follows the model's control tokens
            profile["control_tokens"] = self.backend.control_tokens.digest
        return build_driver(self.recipe, profile)

    def _inputs(
        self, persona: str, room: str, text: str | None, speaker: str, now: datetime | None, audio: Any = None,
        images: list[Any] | None = None, transcript: str | None = None,
    ) -> dict[str, Any]:
        """The DAG inputs of one turn (the room as it is now)."""
        self.cache.begin_turn()
        room_state = self.store.room(room)
        return {
            "persona_id": persona,
            "persona": self.persona(persona),
            "recipe": self.recipe,
            "room_id": room,
            "room_state": room_state,
            "turn": room_state.last_turn + 1,
            "now": now or datetime.now(UTC),
            "speaker": speaker,
            "text_in": text,
            "audio_in": audio,
            "images_in": list(images or []),
            "transcript_in": transcript,
            "strict": self.strict,
            "store": self.store,
            "composition_cache": self.cache if self.use_composition_cache else None,
            "speech_bridges": self.bridges,
            "adapter_registry": self.adapters,
            "backend": self._backend,  # None until connected: prompts can be assembled without a server
        }

    def preview(
        self, *, persona: str, room: str = "default", text: str, speaker: str = "user", now: datetime | None = None
    ) -> Prompt:
        """The prompt this turn would send, assembled without calling (or starting) the model server."""
        inputs = self._inputs(persona, room, text, speaker, now)
        return self.driver(connect=False).execute(["prompt"], inputs=inputs)["prompt"]

    def turn(
        self,
        *,
        persona: str,
        room: str = "default",
        text: str | None = None,
        audio: Any = None,
        images: list[Any] | None = None,
        transcript: str | None = None,
        speaker: str = "user",
        out: str | Path | None = None,
        audio_sink: Callable[[Audio], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        now: datetime | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Run one turn: `speaker` says `text` or `audio` to `persona` in `room`.

        `audio` is a WAV path, WAV/PCM bytes, a numpy array, an `Audio`, or an OpenAI `input_audio` dict
        (`{"data": base64, "format": "wav"}`); `images` are paths, bytes, data URLs or `image_url` parts.
        `transcript` is this audio's transcript when the caller already made one (the STT bridge then does not
        run again). The reply is spoken when `out` (a WAV file) or `audio_sink`
        (called with each chunk of reply audio as soon as it exists) is given. Bad audio raises `AudioError`;
        bad images `ImageError`; a failed turn raises `TurnError`. Either way the room's history is unchanged.
        Setting `cancel` (a person talking over the reply) stops the model and the TTS bridge: the turn ends
        with what was written so far (`llm.finish_reason: cancelled`).
        """
        if text is None and audio is None and not images:
            raise ValueError("a turn needs text=, audio= or images= (what the speaker said or showed)")
        setup_started = time.perf_counter()
        persona_model = self.persona(persona)
        try:
            backend = self.backend
            dr = self.driver()
        except (BackendError, ServerError) as exc:  # an unreachable server fails the turn like any other failure
            self._drop_backend()
            raise TurnError(f"turn in room {room!r} failed; history unchanged: {exc}") from exc
        started = time.perf_counter()
        setup_ms = (started - setup_started) * 1000
        sink, wav = _audio_sink(out, audio_sink)
        resources = ExitStack()
        inputs = {
            **self._inputs(persona, room, text, speaker, now, audio, images, transcript),
            "backend": backend,
            "on_text": on_text,
            "audio_sink": sink,
            "turn_started": started,
            "turn_resources": resources,
            "cancel": cancel,
        }
        turn_no = inputs["turn"]
        timings, token = collect_node_timings()
        try:
            with control_tokens_for(backend.control_tokens):
                outputs = dr.execute(["turn_report", "prompt", "reply", "speech", "user_content"], inputs=inputs)
        except (AudioError, ImageError):
            raise
        except (BackendError, TierViolationError, AdapterError) as exc:
            if isinstance(exc, BackendError):
                self._drop_backend()
            raise TurnError(f"turn {turn_no} in room {room!r} failed; history unchanged: {exc}") from exc
        except Exception as exc:  # a user's source raised, or a node failed: the turn fails, the room stays intact
            raise TurnError(
                f"turn {turn_no} in room {room!r} failed; history unchanged: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            resources.close()  # the adapter lease: a page-in for another persona may go ahead
            stop_collecting(token)
            if wav is not None:
                wav.close()
        report, prompt, reply = outputs["turn_report"], outputs["prompt"], outputs["reply"]
        with control_tokens_for(backend.control_tokens):  # nothing enters the history with a live control token
            speaker_who = Participant(speaker, "person", neutralise_control_tokens(speaker))
            said = neutralise_control_tokens(outputs["user_content"].transcript or text or "")
            replied = neutralise_control_tokens(reply.text)
        persona_who = Participant(persona, "persona", persona_model.name)
        report["turn"] = self.store.commit_turn(
            room, turn_no, speaker_who, prompt.user_message["content"], said, persona_who, replied
        )
        self._compact_if_over_budget(room, prompt, report["llm"]["prompt_tokens"])
        for violation in report["tier_violations"]:
            self._warn(f"turnflow: tier violation in {persona}/{room} turn {turn_no}: {violation['message']}")
        # the model stream is read (and spoken) inside `speech`; STT runs in `transcript`: not turnflow's own work
        page_ms = report["adapters"]["page_ms"]  # a page-in restarts the model server: not turnflow's own work
        external = ("speech", "transcript", "voice_fingerprint")
        external_ms = sum(timings.get(name, 0.0) for name in external) + page_ms
        total_ms = (time.perf_counter() - started) * 1000
        speech = outputs["speech"]
        report["timings_ms"] = {
            "total": round(total_ms, 2),
            "first_audio": report["speech"]["first_audio_ms"],
            "model": round(reply.total_ms, 2),
            "stt": round(timings.get("transcript", 0.0), 2),
            "adapter_page": page_ms,
            "speech": round(timings.get("speech", 0.0) + timings.get("voice_fingerprint", 0.0), 2),
            "turnflow": round(total_ms - external_ms, 2),
            "setup": round(setup_ms, 2),
            "nodes": {name: round(ms, 3) for name, ms in timings.items()},
        }
        report["metrics"] = {  # LiveKit Agents' names, in seconds
            "ttft": _seconds(reply.ttft_ms),
            "tts_ttfb": _seconds(speech.tts_ttfb_ms),
            "e2e_latency": _seconds(speech.first_audio_ms),
        }
        return TurnResult(reply=reply.text, report=report, prompt=prompt, llm=reply, audio=speech.audio)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 4)


def _audio_sink(
    out: str | Path | None, audio_sink: Callable[[Audio], None] | None
) -> tuple[Callable[[Audio], None] | None, WavSink | None]:
    """One callable that feeds the WAV file and the caller's sink; None when nobody listens."""
    wav = WavSink(out) if out is not None else None
    if wav is None:
        return audio_sink, None

    def both(audio: Audio) -> None:
        wav.write(audio)
        if audio_sink is not None:
            audio_sink(audio)

    return both, wav
