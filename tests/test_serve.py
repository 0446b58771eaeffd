"""`turnflow serve` without a LiveKit server: end of turn on real espeak-ng speech, who answers, and reply
audio from a turn into real ``rtc.AudioSource`` objects (barge-in included).

The room itself is in ``test_serve_room.py`` (it needs a LiveKit server).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import RECIPE, copy_recipe_folder
from livekit import rtc

from turnflow.backend import Capabilities
from turnflow.cli import main
from turnflow.dataflows.voice import media
from turnflow.nodes.media import Audio, trim_silence
from turnflow.nodes.speech import EspeakTts, PocketsphinxStt, TtsVoice
from turnflow.nodes.streaming import words_heard
from turnflow.serve import EndOfTurnDetector, LiveKitCredentials, RoomAgent, choose_persona
from turnflow.session import Session
from turnflow.store import Participant

TTS = EspeakTts()


def spoken(text: str, voice: str = "en-us") -> Audio:
    """``text`` said by espeak-ng (22050 Hz)."""
    return TTS.synthesize(text, TtsVoice(voice))


def silence(seconds: float, rate: int) -> np.ndarray:
    """Digital silence."""
    return np.zeros(round(seconds * rate), np.float32)


def chunked(samples: np.ndarray, rate: int, chunk_ms: int) -> list[Audio]:
    """A stream as a microphone delivers it: ``chunk_ms`` at a time."""
    size = rate * chunk_ms // 1000
    return [Audio(np.ascontiguousarray(samples[i : i + size]), rate) for i in range(0, len(samples), size)]


def frame_events(audio: Audio, frame_ms: int = 20) -> list[rtc.AudioFrameEvent]:
    """``audio`` as the ``rtc.AudioFrameEvent`` items an ``rtc.AudioStream`` yields."""
    pcm = (audio.samples * 32767).astype(np.int16)
    size = audio.sample_rate * frame_ms // 1000
    return [
        rtc.AudioFrameEvent(rtc.AudioFrame(pcm[i : i + size].tobytes(), audio.sample_rate, 1, size))
        for i in range(0, len(pcm) - size + 1, size)
    ]


# --- EndOfTurnDetector on real speech ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sentences() -> tuple[Audio, Audio]:
    """Two different utterances from espeak-ng."""
    first = spoken("Hey Maya, what is on the board today?")
    return first, spoken("Helper, convert ten miles to kilometres.", "en-us+f3")


def test_two_utterances_a_second_apart_are_two_turns(two_sentences: tuple[Audio, Audio]) -> None:
    first, second = two_sentences
    rate = first.sample_rate
    stream = np.concatenate([silence(0.5, rate), first.samples, silence(1.0, rate), second.samples, silence(1.0, rate)])
    detector = EndOfTurnDetector(700)
    utterances: list[Audio] = []
    speaking_seen = False
    for chunk in chunked(stream, rate, 20):
        utterances += detector.push(chunk)
        speaking_seen |= detector.speaking
    assert speaking_seen and not detector.speaking
    assert len(utterances) == 2
    for utterance, said in zip(utterances, two_sentences, strict=True):
        speech_s = trim_silence(said, pad_ms=0).duration_s
        assert utterance.sample_rate == rate
        # the speech, plus 200 ms of padding on each side and a frame or two of VAD hangover
        assert speech_s - 0.1 <= utterance.duration_s <= speech_s + 0.6
        assert np.max(np.abs(utterance.samples)) > 0.1


def test_a_short_pause_does_not_end_the_turn(two_sentences: tuple[Audio, Audio]) -> None:
    first, second = two_sentences
    rate = first.sample_rate
    stream = np.concatenate([silence(0.3, rate), first.samples, silence(0.3, rate), second.samples, silence(1.0, rate)])
    detector = EndOfTurnDetector(700)
    utterances = [u for chunk in chunked(stream, rate, 30) for u in detector.push(chunk)]
    assert len(utterances) == 1
    assert utterances[0].duration_s > first.duration_s + second.duration_s - 0.6


def test_chunk_size_and_rate_do_not_change_what_is_heard(two_sentences: tuple[Audio, Audio]) -> None:
    first, _ = two_sentences
    at_48k = first.resampled(48000)
    stream = np.concatenate([silence(0.4, 48000), at_48k.samples, silence(0.9, 48000)])
    durations = []
    for chunk_ms in (10, 50, 1000):
        detector = EndOfTurnDetector(700)
        utterances = [u for chunk in chunked(stream, 48000, chunk_ms) for u in detector.push(chunk)]
        assert [u.sample_rate for u in utterances] == [48000]
        durations.append(utterances[0].duration_s)
    assert max(durations) - min(durations) < 0.07


@pytest.mark.parametrize("level", [0.0, 0.0005, 0.003, 0.01])
def test_silence_and_quiet_noise_are_no_turn(level: float) -> None:
    noise = np.random.default_rng(7).normal(0.0, level, 48000 * 4).astype(np.float32)
    detector = EndOfTurnDetector(700)
    utterances = [u for chunk in chunked(noise, 48000, 10) for u in detector.push(chunk)]
    assert utterances == [] and detector.flush() is None and not detector.speaking


def test_detector_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="frame_ms must be 10, 20 or 30"):
        EndOfTurnDetector(frame_ms=25)
    with pytest.raises(ValueError, match="at least one frame"):
        EndOfTurnDetector(5)


# --- choose_persona ---------------------------------------------------------------------------------

PERSONAS = {"maya": "Maya", "helper": "Sam", "codereview": "Code Review"}


@pytest.mark.parametrize(
    ("transcript", "last", "default", "expected"),
    [
        ("hey maya what's on the board", None, None, "maya"),  # by name
        ("Sam, what time is it in Berlin?", "maya", None, "helper"),  # by name, not id
        ("helper can you convert that", "maya", None, "helper"),  # by id
        ("could code review take a look", None, None, "codereview"),  # a two-word name
        ("...MAYA?!", "helper", None, "maya"),  # punctuation and case
        ("Maya's board looks full", "helper", None, "maya"),  # possessive
        ("Sam, ask Maya about it", None, None, "helper"),  # two named: the first wins
        ("the mayan calendar and samples", "codereview", None, "codereview"),  # not whole words
        ("nobody named here", "codereview", "maya", "codereview"),  # last addressed
        ("nobody named here", None, "helper", "helper"),  # default
        ("nobody named here", None, None, "maya"),  # first persona
        (None, "helper", "maya", "helper"),  # heard natively: no transcript, falls to the last addressed
        (None, None, "codereview", "codereview"),
        ("", None, None, "maya"),
    ],
)
def test_choose_persona(transcript: str | None, last: str | None, default: str | None, expected: str) -> None:
    assert choose_persona(transcript, PERSONAS, last, default) == expected


def test_choose_persona_refuses_unknown_personas() -> None:
    with pytest.raises(ValueError, match="default 'zed' is not one of the personas"):
        choose_persona("hi", PERSONAS, None, "zed")
    with pytest.raises(ValueError, match="at least one persona"):
        choose_persona("hi", {}, None, None)


# --- a turn's reply into real rtc.AudioSource objects ------------------------------------------------


class ScriptedSession(Session):
    """A real Session (recipe, personas, SQLite room state, speech bridges) whose turn is scripted.

    A real turn needs the model server (about 20 s for a first turn on the tiny model), so ``turn``
    is replaced by a hand-written fake that behaves like the DAG where serve relies on it: on a
    text-only backend it uses the transcript it is given, else asks ``self.bridges.stt``, and it
    speaks its scripted reply sentence by sentence with real espeak-ng, handing each chunk to
    ``audio_sink`` from the worker thread. The real thing runs in ``test_serve_room.py``.
    """

    def __init__(self, *args: Any, hears: bool, replies: list[list[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fake_backend = SimpleNamespace(capabilities=Capabilities(audio_in=hears), close=lambda: None)
        self.replies = replies
        self.sentence_gap_s = 0.0
        self.turns: list[dict[str, Any]] = []
        self.turns_cancelled: list[int | None] = []  # the sentence a turn stopped at when cut
        self.reply_audio: list[Audio] = []

    @property  # type: ignore[override]
    def backend(self) -> Any:
        """The stub backend: it only says whether it hears."""
        return self.fake_backend

    def turn(self, *, persona: str, room: str = "default", audio: Any = None, speaker: str = "user",
             audio_sink: Any = None, transcript: str | None = None, cancel: Any = None, **_: Any) -> Any:
        """Say the next scripted reply."""
        assert threading.current_thread() is not threading.main_thread()
        if self.fake_backend.capabilities.audio_in:
            transcript = None
        elif transcript is None:  # like the DAG's STT node: transcribe only when not given a transcript
            transcript = self.bridges.stt.transcribe(media(audio, self.recipe))
        chunks = []
        self.cancelled_after: int | None = None
        for n, sentence in enumerate(self.replies[len(self.turns)]):
            if cancel is not None and cancel.is_set():  # like the DAG: a cut reply makes no more speech
                self.cancelled_after = n
                break
            chunk = replace(TTS.synthesize(sentence, TtsVoice("en-us")), caption=sentence)  # as SpokenReply does
            chunks.append(chunk)
            audio_sink(chunk)
            time.sleep(self.sentence_gap_s)  # the model writing the next sentence
        number = len(self.turns) + 1
        said = transcript or "(audio)"
        written = " ".join(self.replies[number - 1][: len(chunks)])  # what was written before any cut
        self.store.commit_turn(  # the turn's atomic commit, as the real one makes it
            room, number, Participant(speaker, "person", speaker), said, said,
            Participant(persona, "persona", self.persona(persona).name), written,
        )
        report = {
            "persona": persona, "room": room, "turn": number, "transcript": transcript,
            "route": {"audio_in": "native" if transcript is None else "stt", "audio_out": "tts"},
            "llm": {"prompt_tokens_processed": 90, "prompt_tokens_cached": 14000},
            "timings_ms": {"first_audio": 42.0},
        }
        self.turns.append({"persona": persona, "speaker": speaker, "transcript": transcript})
        self.turns_cancelled.append(self.cancelled_after)
        self.reply_audio.append(Audio(np.concatenate([c.samples for c in chunks]), chunks[0].sample_rate))
        return SimpleNamespace(reply=written, report=report, audio=None)


def scripted(tmp_path: Path, *, hears: bool, replies: list[list[str]]) -> ScriptedSession:
    """A scripted session on the example recipe, its state in ``tmp_path``."""
    return ScriptedSession(RECIPE, state_dir=tmp_path, hears=hears, replies=replies)


class Frames:
    """Every rtc.AudioFrame each persona's publisher captured, by persona."""

    def __init__(self) -> None:
        self.by_persona: dict[str, list[rtc.AudioFrame]] = {}

    def __call__(self, persona: str, frame: rtc.AudioFrame) -> None:
        self.by_persona.setdefault(persona, []).append(frame)

    def seconds(self, persona: str) -> float:
        """Audio captured for ``persona``."""
        return sum(frame.duration for frame in self.by_persona.get(persona, []))


