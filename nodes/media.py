"""Audio coming into a turn: decode files, bytes, arrays and OpenAI ``input_audio`` parts into one shape.

Everything inside turnflow handles an :class:`Audio`: mono float32 samples in [-1, 1] with their rate.
Decoding is libsndfile's (``soundfile``), resampling soxr's, speech detection webrtcvad's.
Input a person cannot use is refused with an :class:`AudioError` that says what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import webrtcvad

__all__ = [
    "Audio",
    "AudioError",
    "NoSpeechError",
    "INPUT_AUDIO_FORMATS",
    "VAD_RATE",
    "SpeechFrames",
    "decode_input_audio",
    "load_audio",
    "normalise",
    "trim_silence",
]

# OpenAI ``input_audio.format`` values we decode, and the container libsndfile must find behind each.
INPUT_AUDIO_FORMATS: dict[str, str] = {"wav": "WAV", "mp3": "MP3", "flac": "FLAC", "ogg": "OGG"}

VAD_RATE = 16000
"""The rate speech is detected at: audio is resampled to it for webrtcvad."""
_VAD_FRAME_MS = 30
# libsndfile's SF_ERR_UNRECOGNISED_FORMAT: the bytes are no container it knows.
_SF_UNRECOGNISED_FORMAT = 1
# A 2-D array with more columns than this is taken to be (channels, frames), the wrong way round.
_MAX_CHANNELS = 8


class AudioError(ValueError):
    """Audio that cannot be used, with a message for the person who sent it."""


class NoSpeechError(AudioError):
    """Audio that decoded fine but holds no speech (webrtcvad found none)."""


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] at ``sample_rate`` Hz; the samples are read-only."""

    samples: np.ndarray
    sample_rate: int
    caption: str = field(default="", compare=False)
    """The words this audio speaks, when known (the sentence a TTS bridge spoke, a model's transcript)."""

    def __post_init__(self) -> None:
        samples = self.samples
        if not isinstance(samples, np.ndarray) or samples.dtype != np.float32 or samples.ndim != 1:
            shape = getattr(samples, "shape", None)
            dtype = getattr(samples, "dtype", type(samples).__name__)
            raise AudioError(
                f"Audio.samples must be a 1-D float32 numpy array, got {dtype} with shape {shape} "
                "(use load_audio() to convert other inputs)"
            )
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise AudioError(f"Audio.sample_rate must be a positive int, got {rate!r}")
        peak = float(np.max(np.abs(samples))) if samples.size else 0.0
        if not peak <= 1.0:  # written this way round so that NaN fails too
            raise AudioError(f"Audio.samples must lie in [-1, 1], got peak {peak:.3g}")
        frozen_view = samples.view()
        frozen_view.flags.writeable = False
        object.__setattr__(self, "samples", frozen_view)

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate

    def to_wav_bytes(self, subtype: str = "PCM_16") -> bytes:
        """The audio as a complete WAV file."""
        buffer = io.BytesIO()
        sf.write(buffer, self.samples, self.sample_rate, format="WAV", subtype=subtype)
        return buffer.getvalue()

    def sha256(self) -> str:
        """Hex SHA-256 of the 16-bit WAV bytes: identical audio, identical digest."""
        return hashlib.sha256(self.to_wav_bytes()).hexdigest()

    def resampled(self, rate: int) -> Audio:
        """The same audio at ``rate`` Hz (soxr, high quality); ``self`` when the rate already matches."""
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise AudioError(f"sample rate must be a positive int, got {rate!r}")
        if rate == self.sample_rate:
            return self
        converted = soxr.resample(self.samples, self.sample_rate, rate, quality="HQ")
        # The resampler's ringing may overshoot full scale by a hair; keep the [-1, 1] promise.
        return Audio(np.clip(converted, -1.0, 1.0).astype(np.float32, copy=False), rate)

    def to_pcm16(self) -> bytes:
        """Headerless little-endian signed 16-bit PCM, as VADs, recognisers and WebRTC take it."""
        # scaled by 32768 as libsndfile does, rounded to the nearest step (libsndfile floors), full scale clipped; in
        # numpy, a tenth of the time of a libsndfile call and buffer (this runs on every frame the VAD and the
        # LiveKit publisher see)
        return np.clip(np.rint(self.samples * np.float32(32768.0)), -32768, 32767).astype("<i2").tobytes()


