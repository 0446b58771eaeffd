"""Reply audio out: a WAV file read back with soundfile, and frames through a real livekit rtc.AudioSource."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import jwt
import numpy as np
import pytest
import soundfile as sf
import soxr
from livekit import api, rtc

from turnflow.nodes.media import Audio
from turnflow.nodes.publish import LiveKitPublisher, WavSink, participant_token


def tone(seconds: float, rate: int, hz: float = 440.0) -> Audio:
    """A sine tone at 0.3 of full scale."""
    time_s = np.arange(round(seconds * rate)) / rate
    return Audio((0.3 * np.sin(2 * np.pi * hz * time_s)).astype(np.float32), rate)


# --- WavSink --------------------------------------------------------------------------------------


def test_wav_sink_writes_a_valid_wav_at_its_rate(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"
    with WavSink(path) as sink:
        sink.write(tone(0.5, 16000))
        sink.write(tone(0.25, 22050))
        sink.write(tone(0.25, 24000))
    info = sf.info(path)
    assert (info.format, info.samplerate, info.channels, info.subtype) == ("WAV", 24000, 1, "PCM_16")
    assert info.duration == pytest.approx(1.0, abs=0.005)
    assert sink.duration_s == pytest.approx(info.duration)


def test_wav_sink_takes_its_rate_from_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "reply.wav"
    sink = WavSink(path, sample_rate=None)
    sink.write(tone(0.3, 22050))
    sink.write(tone(0.3, 16000))
    sink.close()
    sink.close()
    samples, rate = sf.read(path)
    assert rate == 22050 and samples.ndim == 1
    assert len(samples) / rate == pytest.approx(0.6, abs=0.005)
    with pytest.raises(ValueError, match="is closed"):
        sink.write(tone(0.1, 22050))


def test_wav_sink_chunks_join_without_seams(tmp_path: Path) -> None:
    """Resampling chunk by chunk gives what resampling the whole reply at once gives: no clicks at edges."""
    whole = tone(1.0, 16000)
    with WavSink(tmp_path / "chunked.wav") as sink:
        for start in range(0, 16000, 1234):
            sink.write(Audio(np.ascontiguousarray(whole.samples[start : start + 1234]), 16000))
    chunked, _ = sf.read(tmp_path / "chunked.wav", dtype="float32")
    at_once = soxr.resample(whole.samples, 16000, 24000)
    assert len(chunked) == pytest.approx(len(at_once), abs=2)
    common = min(len(chunked), len(at_once))
    assert np.max(np.abs(chunked[:common] - at_once[:common])) < 2e-3


def test_wav_sink_closed_unwritten_is_an_empty_valid_wav(tmp_path: Path) -> None:
    WavSink(tmp_path / "nothing.wav").close()
    info = sf.info(tmp_path / "nothing.wav")
    assert (info.samplerate, info.frames) == (24000, 0)


def test_wav_sink_refuses_a_path_it_cannot_write_before_any_audio(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"folder '.*missing' does not exist"):
        WavSink(tmp_path / "missing" / "reply.wav")
    with pytest.raises(ValueError, match="it is a folder"):
        WavSink(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- LiveKitPublisher through a real rtc.AudioSource ----------------------------------------------


def test_publisher_frames_are_24k_mono_20ms() -> None:
    frames: list[rtc.AudioFrame] = []

    async def scenario() -> LiveKitPublisher:
        publisher = LiveKitPublisher("alice-voice", frame_tap=frames.append)
        assert isinstance(publisher.source, rtc.AudioSource)
        assert isinstance(publisher.track, rtc.LocalAudioTrack) and publisher.track.name == "alice-voice"
        one_second = tone(1.0, 16000)
        for start in range(0, 16000, 3200):  # as a TTS would hand it over, 200 ms at a time
            await publisher.push(Audio(np.ascontiguousarray(one_second.samples[start : start + 3200]), 16000))
        await publisher.flush()
        assert publisher.source.queued_duration > 0.5  # LiveKit plays it out in real time
        await publisher.aclose()
        return publisher

    publisher = asyncio.run(scenario())
    assert all(isinstance(frame, rtc.AudioFrame) for frame in frames)
    assert {(f.sample_rate, f.num_channels, f.samples_per_channel) for f in frames} == {(24000, 1, 480)}
    assert publisher.frames_captured == len(frames)
    assert sum(frame.duration for frame in frames) == pytest.approx(1.0, abs=0.02)
    heard = np.frombuffer(b"".join(bytes(frame.data) for frame in frames), np.int16) / 32768
    assert np.max(np.abs(heard)) == pytest.approx(0.3, abs=0.02)


def test_interrupt_clears_the_queue_and_stops_a_push_in_progress() -> None:
    async def scenario() -> None:
        publisher = LiveKitPublisher(queue_size_ms=200)
        await publisher.push(tone(0.18, 24000))
        await asyncio.sleep(0.02)
        assert publisher.source.queued_duration > 0.1
        publisher.interrupt()
        assert publisher.source.queued_duration == 0.0

        # A long reply being pushed (capture_frame waits once 200 ms are queued) stops on barge-in.
        pushing = asyncio.create_task(publisher.push(tone(3.0, 24000)))
        await asyncio.sleep(0.3)
        publisher.interrupt()
        await asyncio.wait_for(pushing, timeout=1.0)
        assert publisher.frames_captured < 50  # far fewer than the 150 frames of 3 s
        assert publisher.source.queued_duration == 0.0
        await publisher.aclose()

    asyncio.run(scenario())


def test_publisher_needs_a_running_loop_and_a_room() -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        LiveKitPublisher()
    with pytest.raises(ValueError, match="whole number of samples"):
        asyncio.run(_make_publisher(source_rate=22050, frame_ms=15))

    async def publish_unconnected() -> None:
        publisher = LiveKitPublisher()
        try:
            await publisher.publish()
        finally:
            await publisher.aclose()

    with pytest.raises(RuntimeError, match=r"connect\(url, token\) first"):
        asyncio.run(publish_unconnected())


async def _make_publisher(**options: int) -> LiveKitPublisher:
    return LiveKitPublisher(**options)


# --- participant_token ----------------------------------------------------------------------------

API_KEY, API_SECRET = "APIturnflowtest", "a-test-secret-that-is-at-least-32-bytes-long"


def test_participant_token_grants_join_publish_subscribe_and_nothing_more() -> None:
    token = participant_token("persona-alice", "salon", api_key=API_KEY, api_secret=API_SECRET, ttl_s=600)
    claims = api.TokenVerifier(API_KEY, API_SECRET).verify(token)
    assert claims.identity == "persona-alice"
    video = claims.video
    assert video is not None
    assert (video.room_join, video.room) == (True, "salon")
    assert video.can_publish and video.can_subscribe
    assert video.can_publish_sources == ["microphone"] and video.can_publish_data is False
    assert not any((video.room_admin, video.room_create, video.room_list, video.room_record, video.hidden))

    payload = jwt.decode(token, API_SECRET, algorithms=["HS256"])
    assert timedelta(seconds=payload["exp"] - payload["nbf"]) == timedelta(seconds=600)
    assert payload["iss"] == API_KEY and payload["sub"] == "persona-alice"


def test_participant_token_listen_off_and_bad_values() -> None:
    token = participant_token("bob", "salon", api_key=API_KEY, api_secret=API_SECRET, can_subscribe=False)
    video = api.TokenVerifier(API_KEY, API_SECRET).verify(token).video
    assert video is not None and video.can_subscribe is False
    with pytest.raises(ValueError, match="non-empty room, got ''"):
        participant_token("bob", "", api_key=API_KEY, api_secret=API_SECRET)
