"""The voice path on real llama-servers: a model that hears gets the audio, a text-only one gets the STT bridge.

Audio comes from espeak-ng; replies are spoken by the TTS bridge sentence by sentence. The model that
*speaks* cannot run here, so that one path is tested against a stub server following OpenAI's documented
streaming shape (`delta.audio.data` base64 PCM16 at 24 kHz, `delta.audio.transcript`).
"""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import RECIPE, copy_recipe_folder, llama_server_or_skip
from stubs import speaking_model

from turnflow.adapters import AdapterRegistry
from turnflow.nodes.media import Audio, AudioError, decode_input_audio
from turnflow.nodes.speech import EspeakTts, TtsVoice
from turnflow.recipe import default_backends_path, load_backends
from turnflow.server import EmbeddedServer
from turnflow.session import Session

pytestmark = pytest.mark.server

QUESTIONS = [
    "Maya, what is on the sprint board today?",
    "Is anything blocked on the payments work?",
    "Who is on call this week?",
    "Please move the retro to Thursday.",
    "How many tickets are still in review?",
]


@pytest.fixture(scope="module")
def utterances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Spoken questions as WAV files (espeak-ng), with a little silence around them."""
    folder = tmp_path_factory.mktemp("speech")
    tts = EspeakTts()
    paths = []
    for i, question in enumerate(QUESTIONS):
        audio = tts.synthesize(question, TtsVoice("en-us+f3", rate_wpm=150))
        pad = np.zeros(int(0.4 * audio.sample_rate), np.float32)
        path = folder / f"q{i}.wav"
        sf.write(path, np.concatenate([pad, audio.samples, pad]), audio.sample_rate)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def servers(home: Path) -> Iterator[None]:
    """Both embedded backends, up for the module."""
    llama_server_or_skip()
    backends = load_backends(default_backends_path())
    for name in ("local", "local-audio"):
        EmbeddedServer(name, backends[name]).up()
    yield


def _twenty_audio_turns(backend: str, home: Path, utterances: list[Path]) -> list[dict[str, Any]]:
    reports = []
    with Session(RECIPE, backend=backend, state_dir=home / backend) as session:
        for i in range(20):
            chunks: list[Audio] = []
            result = session.turn(persona="maya", room="voice", speaker="alice", audio=utterances[i % 5],
                                  audio_sink=chunks.append)
            assert chunks and result.audio is not None
            reports.append(result.report)
    return reports


@pytest.fixture(scope="module")
def native_reports(servers: None, home: Path, utterances: list[Path]) -> list[dict[str, Any]]:
    """Twenty audio turns on the backend that hears."""
    return _twenty_audio_turns("local-audio", home, utterances)


@pytest.fixture(scope="module")
def bridged_reports(servers: None, home: Path, utterances: list[Path]) -> list[dict[str, Any]]:
    """Twenty audio turns on the text-only backend."""
    return _twenty_audio_turns("local", home, utterances)


def test_model_that_hears_gets_the_audio_and_no_stt(native_reports: list[dict[str, Any]]) -> None:
    assert sum(r["invocations"]["stt"] for r in native_reports) == 0
    assert {r["route"]["audio_in"] for r in native_reports} == {"native"}
    assert all(r["transcript"] is None for r in native_reports)
    assert all(r["invocations"]["tts"] >= 1 and r["route"]["audio_out"] == "tts" for r in native_reports)


def test_text_only_model_gets_one_transcript_per_turn(bridged_reports: list[dict[str, Any]]) -> None:
    assert [r["invocations"]["stt"] for r in bridged_reports] == [1] * 20
    assert {r["route"]["audio_in"] for r in bridged_reports} == {"stt"}
    assert all(r["transcript"] for r in bridged_reports)
    print("\nfirst transcripts:", [r["transcript"] for r in bridged_reports[:5]])


@pytest.mark.parametrize("which", ["native_reports", "bridged_reports"])
def test_audio_turns_reuse_the_prefix(which: str, request: pytest.FixtureRequest) -> None:
    reports: list[dict[str, Any]] = request.getfixturevalue(which)
    assert len({r["prefix"]["invariant_sha256"] for r in reports}) == 1
    shares = [r["llm"]["prompt_tokens_processed"] / r["llm"]["prompt_tokens"] for r in reports[2:]]
    print(f"\n{which}: processed share turns 3-20: max {max(shares):.1%}, median {statistics.median(shares):.1%}; "
          f"prompt grew to {reports[-1]['llm']['prompt_tokens']} tokens")
    assert max(shares) <= 0.20


def test_first_audio_comes_before_the_reply_is_finished(native_reports: list[dict[str, Any]]) -> None:
    """The first sentence is spoken while the model is still generating the rest.

    Asserted on order (how much of the reply had streamed when the first audio went out), not on
    wall-clock ratios, which swing with machine load; the ratio is printed for the record.
    """
    several = [r for r in native_reports if r["speech"]["sentences"] >= 2]
    assert len(several) >= 10, "the embedded backends' grammar should give multi-sentence replies"
    for r in several:
        at, length = r["speech"]["first_audio_at_char"], len(r["reply"])
        assert 0 < at < length, f"first audio after {at} of {length} characters: {r['reply']!r}"
    streamed = [r["speech"]["first_audio_at_char"] / len(r["reply"]) for r in several]
    ratios = [r["timings_ms"]["first_audio"] / r["timings_ms"]["total"] for r in several]
    print(f"\nover {len(several)} multi-sentence turns, first audio after median {statistics.median(streamed):.0%} "
          f"of the reply text; first_audio / total time: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    assert all(r["metrics"]["e2e_latency"] is not None and r["metrics"]["tts_ttfb"] is not None for r in several)


def test_bad_audio_is_refused_and_history_untouched(servers: None, home: Path, tmp_path: Path) -> None:
    text_file = tmp_path / "notes.wav"
    text_file.write_text("these are meeting notes, not audio")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(16000 * 600, np.int16), 16000, subtype="PCM_16")
    cases = [
        (text_file, "not audio"),
        (empty, "empty"),
        (long, "600.0 s"),
        ({"data": "UklGR!!!not-base64", "format": "wav"}, "base64"),
        ({"data": base64.b64encode(b"RIFF....WAVEfmt ").decode(), "format": "wav"}, "is not audio"),
    ]
    with Session(RECIPE, backend="local-audio", state_dir=home / "bad-audio") as session:
        session.turn(persona="maya", room="bad", text="hello")
        before = session.store.history("bad")
        for audio, words in cases:
            with pytest.raises(AudioError, match=words):
                session.turn(persona="maya", room="bad", audio=audio)
            assert session.store.history("bad") == before
        with pytest.raises(ValueError, match="folder .* does not exist"):  # the reply's WAV: refused before the turn
            session.turn(persona="maya", room="bad", text="hello again", out=tmp_path / "missing" / "reply.wav")
        assert session.store.history("bad") == before


def test_cli_speaks_to_a_wav_file(servers: None, home: Path, utterances: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    env = {"TURNFLOW_HOME": str(home), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "turnflow.cli", "run", str(RECIPE), "--persona", "helper", "--room", "cli-voice",
         "--backend", "local", "--audio", str(utterances[0]), "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["route"] == {"audio_in": "stt", "audio_out": "tts", "images_in": "none"}
    info = sf.info(out)
    assert info.channels == 1 and info.samplerate == 24000
    assert abs(info.duration - report["speech"]["audio_s"]) < 0.05 and info.duration > 0.5


# ------------------------------------------------------------------ the model that speaks (stub server)


def test_model_that_speaks_is_played_without_tts(home: Path, tmp_path: Path, utterances: list[Path]) -> None:
    registry = AdapterRegistry()
    maya_files = [registry.path(registry.get(a)) for a in ("maya-voice", "standup-facilitation", "incident-comms")]
    with speaking_model(loaded_adapters=maya_files) as (url, requests):
        recipe = copy_recipe_folder(tmp_path)
        (recipe.parent / "backends.yaml").write_text(f"backends:\n  speaker:\n    kind: openai\n    url: {url}\n")
        with Session(recipe, backend="speaker", state_dir=tmp_path / "state") as session:
            assert session.backend.capabilities.audio_in and session.backend.capabilities.audio_out
            chunks: list[Audio] = []
            result = session.turn(persona="maya", room="r", audio=utterances[0], audio_sink=chunks.append)
    report = result.report
    assert report["route"] == {"audio_in": "native", "audio_out": "native", "images_in": "none"}
    assert report["invocations"] == {"stt": 0, "tts": 0, "llm": 1, "describe": 0}
    assert result.reply == "Hello there. Bye."
    assert len(chunks) == 5 and all(c.sample_rate == 24000 for c in chunks)
    assert abs(result.audio.duration_s - 1.0) < 1e-6
    sent = requests[-1]
    assert sent["modalities"] == ["text", "audio"] and sent["audio"]["format"] == "pcm16"
    assert sent["audio"]["voice"] == "en-us+f3"  # the persona's voice
    # the persona's voice LoRA (and its skills) are applied to what the model speaks
    assert sent["lora"] == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.6}, {"id": 2, "scale": 0.3}]
    parts = sent["messages"][-1]["content"]
    assert any(p.get("type") == "input_audio" and p["input_audio"]["format"] == "wav" for p in parts)
    assert report["llm"]["prompt_tokens_cached"] == 100


def test_only_a_persons_audio_no_one_wrote_down_needs_words() -> None:
    from turnflow.store import StoredMessage

    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    label = {"type": "text", "text": "alice: "}
    heard = StoredMessage(1, 1, "alice", "person", "Alice", [label, audio], "")
    assert heard.unheard_audio == audio["input_audio"]
    assert StoredMessage(2, 1, "alice", "person", "Alice", [label, audio], "what she said").unheard_audio is None
    assert StoredMessage(3, 1, "alice", "person", "Alice", "alice: hi", "").unheard_audio is None
    assert StoredMessage(4, 1, "maya", "persona", "Maya", [label, audio], "").unheard_audio is None
    asked: list[int] = []

    def words(message: StoredMessage) -> str:
        asked.append(message.id)
        return "good morning" if len(asked) == 1 else "something else"

    line = heard.seen_line("helper", hears=False, transcript=words)
    assert line[0]["content"] == [label, {"type": "text", "text": "[voice message: good morning]"}]
    assert heard.seen_line("helper", hears=False, transcript=words) == line
    hearing = heard.seen_line("maya", hears=True, transcript=words)
    assert hearing[0]["content"][1] == audio
    assert asked == [1]  # once per persona that does not hear; never for one that hears


def test_text_only_persona_reads_past_audio_as_text(servers: None, home: Path, utterances: list[Path]) -> None:
    """Audio a model heard itself is put into words once, when a persona whose model does not hear first sees it;
    the store keeps the words for every persona and process after it."""
    with Session(RECIPE, backend="local-audio", state_dir=home / "mixed") as hearing:
        heard = hearing.turn(persona="maya", room="mixed", speaker="alice", audio=utterances[0])
        audio_message = hearing.store.history("mixed")[-2]
        # a caller that transcribed already (a room agent choosing who answers): the words are kept with the audio
        hearing.turn(persona="maya", room="mixed", speaker="alice", audio=utterances[1],
                     transcript="move the retro to thursday")
        part = audio_message.unheard_audio
        assert part is not None
        words = hearing.bridges.stt.transcribe(decode_input_audio(part["data"], part["format"]))  # the recipe's STT
    assert heard.report["route"]["audio_in"] == "native" and heard.report["invocations"]["stt"] == 0
    assert audio_message.text == ""  # heard natively: no words kept
    assert words
    with Session(RECIPE, backend="local", state_dir=home / "mixed") as bridged:
        result = bridged.turn(persona="helper", room="mixed", speaker="alice", text="Helper, your view?")
        kept = bridged.store.transcript_of(audio_message.id)
    parts = [p for m in result.prompt.messages if isinstance(m["content"], list) for p in m["content"]]
    assert not any(p.get("type") == "input_audio" for p in parts)
    assert kept == words
    assert {"type": "text", "text": f"[voice message: {kept}]"} in parts
    assert {"type": "text", "text": "[voice message: move the retro to thursday]"} in parts  # no STT for this one
    report = result.report
    assert report["invocations"]["stt"] == 1 and report["timings_ms"]["stt"] > 0  # STT time, not turnflow's own
    assert report["timings_ms"]["turnflow"] < report["timings_ms"]["stt"]  # counted as STT, not turnflow's own
    assert 0 < report["timings_ms"]["turnflow_before_model"] <= report["timings_ms"]["turnflow"]  # nor before the model
    assert report["tier_violations"] == []
    # alice's messages keep the time Maya was shown in front of them, for Maya; Helper sees only its own turn's
    assert audio_message.preface.startswith("Current time:")
    assert audio_message.content[0] == {"type": "text", "text": audio_message.preface + "\n\n"}
    texts = [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
             for m in result.prompt.messages]
    assert sum(text.count("Current time:") for text in texts) == 1 and texts[-1].startswith("Current time:")

    class Deaf:
        def transcribe(self, audio: Audio) -> str:
            raise AssertionError("transcribed again")

    with Session(RECIPE, backend="local", state_dir=home / "mixed") as later:  # another process, another persona
        later.bridges._stt = Deaf()  # type: ignore[attr-defined]
        prompt = later.preview(persona="teacher", room="mixed", speaker="alice", text="And you?")
    seen = [p for m in prompt.messages if isinstance(m["content"], list) for p in m["content"]]
    assert {"type": "text", "text": f"[voice message: {kept}]"} in seen
