"""The Python entry point: open a recipe and a backend, run turns, publish events.

    with turnflow.Session("recipes/voice-chat.yaml") as session:
        result = session.turn(persona="maya", room="standup", text="What's on the board?")
        print(result.reply, result.report["llm"]["prompt_tokens_processed"])

A turn is one execution of the recipe's DAG; its history is committed only when the whole turn
succeeded, so a failed turn (a dead model server, a tier violation in strict mode) leaves the room as
it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any

from turnflow.adapters import AdapterError, AdapterRegistry, resolve_set
from turnflow.backend import Backend, Capabilities, open_backend
from turnflow.cache import CompositionCache, Event
from turnflow.dataflows.turn import TierViolationError
from turnflow.driver import ASSEMBLIES, build_driver, collect_node_timings, stop_collecting
from turnflow.nodes.images import ImageError
from turnflow.nodes.llm import BackendError, ChatReply
from turnflow.nodes.media import Audio, AudioError
from turnflow.nodes.prompt import Prompt, canonical_text
from turnflow.nodes.publish import WavSink
from turnflow.nodes.speech import SpeechBridges
from turnflow.nodes.text import canonical_json, control_tokens_for, neutralise_control_tokens
from turnflow.paths import home
from turnflow.placement import BackendPool, Strategy
from turnflow.recipe import Persona, Recipe, backends_for, code_digest, find_persona, load_recipe
from turnflow.server import ServerError
from turnflow.store import Participant, open_store


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


@dataclass(frozen=True)
class AgentContext:
    """A conversation its caller keeps (LiveKit Agents' chat context): a turn given one reads the agent's
    instructions and history from it instead of the room's stored history, and commits nothing to the store."""

    instructions: str
    """The agent's instructions: the `agent_instructions` source (invariant)."""
    history: list[dict[str, Any]]
    """The conversation before what is new this turn, as OpenAI chat messages: the `conversation_history` source."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The agent's tools as OpenAI function definitions (the request's `tools`), in a stable order."""
    tool_choice: str | dict[str, Any] | None = None
    """`auto`, `required`, `none` or a named function; None leaves it to the server."""
    turn: int = 1
    """The turn's number in this conversation."""
    compaction_epoch: int = 0
    """Bumped whenever the history stopped growing by appending (the agent truncated or rewrote it)."""

    @property
    def history_digest(self) -> str:
        """Changes whenever the history does (the `history_tail_msg_ids` cache key of these turns)."""
        return "ctx:" + hashlib.sha256(canonical_text(self.history).encode()).hexdigest()[:16]


class Session:
    """A recipe bound to a backend, a conversation store and a composition cache."""

    def __init__(
        self,
        recipe: str | Path | Recipe,
        *,
        backend: str | None = None,
        state_dir: str | Path | None = None,
        store: str | None = None,
        strict: bool = False,
        assembly: str = "stable_first",
        placement: Strategy = "rendezvous",
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
        self.store = open_store(store, default=root / "rooms.sqlite3")
        self.cache = CompositionCache(root / "composition-cache.json")
        self.adapters = AdapterRegistry()
        backends = backends_for(self.recipe)
        self.backend_name = backend or self.recipe.backend
        if self.backend_name not in backends:
            raise ValueError(f"unknown backend {self.backend_name!r}; known: {', '.join(sorted(backends))}")
        self._backend_spec = backends[self.backend_name]
        self.pool = (BackendPool(self.backend_name, self._backend_spec, backends, strategy=placement)
                     if self._backend_spec.kind == "pool" else None)
        """The members of a `kind: pool` backend, over which personas are placed (None for one backend)."""
        self._backend: Backend | None = None
        self._personas: dict[str, Persona] = {}
        self._drivers: dict[Any, tuple[str, Any]] = {}
        """The driver last built per (backend, capabilities, control tokens), with the code digest it was built at."""
        self._lock = threading.RLock()  # a Session may be shared by threads, each running its own turns
        self._retired: list[Backend] = []
        speech = self.recipe.speech
        self.bridges = SpeechBridges(speech.stt, speech.tts, speech.describe)
        recipe_id = self.recipe.recipe
        self._publish_if_changed(f"recipe:{recipe_id}", self.recipe.digest, Event.recipe_changed(recipe_id))

    # -- lifecycle

    @property
    def backend(self) -> Backend:
        """The backend, connected (and for embedded backends, started) on first use; of a pool, the first member
        that answers (a turn runs on the persona's own member: `route()`)."""
        with self._lock:
            if self.pool is not None:
                return self.pool.any_backend()
            if self._backend is None:
                self._backend = open_backend(self.backend_name, self._backend_spec)
            return self._backend

    def _drop_backend(self, member: str | None = None, error: Exception | None = None) -> None:
        """Forget the connection after a failure: the next turn reconnects and asks the server again what it
        can do (an embedded server that died is started again). A pool's member is set aside instead (its
        personas' turns go to their next-ranked member until it answers again)."""
        if self.pool is not None and member is not None:
            self.pool.mark_down(member, str(error or "failed"))
            return
        with self._lock:
            if self._backend is not None:  # closed with the session: other threads' turns may still use it
                self._retired.append(self._backend)
                self._backend = None

    def close(self) -> None:
        """Close the store, the cache and the backend client (an embedded server keeps running)."""
        for backend in (*self._retired, *([self._backend] if self._backend else [])):
            backend.close()
        if self.pool is not None:
            self.pool.close()
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
        if not (connect or self._backend):
            return self._driver_for(None)
        return self._driver_for(self.backend)

    def _driver_for(self, backend: Backend | None) -> Any:
        # the same backend with the same capabilities and control tokens: the same profile, so the same driver while
        # the recipe's code files are unchanged (checked every turn: an edit is never served stale)
        memo_key = (backend, backend.capabilities, backend.control_tokens) if backend is not None else None
        code = code_digest(self.recipe)
        known = self._drivers.get(memo_key)
        if known is not None and known[0] == code:
            return known[1]
        caps = backend.capabilities if backend is not None else Capabilities()
        profile = {**caps.profile, "assembly": self.assembly, "slot_pinning": "on" if self.pin_slots else "off"}
        if backend is not None:  # what sources defuse follows the model's control tokens
            profile["control_tokens"] = backend.control_tokens.digest
        built = build_driver(self.recipe, profile)
        if len(self._drivers) >= 64:
            self._drivers.clear()
        self._drivers[memo_key] = (code, built)
        return built

    def route(self, persona: str) -> Sequence[tuple[str | None, str | None]]:
        """Where a turn of `persona` may run, in order: (pool member, `home`|`fallback`) for a pool, else the one
        backend, (None, None)."""
        if self.pool is None:
            return [(None, None)]
        return self.pool.routes(persona, self._placement_digest(self.persona(persona)))

    def _placement_digest(self, persona: Persona) -> str:
        """The persona's adapter-set digest for placement (of what it declares, when the registry cannot resolve it:
        the turn then fails with the registry's own message)."""
        voice, skills = persona.adapter_refs
        try:
            return resolve_set(voice, skills, self.adapters, None).digest
        except AdapterError:
            return canonical_json([voice, list(skills)])

    def _inputs(
        self, persona: str, room: str, text: str | None, speaker: str, now: datetime | None, audio: Any = None,
        images: list[Any] | None = None, transcript: str | None = None, context: AgentContext | None = None,
    ) -> dict[str, Any]:
        """The DAG inputs of one turn (the room as it is now, or the caller's conversation)."""
        self.cache.begin_turn()
        room_state = self.store.room(room)
        if context is not None:  # the caller keeps the history; who is in the room still comes from the store
            room_state = dataclasses.replace(
                room_state, messages=[], last_turn=context.turn - 1, compaction_epoch=context.compaction_epoch,
                history_tail_msg_ids=context.history_digest, history_start=0,
            )
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
            "instructions": context.instructions if context is not None else None,
            "agent_history": context.history if context is not None else None,
            "agent_tools": (context.tools or None) if context is not None else None,
            "agent_tool_choice": context.tool_choice if context is not None else None,
        }

    def preview(
        self, *, persona: str, room: str = "default", text: str | None, speaker: str = "user",
        now: datetime | None = None, context: AgentContext | None = None,
    ) -> Prompt:
        """The prompt this turn would send, assembled without calling (or starting) the model server."""
        inputs = self._inputs(persona, room, text, speaker, now, context=context)
        backend = self._backend  # once connected, what is defused follows the model's own control tokens
        with control_tokens_for(backend.control_tokens) if backend is not None else nullcontext():
            return self.driver(connect=False).execute(["prompt"], inputs=inputs)["prompt"]  # type: ignore[no-any-return]

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
        context: AgentContext | None = None,
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

        With `context` (an `AgentContext`: LiveKit Agents' chat context), the history and the agent's instructions
        come from it, its tools are offered to the model, and nothing is committed to the store; such a turn may
        go on after tool results with nothing new said (`text=None`).
        """
        if text is None and audio is None and not images and context is None:
            raise ValueError("a turn needs text=, audio= or images= (what the speaker said or showed)")
        setup_started = time.perf_counter()
        persona_model = self.persona(persona)
        routes = self.route(persona)
        if not routes:
            assert self.pool is not None
            failed = "; ".join(f"{m}: {why}" for m, why in self.pool.down().items())
            raise TurnError(f"turn in room {room!r} failed; history unchanged: every member of pool "
                            f"{self.pool.name!r} failed recently ({failed})")
        for attempt, (member, placement) in enumerate(routes):
            last = attempt == len(routes) - 1
            try:
                backend = self.pool.connect(member) if self.pool is not None and member else self.backend
                dr = self._driver_for(backend)
            except (BackendError, ServerError) as exc:  # an unreachable server fails the turn like any other failure
                self._drop_backend(member, exc)
                if last:
                    raise TurnError(f"turn in room {room!r} failed; history unchanged: {exc}") from exc
                continue
            emitted: list[bool] = []
            try:
                result = self._turn_on(
                    backend, dr, persona, persona_model, room, text, audio, images, transcript, speaker, out,
                    _noting(audio_sink, emitted), _noting(on_text, emitted), now, cancel, setup_started, context,
                )
            except _MemberFailed as failure:
                self._drop_backend(member, failure.error)
                if last or emitted:  # what was already heard cannot be taken back: no second try
                    raise TurnError(f"turn {failure.turn} in room {room!r} failed; history unchanged: "
                                    f"{failure.error}") from failure.error
                continue
            if self.pool is not None:
                result.report["llm"]["pool"] = self.pool.name
                result.report["route"]["placement"] = placement
            return result
        raise AssertionError("unreachable: the last route returns or raises")

    def _turn_on(
        self, backend: Backend, dr: Any, persona: str, persona_model: Persona, room: str, text: str | None,
        audio: Any, images: list[Any] | None, transcript: str | None, speaker: str, out: str | Path | None,
        audio_sink: Callable[[Audio], None] | None, on_text: Callable[[str], None] | None, now: datetime | None,
        cancel: threading.Event | None, setup_started: float, context: AgentContext | None = None,
    ) -> TurnResult:
        """One attempt of a turn on one backend; a failure of the backend itself raises `_MemberFailed`."""
        started = time.perf_counter()
        setup_ms = (started - setup_started) * 1000
        sink, wav = _audio_sink(out, audio_sink)
        resources = ExitStack()
        inputs = {
            **self._inputs(persona, room, text, speaker, now, audio, images, transcript, context),
            "backend": backend,
            "on_text": on_text,
            "audio_sink": sink,
            "turn_started": started,
            "turn_resources": resources,
            "cancel": cancel,
        }
        turn_no = inputs["turn"]
        timings, token = collect_node_timings()
        inputs_ms = (time.perf_counter() - started) * 1000  # reading the room: before the plan's first node
        with resources:  # the slot and the adapter lease: let go once the turn is committed, or as a failure ends it
            try:
                with control_tokens_for(backend.control_tokens):
                    outputs = dr.execute(
                        ["turn_report", "prompt", "reply", "speech", "user_content", "slot_claim", "history_stt"],
                        inputs=inputs,
                    )
            except (AudioError, ImageError):
                raise
            except BackendError as exc:
                raise _MemberFailed(turn_no, exc) from exc
            except (TierViolationError, AdapterError) as exc:
                raise TurnError(f"turn {turn_no} in room {room!r} failed; history unchanged: {exc}") from exc
            except Exception as exc:  # a user's source raised, or a node failed: the turn fails, the room stays intact
                raise TurnError(
                    f"turn {turn_no} in room {room!r} failed; history unchanged: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                stop_collecting(token)
                if wav is not None:
                    wav.close()
            report, prompt, reply = outputs["turn_report"], outputs["prompt"], outputs["reply"]
            if context is None:  # else the caller keeps the conversation: nothing to commit
                with control_tokens_for(backend.control_tokens):  # nothing enters the history with a live control token
                    speaker_who = Participant(speaker, "person", neutralise_control_tokens(speaker))
                    said = neutralise_control_tokens(outputs["user_content"].transcript or text or "")
                    replied = neutralise_control_tokens(reply.text)
                persona_who = Participant(persona, "persona", persona_model.name)
                report["turn"] = self.store.commit_turn(  # the slot is let go in the same transaction
                    room, turn_no, speaker_who, prompt.user_message["content"], said, persona_who, replied,
                    release=outputs["slot_claim"], present=[p.participant for p in inputs["room_state"].participants],
                    preface=prompt.preface,
                )
        if context is None:
            self._compact_if_over_budget(room, prompt, report["llm"]["prompt_tokens"])
        history_stt = outputs["history_stt"]
        history_stt_ms = 0.0
        if history_stt is not None and history_stt.count:  # past audio put into words: STT time, not turnflow's
            timings["history_stt"] = history_stt_ms = history_stt.ms
            report["invocations"]["stt"] += history_stt.count
        self._finish_report(report, reply, outputs["speech"], timings, started, setup_ms, persona, room, turn_no,
                            history_stt_ms, inputs_ms)
        return TurnResult(reply=reply.text, report=report, prompt=prompt, llm=reply, audio=outputs["speech"].audio)

    def _finish_report(
        self, report: dict[str, Any], reply: ChatReply, speech: Any, timings: dict[str, float], started: float,
        setup_ms: float, persona: str, room: str, turn_no: int, history_stt_ms: float = 0.0, inputs_ms: float = 0.0,
    ) -> None:
        """Warn about tier violations, and add the turn's timings and LiveKit-named metrics to its report."""
        for violation in report["tier_violations"]:
            self._warn(f"turnflow: tier violation in {persona}/{room} turn {turn_no}: {violation['message']}")
        # the model stream is read (and spoken) inside `speech`; STT runs in `transcript`: not turnflow's own work
        page_ms = report["adapters"]["page_ms"]  # a page-in restarts the model server: not turnflow's own work
        kv = report["kv"]  # nor is KV paging: the server writes and reads the slot's KV files
        paged = kv["restore_ms"] is not None or kv["saved_bytes"] or kv["paged_out"]
        kv_page_ms = round(timings.get("kv", 0.0), 2) if paged else 0.0
        external = ("speech", "transcript", "voice_fingerprint")
        external_ms = sum(timings.get(name, 0.0) for name in external) + history_stt_ms + page_ms + kv_page_ms
        total_ms = (time.perf_counter() - started) * 1000
        # the part of it before the model request (sent by `speech`): reading the room and the nodes before `speech`,
        # less what they spent on page-ins, KV paging and history STT (inside `conversation_history`; the
        # `history_stt` entry then holds that STT time, not the node's)
        before_model_ms = inputs_ms - page_ms - kv_page_ms - history_stt_ms
        for name, ms in timings.items():
            if name == "speech":
                break
            if name not in external and not (name == "history_stt" and history_stt_ms):
                before_model_ms += ms
        report["timings_ms"] = {
            "total": round(total_ms, 2),
            "first_audio": report["speech"]["first_audio_ms"],
            "model": round(reply.total_ms, 2),
            "stt": round(timings.get("transcript", 0.0) + history_stt_ms, 2),
            "adapter_page": page_ms,
            "kv_page": kv_page_ms,
            "speech": round(timings.get("speech", 0.0) + timings.get("voice_fingerprint", 0.0), 2),
            "turnflow": round(total_ms - external_ms, 2),
            "turnflow_before_model": round(max(0.0, before_model_ms), 3),
            "setup": round(setup_ms, 2),
            "nodes": dict(zip(timings, map(round, timings.values(), repeat(3)), strict=True)),
        }
        report["metrics"] = {  # LiveKit Agents' names, in seconds
            "ttft": _seconds(reply.ttft_ms),
            "tts_ttfb": _seconds(speech.tts_ttfb_ms),
            "e2e_latency": _seconds(speech.first_audio_ms),
        }
        if reply.tool_calls:
            report["llm"]["tool_calls"] = [dataclasses.asdict(call) for call in reply.tool_calls]


class _MemberFailed(Exception):
    """The backend failed during a turn (nothing committed): a pool tries the next member."""

    def __init__(self, turn: int, error: Exception):
        super().__init__(str(error))
        self.turn, self.error = turn, error


def _noting(fn: Callable[[Any], None] | None, emitted: list[bool]) -> Callable[[Any], None] | None:
    """`fn`, noting in `emitted` that something reached the caller (then a failed turn is not tried again)."""
    if fn is None:
        return None
    callback = fn

    def noted(value: Any) -> None:
        if not emitted:
            emitted.append(True)
        callback(value)

    return noted


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