def load_audio(
    source: bytes | str | os.PathLike[str] | np.ndarray,
    *,
    sample_rate: int | None = None,
    max_duration_s: float = 60.0,
) -> Audio:
    """Decode a file path, file bytes, raw PCM16 bytes or a numpy array into mono :class:`Audio`.

    Files and bytes in any container libsndfile reads (WAV, FLAC, OGG, MP3, ...) carry their own rate;
    ``sample_rate`` is needed, and only used, for raw little-endian PCM16 bytes and for numpy arrays
    (int16, or float in [-1, 1]; shape (frames,) or (frames, channels)). Channels are averaged to mono.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, sample_rate, max_duration_s, "the numpy array")
    if isinstance(source, bytes | bytearray | memoryview):
        return _from_bytes(bytes(source), sample_rate, max_duration_s)
    if isinstance(source, str | os.PathLike):
        return _from_path(Path(source), max_duration_s)
    raise AudioError(
        f"cannot load audio from a {type(source).__name__}; give a path, bytes or a numpy array"
    )


class SpeechFrames:
    """webrtcvad's verdict, frame by frame, on 16 kHz PCM16: the one frame loop behind :func:`trim_silence` and
    the end-of-turn detector of ``turnflow serve``."""

    def __init__(self, aggressiveness: int = 2, frame_ms: int = _VAD_FRAME_MS) -> None:
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30 (webrtcvad frames), got {frame_ms!r}")
        if isinstance(aggressiveness, bool) or aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3 (webrtcvad modes), got {aggressiveness!r}")
        self.frame_ms = frame_ms
        self.frame_bytes = VAD_RATE * frame_ms // 1000 * 2
        """Bytes of PCM16 in one frame."""
        self._vad = webrtcvad.Vad(aggressiveness)

    def voiced(self, pcm: bytes) -> Iterator[bool]:
        """Whether each whole frame of ``pcm`` (16 kHz PCM16) is speech, in order; a part frame at the end is
        not decided."""
        for start in range(0, len(pcm) - self.frame_bytes + 1, self.frame_bytes):
            yield self._vad.is_speech(pcm[start : start + self.frame_bytes], VAD_RATE)


def trim_silence(audio: Audio, *, aggressiveness: int = 2, pad_ms: int = 150) -> Audio:
    """The audio from shortly before the first speech to shortly after the last (webrtcvad).

    The VAD decides on a 16 kHz copy in 30 ms frames; the cut is made in the original samples, keeping
    ``pad_ms`` of context on each side. Audio in which the VAD finds no speech at all raises
    :class:`NoSpeechError` (an :class:`AudioError`): a turn with nothing said is the caller's decision.
    """
    frames = SpeechFrames(aggressiveness, _VAD_FRAME_MS)
    if pad_ms < 0:
        raise ValueError(f"pad_ms must be >= 0, got {pad_ms!r}")

    pcm = audio.resampled(VAD_RATE).to_pcm16()
    speech_frames = [index for index, voiced in enumerate(frames.voiced(pcm)) if voiced]
    if not speech_frames:
        raise NoSpeechError(
            f"no speech found in {audio.duration_s:.2f} s of audio "
            f"(webrtcvad aggressiveness {aggressiveness}; a lower value is less strict)"
        )
    start_s = max(0.0, (speech_frames[0] * _VAD_FRAME_MS - pad_ms) / 1000)
    end_s = min(audio.duration_s, ((speech_frames[-1] + 1) * _VAD_FRAME_MS + pad_ms) / 1000)
    start, end = round(start_s * audio.sample_rate), round(end_s * audio.sample_rate)
    return Audio(np.ascontiguousarray(audio.samples[start:end]), audio.sample_rate)


def decode_input_audio(data_b64: str, fmt: str, *, max_duration_s: float = 60.0) -> Audio:
    """Decode an OpenAI ``input_audio`` part (``{"data": <base64>, "format": "wav"}``) sent by a client.

    The declared format must be one of :data:`INPUT_AUDIO_FORMATS` and must match the bytes.
    """
    declared = fmt.strip().lower() if isinstance(fmt, str) else fmt
    if declared not in INPUT_AUDIO_FORMATS:
        supported = ", ".join(sorted(INPUT_AUDIO_FORMATS))
        raise AudioError(f"unsupported input_audio format {fmt!r}; supported formats: {supported}")
    if not isinstance(data_b64, str):
        raise AudioError(f"input_audio data must be a base64 string, got {type(data_b64).__name__}")
    if data_b64.startswith("data:"):
        raise AudioError(
            "input_audio data must be bare base64, not a data: URL "
            f"(drop the {data_b64.split(',', 1)[0]!r}, prefix)"
        )
    try:
        payload = base64.b64decode("".join(data_b64.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise AudioError(f"input_audio data is not valid base64: {error}") from error
    if not payload:
        raise AudioError("input_audio data is empty (0 bytes after base64 decoding)")
    try:
        container = sf.info(io.BytesIO(payload)).format
    except sf.LibsndfileError as error:
        raise AudioError(
            f"input_audio declared as {declared!r} is not audio: {error.error_string}"
        ) from error
    if container != INPUT_AUDIO_FORMATS[declared]:
        raise AudioError(f"input_audio declared as {declared!r} but the data is {container}")
    return _from_bytes(payload, None, max_duration_s, described=f"{declared} input_audio")


def normalise(audio: Audio, rate: int = 16000) -> Audio:
    """Mono float32 at ``rate`` with leading and trailing silence trimmed (see :func:`trim_silence`)."""
    return trim_silence(audio.resampled(rate))


def _from_path(path: Path, max_duration_s: float) -> Audio:
    described = repr(path.name)
    if not path.is_file():
        raise AudioError(f"audio file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        _check_wav_complete(handle.read(4096), path.stat().st_size, described)
    try:
        with sf.SoundFile(path) as sound_file:
            _check_duration(sound_file.frames / sound_file.samplerate, max_duration_s)
            data = sound_file.read(dtype="float32", always_2d=True)
            rate = sound_file.samplerate
    except sf.LibsndfileError as error:
        raise _decode_error(error, described) from error
    return _finish(data, rate, max_duration_s, described)


def _check_wav_complete(head: bytes, size: int, described: str) -> None:
    """Refuse a RIFF/WAVE file whose data chunk declares more audio than the file holds (a cut-off upload).

    A data size of 0 or 0xFFFFFFFF is a streaming writer's "length unknown" and is accepted.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    offset, byte_rate = 12, 0
    while offset + 8 <= len(head):
        chunk, length = head[offset:offset + 4], int.from_bytes(head[offset + 4:offset + 8], "little")
        if chunk == b"fmt " and offset + 20 <= len(head):
            byte_rate = int.from_bytes(head[offset + 16:offset + 20], "little")
        if chunk == b"data":
            available = size - (offset + 8)
            if length not in (0, 0xFFFFFFFF) and length > available:
                if byte_rate:
                    held = f"; it declares {length / byte_rate:.1f} s and holds {max(available, 0) / byte_rate:.1f} s"
                else:
                    held = ""
                raise AudioError(f"{described} is a truncated WAV file: its data chunk declares {length:,} bytes, "
                                 f"the file holds {max(available, 0):,}{held}")
            return
        offset += 8 + length + (length & 1)