def test_reply_audio_reaches_the_chosen_personas_audio_source(tmp_path: Path) -> None:
    session = scripted(tmp_path, hears=True, replies=[["Yes, the build passed.", "Two tickets are open."]])
    frames, lines = Frames(), list[str]()

    async def scenario() -> None:
        agent = RoomAgent(session, "standup", ["maya", "helper"], log=lines.append, frame_tap=frames)
        await agent.start(connect=False)
        try:
            assert isinstance(agent.publisher("maya").source, rtc.AudioSource)
            utterance = spoken("What is the status of the build?")
            result = await agent.handle_utterance("alice", utterance, display_name="Alice")
            assert result is not None
            await agent.replies_sent()
            assert agent.publisher("maya").source.queued_duration > 0  # LiveKit plays it out in real time
        finally:
            await agent.aclose()
            session.close()

    asyncio.run(scenario())
    # heard natively: nobody can be named, so the first persona answers
    assert [turn["persona"] for turn in session.turns] == ["maya"]
    maya = frames.by_persona["maya"]
    assert {(f.sample_rate, f.num_channels, f.samples_per_channel) for f in maya} == {(24000, 1, 480)}
    assert frames.seconds("maya") == pytest.approx(session.reply_audio[0].duration_s, abs=0.03)
    assert "helper" not in frames.by_persona
    assert len(lines) == 2 and "turn 1 alice -> maya | audio in native, out tts" in lines[1]
    assert "tokens processed 90, cached 14000" in lines[1] and "ms after end of speech" in lines[1]


