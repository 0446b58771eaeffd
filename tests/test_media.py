"""Audio in: real files, bytes and arrays decoded, normalised and trimmed; bad input refused in words."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from turnflow.nodes.media import (
    Audio,
    AudioError,
    NoSpeechError,
    decode_input_audio,
    load_audio,
    normalise,
    trim_silence,
)
from turnflow.nodes.streaming import SpokenReply

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Audio:
    """espeak-ng saying SENTENCE, as decoded from its own WAV file (22050 Hz mono)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); speech audio cannot be made")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), SENTENCE], check=True)
    return load_audio(path)


def test_espeak_speech_loads_as_mono_float32(speech: Audio) -> None:
    assert speech.sample_rate == 22050
    assert speech.samples.dtype == np.float32 and speech.samples.ndim == 1
    assert 2.0 < speech.duration_s < 4.5


def test_stereo_44k_wav_normalises_to_16k_mono(speech: Audio, tmp_path: Path) -> None:
    at_44k = speech.resampled(44100).samples
    stereo = np.stack([at_44k, 0.5 * at_44k], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="PCM_16")

    loaded = load_audio(path)
    assert loaded.sample_rate == 44100
    assert loaded.samples.ndim == 1
    assert loaded.duration_s == pytest.approx(speech.duration_s, abs=0.001)
    # Channels are averaged: (x + x/2) / 2
    assert np.max(np.abs(loaded.samples)) == pytest.approx(0.75 * np.max(np.abs(at_44k)), rel=0.01)

    normalised = normalise(loaded)
    assert normalised.sample_rate == 16000
    assert normalised.samples.dtype == np.float32 and normalised.samples.ndim == 1
    assert normalised.duration_s == pytest.approx(speech.duration_s, abs=0.3)
    assert len(normalised.samples) == pytest.approx(normalised.duration_s * 16000, abs=1)


def test_one_second_of_silence_each_side_is_trimmed(speech: Audio, tmp_path: Path) -> None:
    second = np.zeros(speech.sample_rate, np.float32)
    path = tmp_path / "padded.wav"
    sf.write(path, np.concatenate([second, speech.samples, second]), speech.sample_rate)
    padded = load_audio(path)
    assert padded.duration_s == pytest.approx(speech.duration_s + 2.0, abs=0.001)

    trimmed = trim_silence(padded)
    assert trimmed.sample_rate == padded.sample_rate
    assert trimmed.duration_s == pytest.approx(speech.duration_s, abs=0.35)

    unpadded = trim_silence(padded, pad_ms=0)
    assert unpadded.duration_s < trimmed.duration_s


def test_trimming_silence_alone_says_there_is_no_speech() -> None:
    with pytest.raises(NoSpeechError, match="no speech") as raised:
        trim_silence(Audio(np.zeros(32000, np.float32), 16000))
    assert isinstance(raised.value, AudioError)
    assert "2.00 s" in str(raised.value)


def test_raw_pcm16_bytes_with_sample_rate(speech: Audio) -> None:
    pcm = speech.to_pcm16()
    assert len(pcm) == 2 * len(speech.samples)
    loaded = load_audio(pcm, sample_rate=speech.sample_rate)
    assert loaded.sample_rate == speech.sample_rate
    np.testing.assert_allclose(loaded.samples, speech.samples, atol=1 / 32768 + 1e-6)
    # audio decoded from 16-bit PCM gives back the very bytes (as libsndfile writes them)
    written = io.BytesIO()
    sf.write(written, speech.samples, speech.sample_rate, format="RAW", subtype="PCM_16", endian="LITTLE")
    assert pcm == written.getvalue()
    # any other sample: the nearest step, full scale clipped
    edges = Audio(np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.4 / 32768, -1.6 / 32768], dtype=np.float32), 16000)
    assert np.frombuffer(edges.to_pcm16(), "<i2").tolist() == [-32768, -16384, 0, 8192, 16384, 32767, 1, -2]
    resampled = speech.resampled(16000)
    steps = np.frombuffer(resampled.to_pcm16(), "<i2").astype(np.float64)
    assert np.abs(steps - resampled.samples * 32768.0).max() <= 0.5 + 1e-3

    with pytest.raises(AudioError, match="sample_rate="):
        load_audio(pcm)
    with pytest.raises(AudioError, match="even number of bytes"):
        load_audio(pcm[:-1], sample_rate=16000)