def _from_bytes(
    payload: bytes, sample_rate: int | None, max_duration_s: float, described: str | None = None
) -> Audio:
    described = described or f"{len(payload):,} bytes"
    if not payload:
        raise AudioError("audio is empty (0 bytes given)")
    _check_wav_complete(payload[:4096], len(payload), described)
    try:
        with sf.SoundFile(io.BytesIO(payload)) as sound_file:
            _check_duration(sound_file.frames / sound_file.samplerate, max_duration_s)
            data = sound_file.read(dtype="float32", always_2d=True)
            rate = sound_file.samplerate
    except sf.LibsndfileError as error:
        if error.code == _SF_UNRECOGNISED_FORMAT and sample_rate is not None:
            return _from_raw_pcm16(payload, sample_rate, max_duration_s)
        if error.code == _SF_UNRECOGNISED_FORMAT:
            raise AudioError(
                f"{described} are not audio in a format libsndfile knows ({error.error_string}); "
                "for raw PCM16 pass sample_rate="
            ) from error
        raise _decode_error(error, described) from error
    return _finish(data, rate, max_duration_s, described)


def _from_raw_pcm16(payload: bytes, sample_rate: int, max_duration_s: float) -> Audio:
    _check_rate(sample_rate)
    if len(payload) % 2:
        raise AudioError(
            f"raw PCM16 needs an even number of bytes (2 per sample), got {len(payload):,}: "
            "unsupported encoding or truncated data"
        )
    _check_duration(len(payload) / 2 / sample_rate, max_duration_s)
    data, _ = sf.read(
        io.BytesIO(payload),
        format="RAW",
        subtype="PCM_16",
        endian="LITTLE",
        channels=1,
        samplerate=sample_rate,
        dtype="float32",
        always_2d=True,
    )
    return _finish(data, sample_rate, max_duration_s, f"{len(payload):,} bytes of raw PCM16")