@pytest.fixture
def transcribed(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The length of every utterance the real pocketsphinx bridge transcribes during the test."""
    lengths: list[float] = []
    real_transcribe = PocketsphinxStt.transcribe

    def counting(self: PocketsphinxStt, audio: Audio) -> str:
        lengths.append(audio.duration_s)
        return real_transcribe(self, audio)

    monkeypatch.setattr(PocketsphinxStt, "transcribe", counting)
    return lengths


def test_a_named_persona_answers_through_one_transcription(tmp_path: Path, transcribed: list[float]) -> None:
    session = scripted(tmp_path, hears=False, replies=[["On it."]])
    frames, lines = Frames(), list[str]()

    async def scenario() -> None:
        agent = RoomAgent(session, "standup", ["helper", "maya"], log=lines.append, frame_tap=frames)
        await agent.start(connect=False)
        agent.last_addressed = "helper"
        try:
            await agent.handle_utterance("alice", spoken("Hey Maya, what is on the board today?"))
            await agent.replies_sent()
            assert agent.last_addressed == "maya"
        finally:
            await agent.aclose()
            session.close()

    asyncio.run(scenario())
    assert len(transcribed) == 1  # routing and the turn's STT node share one transcription
    turn = session.turns[0]
    assert turn["persona"] == "maya" and "maya" in turn["transcript"].split()
    assert frames.seconds("maya") > 0.3 and "helper" not in frames.by_persona
    assert f'audio in stt "{turn["transcript"]}"' in lines[-1]


@pytest.mark.server
def test_a_real_turn_is_published_into_the_named_personas_audio_source(
    local_url: str, home: Path, transcribed: list[float]
) -> None:
    """The same path with nothing scripted: a real Session on the embedded `local` backend (text-only)."""
    frames, lines = Frames(), list[str]()

    async def scenario() -> Any:
        session = await asyncio.to_thread(Session, RECIPE, backend="local")
        agent = RoomAgent(session, "serve-real", ["helper", "maya"], log=lines.append, frame_tap=frames)
        try:
            await agent.start(connect=False)
            agent.last_addressed = "helper"
            result = await agent.handle_utterance("alice", spoken("Hey Maya, what is on the board today?"))
            await agent.replies_sent()
            return result
        finally:
            await agent.aclose()
            await asyncio.to_thread(session.close)

    result = asyncio.run(scenario())
    report = result.report
    assert report["persona"] == "maya"
    assert (report["route"]["audio_in"], report["route"]["audio_out"]) == ("stt", "tts")
    assert len(transcribed) == 1 and report["invocations"]["stt"] == 1
    assert "maya" in report["transcript"].split()
    maya = frames.by_persona["maya"]
    assert {(f.sample_rate, f.num_channels, f.samples_per_channel) for f in maya} == {(24000, 1, 480)}
    assert frames.seconds("maya") == pytest.approx(report["speech"]["audio_s"], abs=0.03)
    assert "helper" not in frames.by_persona
    assert f"tokens processed {report['llm']['prompt_tokens_processed']}" in lines[-1]


def test_a_person_talking_over_a_reply_cuts_it(tmp_path: Path) -> None:
    long_reply = [
        "First, the build passed on every platform this morning.",
        "Then, two tickets were closed and one new one was opened.",
        "Finally, the release is still planned for Thursday afternoon.",
    ]
    session = scripted(tmp_path, hears=True, replies=[long_reply, ["Sure."]])
    session.sentence_gap_s = 2.5  # each sentence takes the model a while: bob cuts in while maya is still writing
    frames, lines, rooms = Frames(), list[str](), list[Any]()
    said = spoken("Wait, stop for a moment please.").resampled(16000)
    bob = frame_events(Audio(np.concatenate([said.samples, silence(1.0, 16000)]), 16000))

    async def bob_speaks() -> Any:  # in real time, as a microphone track delivers it
        for event in bob:
            yield event
            await asyncio.sleep(event.frame.duration)

    async def scenario() -> None:
        agent = RoomAgent(session, "standup", ["maya", "helper"], log=lines.append, frame_tap=frames)
        await agent.start(connect=False)
        try:
            replying = asyncio.create_task(agent.handle_utterance("alice", spoken("Maya, give me the status.")))
            while agent.publisher("maya").seconds_played < 1.0:  # a second of maya's reply has gone out
                await asyncio.sleep(0.02)
            await agent.listen("bob", bob_speaks())
            await replying
            async with asyncio.timeout(10):
                while not any(line.startswith("turn 2 ") for line in lines):
                    await asyncio.sleep(0.02)
            await agent.replies_sent()
        finally:
            await agent.aclose()
            rooms.append(session.store.history("standup"))
            session.close()

    asyncio.run(scenario())
    assert "bob barged in: cut maya" in lines
    # the cut stopped the reply being made: no sentence was spoken after it, the last one never was
    assert session.turns_cancelled[0] in (1, 2), session.turns_cancelled  # stopped before the last sentence
    # far less than the reply was sent (up to a second queued ahead of what was played, then cut);
    # bob's own utterance then got its turn, from the last persona addressed
    assert frames.seconds("maya") < 4.0 + session.reply_audio[1].duration_s
    assert [(t["persona"], t["speaker"]) for t in session.turns] == [("maya", "alice"), ("maya", "bob")]
    # the history only grew: the reply as written, then a note quoting the last words the room heard
    history = rooms[0]
    assert [(m.speaker, m.text.split(" ")[0]) for m in history] == [
        ("alice", "(audio)"), ("maya", "First,"), ("maya", "[interrupted"), ("bob", "(audio)"), ("maya", "Sure."),
    ]
    note = history[2].text
    quoted = note.removeprefix("[interrupted after \u201c").removesuffix("\u201d]").lstrip("…")
    assert note.startswith("[interrupted after \u201c") and quoted, note
    assert long_reply[0].startswith(quoted) or f" {quoted}" in long_reply[0]  # cut inside the first sentence
    assert f"maya: {note}" in lines
    # what maya reads at her next turn: her reply, then the note, both as her own words
    seen = [m.as_seen_by("maya") for m in history[1:3]]
    assert [m["role"] for m in seen] == ["assistant", "assistant"] and seen[1]["content"] == note


def test_words_heard_follow_the_audio_played() -> None:
    captioned = [(2.0, "The build passed this morning."), (1.0, "Two tickets are open.")]
    assert words_heard(captioned, 0.0) == ""
    assert words_heard(captioned, 1.0) == "The build"  # half of five words
    assert words_heard(captioned, 2.0) == "The build passed this morning."
    assert words_heard(captioned, 2.5) == "The build passed this morning. Two tickets"
    assert words_heard(captioned, 9.0) == "The build passed this morning. Two tickets are open."
    assert words_heard([(0.5, ""), (1.0, "Native audio words")], 1.0) == "Native"  # half a chunk: 1 of 3 words


def test_routing_default_must_be_served(tmp_path: Path) -> None:
    recipe = copy_recipe_folder(tmp_path)
    recipe.write_text(recipe.read_text() + "routing:\n  default: teacher\n")
    session = Session(recipe, state_dir=tmp_path / "state")
    try:
        with pytest.raises(ValueError, match="routing.default 'teacher' is not among the personas served"):
            RoomAgent(session, "standup", ["maya", "helper"])
    finally:
        session.close()


# --- the command ------------------------------------------------------------------------------------


def test_serve_names_the_missing_livekit_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LIVEKIT_URL", "wss://example.livekit.cloud")
    code = main(["serve", str(RECIPE), "--room", "standup", "--personas", "maya,helper"])
    error = capsys.readouterr().err
    assert code == 2
    assert "LIVEKIT_API_KEY, LIVEKIT_API_SECRET" in error and "LIVEKIT_URL" not in error.split("to join")[0]
    assert "Traceback" not in error


def test_serve_at_an_unreachable_server_says_so_and_exits_cleanly(home: Path) -> None:
    """The room cannot be joined: one line says why, the exit status is 1, and LiveKit's native runtime is shut
    down before the interpreter finalizes (its own `atexit` disposal can abort the process)."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (
        "import sys\n"
        "from turnflow.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "from livekit.rtc._ffi_client import FfiClient\n"
        "print('runtime released:', FfiClient._instance is not None and FfiClient._ffi_disposed)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "TURNFLOW_HOME": str(home), "LIVEKIT_URL": f"ws://127.0.0.1:{port}",
           "LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "a-secret-of-at-least-thirty-two-bytes"}
    done = subprocess.run(
        [sys.executable, "-c", script, "serve", str(RECIPE), "--room", "standup", "--personas", "maya,helper"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert f"turnflow: could not join room 'standup' at ws://127.0.0.1:{port} as persona-maya" in done.stderr
    assert "runtime released: True" in done.stdout
    assert "Traceback" not in done.stderr and "panic" not in done.stderr


def test_credentials_from_the_environment() -> None:
    env = {"LIVEKIT_URL": " wss://x.example ", "LIVEKIT_API_KEY": "key", "LIVEKIT_API_SECRET": "secret"}
    assert LiveKitCredentials.from_env(env) == LiveKitCredentials("wss://x.example", "key", "secret")