def test_wav_bytes_decode_and_ignore_sample_rate(speech: Audio) -> None:
    loaded = load_audio(speech.to_wav_bytes(), sample_rate=8000)  # the container's rate wins
    assert loaded.sample_rate == speech.sample_rate
    assert loaded.sha256() == speech.sha256()


def test_numpy_int16_stereo_and_float_mono() -> None:
    left = np.full(1600, 16384, np.int16)
    right = np.zeros(1600, np.int16)
    stereo = load_audio(np.stack([left, right], axis=1), sample_rate=16000)
    assert stereo.duration_s == pytest.approx(0.1)
    np.testing.assert_allclose(stereo.samples, 0.25)

    mono = load_audio(np.linspace(-1, 1, 800), sample_rate=8000)
    assert mono.samples.dtype == np.float32 and mono.duration_s == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("array", "sample_rate", "words"),
    [
        (np.zeros(100, np.float32), None, ["sample_rate="]),
        (np.zeros((2, 16000), np.float32), 16000, ["(channels, frames)", "transpose"]),
        (np.full(100, 2.5, np.float32), 16000, ["[-1, 1]", "2.5"]),
        (np.zeros(100, np.int32), 16000, ["unsupported encoding", "int32"]),
        (np.zeros(0, np.float32), 16000, ["empty", "0 samples"]),
    ],
)
def test_numpy_input_refused_with_reason(
    array: np.ndarray, sample_rate: int | None, words: list[str]
) -> None:
    with pytest.raises(AudioError) as raised:
        load_audio(array, sample_rate=sample_rate)
    for word in words:
        assert word in str(raised.value)


def test_text_file_is_not_audio(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("remember to buy milk\n")
    with pytest.raises(AudioError, match=r"'notes.txt' is not audio"):
        load_audio(notes)
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_empty_wav_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"audio is empty \(0 samples after decoding 'empty.wav'\)"):
        load_audio(path)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


def test_ten_minute_wav_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_U8") as long_file:
        long_file.write(np.zeros(600 * 8000, np.float32))
    with pytest.raises(AudioError) as raised:
        load_audio(path)
    message = str(raised.value)
    assert "600.0 s long" in message and "limit is 60.0 s" in message and "media.max_audio_s" in message
    assert load_audio(path, max_duration_s=601).duration_s == pytest.approx(600.0)


def test_damaged_wav_is_an_unsupported_encoding(speech: Audio) -> None:
    wav = bytearray(speech.to_wav_bytes())
    wav[20:22] = (0x1234).to_bytes(2, "little")  # a codec id libsndfile does not know
    with pytest.raises(AudioError, match="unsupported encoding or damaged file"):
        load_audio(bytes(wav))


def test_audio_value_checks_and_digest(speech: Audio) -> None:
    with pytest.raises(AudioError, match="1-D float32"):
        Audio(np.zeros(10, np.int16), 16000)
    with pytest.raises(AudioError, match="sample_rate"):
        Audio(np.zeros(10, np.float32), 0)
    with pytest.raises(ValueError):
        speech.samples[0] = 0.5  # read-only
    assert speech.sha256() == load_audio(speech.to_wav_bytes()).sha256()
    assert speech.resampled(16000).duration_s == pytest.approx(speech.duration_s, abs=1e-3)


def test_input_audio_part_decodes(speech: Audio) -> None:
    data = base64.b64encode(speech.to_wav_bytes()).decode()
    decoded = decode_input_audio(data, "wav")
    assert decoded.sha256() == speech.sha256()

    mp3 = _encoded(speech, "MP3")
    assert decode_input_audio(mp3, "mp3").duration_s == pytest.approx(speech.duration_s, abs=0.1)