def _from_array(array: np.ndarray, sample_rate: int | None, max_duration_s: float, described: str) -> Audio:
    if sample_rate is None:
        raise AudioError("a numpy array carries no sample rate; pass sample_rate=")
    _check_rate(sample_rate)
    if array.ndim == 1:
        array = array[:, np.newaxis]
    elif array.ndim != 2:
        raise AudioError(f"audio arrays must be (frames,) or (frames, channels), got shape {array.shape}")
    elif array.shape[1] > _MAX_CHANNELS:
        raise AudioError(
            f"audio array of shape {array.shape} has {array.shape[1]} channels; "
            "arrays are (frames, channels) — transpose a (channels, frames) array"
        )
    if array.dtype == np.int16:
        data = array.astype(np.float32) / 32768.0
    elif np.issubdtype(array.dtype, np.floating):
        data = array.astype(np.float32)
        if not np.all(np.isfinite(data)):
            raise AudioError(f"{described} holds NaN or infinite samples")
        peak = float(np.max(np.abs(data))) if data.size else 0.0
        if peak > 1.0:
            raise AudioError(f"float samples must lie in [-1, 1]; {described} peaks at {peak:.3g}")
    else:
        raise AudioError(
            f"unsupported encoding: {described} has dtype {array.dtype}; "
            "use int16, or float samples in [-1, 1]"
        )
    return _finish(data, sample_rate, max_duration_s, described)


def _finish(data: np.ndarray, rate: int, max_duration_s: float, described: str) -> Audio:
    if data.shape[0] == 0:
        raise AudioError(f"audio is empty (0 samples after decoding {described})")
    if not np.isfinite(data).all():
        raise AudioError(f"{described} holds NaN or infinite samples")
    _check_duration(data.shape[0] / rate, max_duration_s)
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    # Float files may hold samples past full scale; they play clipped, so they decode clipped.
    return Audio(np.clip(mono, -1.0, 1.0).astype(np.float32), rate)


def _check_duration(duration_s: float, max_duration_s: float) -> None:
    if math.isnan(max_duration_s) or max_duration_s <= 0:
        raise ValueError(f"max_duration_s must be a positive number of seconds, got {max_duration_s!r}")
    if duration_s > max_duration_s:
        raise AudioError(
            f"audio is {duration_s:.1f} s long; the limit is {max_duration_s:.1f} s "
            "(set media.max_audio_s in the recipe to raise it)"
        )


def _check_rate(sample_rate: int) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive int, got {sample_rate!r}")


def _decode_error(error: sf.LibsndfileError, described: str) -> AudioError:
    if error.code == _SF_UNRECOGNISED_FORMAT:
        return AudioError(f"{described} is not audio: {error.error_string} (libsndfile knows no such format)")
    return AudioError(
        f"{described} cannot be decoded: unsupported encoding or damaged file ({error.error_string})"
    )
