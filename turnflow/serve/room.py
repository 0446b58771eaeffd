"""The room agent: the personas of one session in one LiveKit room, each with its own voice; one listens."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import rtc

from turnflow.nodes.media import VAD_RATE, Audio, AudioError
from turnflow.nodes.publish import LiveKitPublisher, participant_token
from turnflow.nodes.speech import words_heard
from turnflow.nodes.text import neutralise_control_tokens
from turnflow.serve.credentials import LiveKitCredentials, RoomConnectError, persona_identity
from turnflow.serve.endofturn import EndOfTurnDetector
from turnflow.serve.routing import choose_persona

if TYPE_CHECKING:
    from turnflow.session import Session, TurnResult


def audio_from_frame(frame: rtc.AudioFrame) -> Audio:
    """A received ``rtc.AudioFrame`` (interleaved PCM16) as mono :class:`Audio`."""
    pcm = np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32768.0
    if frame.num_channels > 1:
        pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.float32)
    return Audio(pcm, frame.sample_rate)


class _Voice:
    """One persona's publisher, fed in order from a queue that the turn's worker thread fills."""

    def __init__(self, persona_id: str, publisher: LiveKitPublisher, log: Callable[[str], None]) -> None:
        self.persona_id = persona_id
        self.publisher = publisher
        self.replying = False  # a turn for this persona is running
        self.generation = 0  # bumped on barge-in: audio of older generations is dropped
        self.first_audio_at: float | None = None
        self.cut_heard: str | None = None  # what was heard of a reply cut while its turn still ran
        self.cancel = threading.Event()  # set on barge-in: the turn stops the model stream and the TTS
        self._captioned: list[tuple[float, str]] = []  # the current reply's audio: (seconds, words) per chunk
        self._reply_started_s = 0.0  # the publisher's captured seconds when the current reply began
        self._log = log
        self._queue: asyncio.Queue[tuple[int, Audio | None]] = asyncio.Queue()
        self._pushing = False
        self._pump = asyncio.get_running_loop().create_task(self._run(), name=f"turnflow-voice-{persona_id}")

    @property
    def playing(self) -> bool:
        """Whether a reply is being made, queued or played out."""
        source_queued = self.publisher.source.queued_duration > 0
        return self.replying or self._pushing or not self._queue.empty() or source_queued

    def begin_reply(self, loop: asyncio.AbstractEventLoop) -> tuple[int, Callable[[Audio], None]]:
        """A new reply: its generation and the sink the worker thread hands audio chunks to."""
        generation = self.generation
        self.replying = True
        self.cancel = threading.Event()
        self.first_audio_at = None
        self.cut_heard = None
        self._captioned = []
        self._reply_started_s = self.publisher.seconds_captured
        captioned = self._captioned

        def sink(chunk: Audio) -> None:
            if self.first_audio_at is None:
                self.first_audio_at = time.perf_counter()
            captioned.append((chunk.duration_s, chunk.caption))
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are shutting down
                loop.call_soon_threadsafe(self._queue.put_nowait, (generation, chunk))

        return generation, sink

    async def sent(self) -> None:
        """Wait until every chunk queued so far has been handed to the audio source (or dropped)."""
        await self._queue.join()

    def end_reply(self, generation: int) -> None:
        """The reply is complete: what is held back gets flushed after the last chunk."""
        self.replying = False
        self._queue.put_nowait((generation, None))

    def cut(self) -> str:
        """Barge-in: stop the reply; returns the words of it the room heard before the cut."""
        played_s = self.publisher.seconds_played - self._reply_started_s
        heard = words_heard(list(self._captioned), max(0.0, played_s))
        self.interrupt()
        return heard

    def interrupt(self) -> None:
        """Stop the reply being made, and drop its queued and unplayed audio."""
        self.cancel.set()
        self.generation += 1
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        self.publisher.interrupt()

    async def aclose(self) -> None:
        """Stop pumping, leave the room and release the audio source."""
        self.interrupt()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        await self.publisher.aclose()

    async def _run(self) -> None:
        while True:
            generation, chunk = await self._queue.get()
            if generation != self.generation:
                self._queue.task_done()
                continue
            self._pushing = True
            try:
                if chunk is None:
                    await self.publisher.flush()
                else:
                    await self.publisher.push(chunk)
            except Exception as error:  # one bad chunk must not silence the persona for good
                self._log(f"{self.persona_id}: could not publish reply audio: {type(error).__name__}: {error}")
            finally:
                self._pushing = False
                self._queue.task_done()


class RoomAgent:
    """The personas of one session in one LiveKit room: each speaks with its own track; the first one listens.

    Turns run one at a time (a room has one history), each in
    a worker thread; reply audio reaches the chosen persona's track as soon as it exists. On a backend
    that hears natively no STT runs, so no persona can be named and the turn goes to the last persona
    addressed (else ``routing.default``, else the first persona). On a text-only backend the utterance
    is transcribed once, before the turn, to find who was named; the turn reuses that transcript.
    """

    def __init__(
        self,
        session: Session,
        room: str,
        personas: Sequence[str],
        *,
        credentials: LiveKitCredentials | None = None,
        min_interruption_ms: int = 300,
        log: Callable[[str], None] | None = None,
        frame_tap: Callable[[str, rtc.AudioFrame], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
    ) -> None:
        persona_ids = list(personas)
        if not persona_ids:
            raise ValueError("RoomAgent needs at least one persona")
        if len(set(persona_ids)) != len(persona_ids):
            raise ValueError(f"personas must be distinct, got {persona_ids}")
        if not room:
            raise ValueError("RoomAgent needs a room name")
        routing = session.recipe.routing
        if routing.default is not None and routing.default not in persona_ids:
            raise ValueError(
                f"the recipe's routing.default {routing.default!r} is not among the personas served "
                f"({', '.join(persona_ids)}); add it to --personas or change the recipe"
            )
        self.session = session
        self.room = room
        self.persona_ids = persona_ids
        self.credentials = credentials
        self.min_interruption_ms = min_interruption_ms
        self.last_addressed: str | None = None
        self.display_names: dict[str, str] = {}
        self.turns_run = 0
        self._routing_default: str | None = routing.default
        self._log = log or _log_to_stderr
        self._frame_tap = frame_tap
        self._on_disconnected = on_disconnected
        self._voices: dict[str, _Voice] = {}
        self._listeners: dict[str, asyncio.Task[None]] = {}
        self._turns: set[asyncio.Task[Any]] = set()
        self._turn_lock = asyncio.Lock()
        self._closed = False

    @property
    def identities(self) -> list[str]:
        """The participant identities the personas join as."""
        return [persona_identity(persona_id) for persona_id in self.persona_ids]

    async def start(self, *, connect: bool = True, listen_on: rtc.Room | None = None) -> None:
        """Get the backend ready, open each persona's voice, and (with ``connect``) join the room and listen.

        ``listen_on`` is a connection to the room made elsewhere (a LiveKit Agents job's own) that listens in place
        of the first persona's; the personas then only speak.
        """
        await asyncio.to_thread(self._prepare)
        for persona_id in self.persona_ids:
            tap = self._tap_for(persona_id)
            publisher = LiveKitPublisher(f"{persona_id}-voice", frame_tap=tap)
            self._voices[persona_id] = _Voice(persona_id, publisher, self._log)
        if not connect:
            return
        if self.credentials is None:
            raise ValueError("RoomAgent.start(connect=True) needs credentials (LiveKitCredentials.from_env())")
        for index, persona_id in enumerate(self.persona_ids):
            listens = index == 0 and listen_on is None
            token = participant_token(
                persona_identity(persona_id),
                self.room,
                api_key=self.credentials.api_key,
                api_secret=self.credentials.api_secret,
                can_subscribe=listens,  # least grants: only the listening connection subscribes
            )
            publisher = self._voices[persona_id].publisher
            try:
                connected = await publisher.connect(self.credentials.url, token)
            except rtc.ConnectError as error:
                raise RoomConnectError(
                    f"could not join room {self.room!r} at {self.credentials.url} as "
                    f"{persona_identity(persona_id)}: {error}"
                ) from error
            await publisher.publish()
            if listens:
                self._listen_to(connected)
        if listen_on is not None:
            self._listen_to(listen_on)

    async def handle_utterance(
        self, speaker: str, utterance: Audio, *, display_name: str | None = None
    ) -> TurnResult | None:
        """Run the turn for what ``speaker`` just said and publish the reply; returns the TurnResult (or None)."""
        async with self._turn_lock:
            if self._closed:
                return None
            heard_at = time.perf_counter()
            try:
                persona_id, transcript = await asyncio.to_thread(self._route, speaker, utterance, display_name)
            except AudioError as error:
                self._log(f"{speaker}: utterance ignored: {error}")
                return None
            except Exception as error:  # the STT bridge failed: this utterance is lost, the room goes on
                self._log(f"{speaker}: utterance not understood: {type(error).__name__}: {error}")
                return None
            voice = self._voices[persona_id]
            generation, sink = voice.begin_reply(asyncio.get_running_loop())
            try:
                result = await asyncio.to_thread(
                    self.session.turn, persona=persona_id, room=self.room, audio=utterance, speaker=speaker,
                    transcript=transcript, audio_sink=sink, cancel=voice.cancel,
                )
            except AudioError as error:
                voice.interrupt()
                self._log(f"{speaker} -> {persona_id}: audio refused, history unchanged: {error}")
                return None
            except Exception as error:  # a TurnError says the history is unchanged; the room goes on
                voice.interrupt()
                self._log(f"{speaker} -> {persona_id}: {type(error).__name__}: {error}")
                return None
            finally:
                voice.end_reply(generation)
            if voice.cut_heard is not None:  # cut while the turn ran: the reply is committed now, mark it
                self._note_interruption(persona_id, voice.cut_heard)
                voice.cut_heard = None
            self.last_addressed = persona_id
            self.turns_run += 1
            after_speech_ms = None if voice.first_audio_at is None else (voice.first_audio_at - heard_at) * 1000
            self._log(turn_line(result.report, speaker, transcript, after_speech_ms, voice.generation != generation))
            return result

    async def replies_sent(self) -> None:
        """Wait until the reply audio produced so far has been handed to the personas' audio sources."""
        for voice in list(self._voices.values()):
            await voice.sent()

    def publisher(self, persona_id: str) -> LiveKitPublisher:
        """The persona's publisher (its ``rtc.AudioSource`` and microphone track)."""
        return self._voices[persona_id].publisher

    def barge_in(self, speaker: str) -> list[str]:
        """``speaker`` started talking: cut every persona's reply that is being made or played; returns whose."""
        cut = [persona_id for persona_id, voice in self._voices.items() if voice.playing]
        for persona_id in cut:
            voice = self._voices[persona_id]
            heard = voice.cut()
            if voice.replying:  # its turn is still running: the note follows the reply once committed
                voice.cut_heard = heard
            else:
                self._note_interruption(persona_id, heard)
        if cut:
            self._log(f"{speaker} barged in: cut {', '.join(cut)}")
        return cut

    def _note_interruption(self, persona_id: str, heard: str) -> None:
        """Mark the persona's reply in the room's history as cut after the words the room heard."""
        try:
            note = self.session.mark_interrupted(self.room, persona_id, heard)
        except Exception as error:  # the history could not be written: the room goes on, the cut still happened
            self._log(f"{persona_id}: could not note the interruption: {type(error).__name__}: {error}")
            return
        if note:
            self._log(f"{persona_id}: {note}")

    async def listen(self, speaker: str, frames: Any, *, display_name: str | None = None) -> None:
        """Follow one person's audio (an async iterator of ``rtc.AudioFrameEvent``) until it ends."""
        detector = self._detector()
        gap_s = detector.end_of_turn_silence_ms / 1000 / 2
        interrupted = False
        iterator = frames.__aiter__()
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=gap_s)
                if done:
                    finished, pending = pending, None
                    try:
                        chunk = audio_from_frame(finished.result().frame)
                    except StopAsyncIteration:
                        break
                elif detector.speaking:
                    # A track that stops sending frames has stopped talking: count the gap as silence.
                    chunk = Audio(np.zeros(round(gap_s * VAD_RATE), np.float32), VAD_RATE)
                else:
                    continue
                for utterance in detector.push(chunk):
                    self._spawn(self.handle_utterance(speaker, utterance, display_name=display_name))
                if not detector.speaking:
                    interrupted = False
                elif not interrupted and detector.speech_ms >= self.min_interruption_ms:
                    interrupted = True
                    self.barge_in(speaker)
        finally:
            if pending is not None:
                pending.cancel()

    async def aclose(self, *, turn_timeout_s: float = 10.0) -> None:
        """Stop listening, let a running turn finish (its audio dropped), close the voices and leave the room."""
        self._closed = True
        for task in self._listeners.values():
            task.cancel()
        for voice in self._voices.values():
            voice.interrupt()
        if self._turns:
            await asyncio.wait(self._turns, timeout=turn_timeout_s)
        for task in [*self._listeners.values(), *self._turns]:
            task.cancel()
        await asyncio.gather(*self._listeners.values(), *self._turns, return_exceptions=True)
        self._listeners.clear()
        for voice in self._voices.values():
            await voice.aclose()
        self._voices.clear()

    # -- inside

    def _prepare(self) -> None:
        """Load the personas, seat them in the room, and learn whether the backend hears (worker thread)."""
        for persona_id in self.persona_ids:
            name = self.session.persona(persona_id).name
            self.display_names[persona_id] = name
            self.session.join(self.room, persona_id, kind="persona", display_name=name)
        capabilities = self.session.backend.capabilities
        self._log(
            f"backend {self.session.backend_name}: "
            + ("hears natively (no STT; routing falls to the last persona addressed)"
               if capabilities.audio_in else "text-only (STT bridge; a persona named in the utterance answers)")
        )

    def _route(self, speaker: str, utterance: Audio, display_name: str | None) -> tuple[str, str | None]:
        """Seat the speaker, transcribe once when the backend cannot hear, and choose who answers (worker thread)."""
        from turnflow.dataflows.voice import media

        if display_name:
            self.session.join(self.room, speaker, display_name=neutralise_control_tokens(display_name))
        transcript: str | None = None
        if not self.session.backend.capabilities.audio_in:
            heard = media(utterance, self.session.recipe)  # exactly what the turn's STT node would receive
            if heard is not None:
                transcript = self.session.bridges.stt.transcribe(heard)  # once: the turn is given it
        chosen = choose_persona(transcript, self.display_names, self.last_addressed, self._routing_default)
        return chosen, transcript

    def _detector(self) -> EndOfTurnDetector:
        recipe = self.session.recipe
        return EndOfTurnDetector(
            recipe.routing.end_of_turn_silence_ms, max_utterance_s=recipe.media.max_audio_s
        )

    def _tap_for(self, persona_id: str) -> Callable[[rtc.AudioFrame], None] | None:
        tap = self._frame_tap
        if tap is None:
            return None
        return lambda frame: tap(persona_id, frame)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)

    def _listen_to(self, room: rtc.Room) -> None:
        """Follow every person's audio track in ``room``: those there now and those still to come."""
        ours = set(self.identities)

        def subscribed(track: rtc.Track, publication: rtc.RemoteTrackPublication,
                       participant: rtc.RemoteParticipant) -> None:
            if track.kind != rtc.TrackKind.KIND_AUDIO or participant.identity in ours or self._closed:
                return
            if publication.sid in self._listeners:
                return
            stream = rtc.AudioStream.from_track(track=track, sample_rate=VAD_RATE, num_channels=1)
            self._log(f"listening to {participant.identity} ({publication.name or publication.sid})")
            task = asyncio.get_running_loop().create_task(
                self._follow(participant.identity, participant.name or None, stream)
            )
            self._listeners[publication.sid] = task

        def unsubscribed(track: rtc.Track, publication: rtc.RemoteTrackPublication,
                         participant: rtc.RemoteParticipant) -> None:
            task = self._listeners.pop(publication.sid, None)
            if task is not None:
                task.cancel()

        room.on("track_subscribed", subscribed)
        room.on("track_unsubscribed", unsubscribed)
        if self._on_disconnected is not None:
            on_disconnected = self._on_disconnected
            room.on("disconnected", lambda *_: on_disconnected())
        # Tracks subscribed while connecting fired before the handler existed: pick them up now.
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.subscribed:
                    subscribed(publication.track, publication, participant)

    async def _follow(self, speaker: str, display_name: str | None, stream: rtc.AudioStream) -> None:
        try:
            await self.listen(speaker, stream, display_name=display_name)
        finally:
            await stream.aclose()


def turn_line(
    report: dict[str, Any], speaker: str, transcript: str | None, after_speech_ms: float | None, interrupted: bool
) -> str:
    """One log line per turn: who answered whom, the routes, first audio, tokens processed and cached."""
    route = report.get("route", {})
    llm = report.get("llm", {})
    first = report.get("timings_ms", {}).get("first_audio")
    heard = f' "{transcript}"' if transcript is not None else ""
    parts = [
        f"turn {report.get('turn')} {speaker} -> {report.get('persona')}",
        f"audio in {route.get('audio_in')}{heard}, out {route.get('audio_out')}",
        "first audio " + (f"{first:.0f} ms" if first is not None else "none")
        + (f" ({after_speech_ms:.0f} ms after end of speech)" if after_speech_ms is not None else ""),
        f"tokens processed {llm.get('prompt_tokens_processed')}, cached {llm.get('prompt_tokens_cached')}",
    ]
    return " | ".join(parts) + (" | interrupted" if interrupted else "")


def _log_to_stderr(message: str) -> None:
    print(f"turnflow serve: {message}", file=sys.stderr, flush=True)