@pytest.mark.parametrize(
    ("data", "fmt", "words"),
    [
        ("this is %%% not base64!", "wav", ["not valid base64"]),
        ("UklGRg", "wav", ["not valid base64"]),
        ("aGVsbG8gd29ybGQ=", "wav", ["'wav'", "not audio"]),
        ("UklGRg==", "m4a", ["unsupported input_audio format 'm4a'", "mp3", "wav"]),
        ("data:audio/wav;base64,UklGRg==", "wav", ["bare base64", "data:audio/wav;base64"]),
        ("", "wav", ["empty"]),
    ],
)
def test_bad_input_audio_parts_are_refused(data: str, fmt: str, words: list[str]) -> None:
    with pytest.raises(AudioError) as raised:
        decode_input_audio(data, fmt)
    for word in words:
        assert word in str(raised.value)


def test_input_audio_format_must_match_the_bytes(speech: Audio) -> None:
    with pytest.raises(AudioError, match="declared as 'mp3' but the data is WAV"):
        decode_input_audio(base64.b64encode(speech.to_wav_bytes()).decode(), "mp3")


def test_input_audio_too_long_names_the_limit(speech: Audio) -> None:
    data = base64.b64encode(speech.to_wav_bytes()).decode()
    with pytest.raises(AudioError, match=r"limit is 1\.0 s"):
        decode_input_audio(data, "wav", max_duration_s=1.0)


def _encoded(audio: Audio, container: str) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, audio.samples, audio.sample_rate, format=container)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_cut_off_wav_is_refused_with_what_it_declares(speech: Audio, tmp_path: Path) -> None:
    whole = speech.to_wav_bytes()
    cut = whole[: len(whole) // 2]
    with pytest.raises(AudioError, match=r"truncated WAV file.*declares \d+\.\d s and holds \d+\.\d s"):
        load_audio(cut)
    path = tmp_path / "cut.wav"
    path.write_bytes(cut)
    with pytest.raises(AudioError, match="truncated WAV file"):
        load_audio(path)
    streaming = whole[:40] + b"\xff\xff\xff\xff" + whole[44:]  # a streaming writer's "length unknown"
    assert load_audio(streaming).duration_s == pytest.approx(speech.duration_s, abs=0.01)


def test_a_float_wav_with_an_infinite_sample_is_refused() -> None:
    samples = np.zeros(16000, dtype=np.float32)
    samples[10] = np.inf
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(buffer.getvalue())


def test_spoken_reply_joins_its_audio_once_and_knows_its_length_without_joining() -> None:
    spoken = SpokenReply(route="tts")
    assert spoken.audio is None and spoken.duration_s == 0.0
    first = Audio(np.full(22050, 0.25, dtype=np.float32), 22050)
    second = Audio(np.full(8000, -0.5, dtype=np.float32), 16000)  # another rate: joined at the first one's
    spoken.add(first, "One.", asked=None, turn_started=0.0, sink=None, streamed_chars=4)
    spoken.add(second, "Two.", asked=None, turn_started=0.0, sink=None, streamed_chars=8)
    assert spoken.duration_s == pytest.approx(1.5)
    joined = spoken.audio
    assert joined is not None and joined.sample_rate == 22050
    assert joined.duration_s == pytest.approx(1.5, abs=1e-3)
    assert spoken.audio is joined  # joined once, however often it is asked for
    third = Audio(np.zeros(2205, dtype=np.float32), 22050)
    spoken.add(third, "Three.", asked=None, turn_started=0.0, sink=None, streamed_chars=14)
    assert spoken.audio is not joined and spoken.audio.duration_s == pytest.approx(1.6, abs=1e-3)


@pytest.mark.parametrize("f0", [65.0, 110.0, 220.0, 390.0])
def test_voice_fingerprint_finds_the_pitch_of_a_voiced_tone_across_its_range(f0: float) -> None:
    from turnflow.nodes.fingerprint import voice_fingerprint

    t = np.arange(int(1.5 * 16000)) / 16000
    tone = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3))  # a fundamental and two harmonics
    found = voice_fingerprint(Audio(tone.astype(np.float32), 16000))
    assert found is not None and found.f0_hz is not None
    assert abs(found.f0_hz - f0) < 0.02 * f0
    assert found.voiced_s > 1.3
