"""Where a persona's reply audio goes: a WAV file, or a LiveKit room as that persona's microphone track.

Both take :class:`~turnflow.nodes.media.Audio` chunks as the TTS or the model produces them, resample
them as one continuous stream (soxr, no seams at chunk edges) and pass them on straight away.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import numpy as np
import soundfile as sf
import soxr

from .media import Audio

if TYPE_CHECKING:
    from livekit import rtc

__all__ = ["LiveKitPublisher", "WavSink", "participant_token"]

DEFAULT_OUTPUT_RATE = 24000


class _StreamResampler:
    """Resamples a stream of chunks to one rate, carrying filter state across chunk boundaries."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self._in_rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def feed(self, audio: Audio) -> np.ndarray:
        """The chunk at the output rate (the resampler may hold back a few milliseconds)."""
        tail = np.zeros(0, np.float32)
        if audio.sample_rate != self._in_rate:
            tail = self.flush()
            self._in_rate = audio.sample_rate
            if audio.sample_rate != self.out_rate:
                self._stream = soxr.ResampleStream(audio.sample_rate, self.out_rate, 1, dtype="float32")
        if self._stream is None:
            chunk = np.asarray(audio.samples, np.float32)
        else:
            chunk = self._stream.resample_chunk(audio.samples)
        return np.concatenate([tail, chunk]) if tail.size else chunk

    def flush(self) -> np.ndarray:
        """What the resampler still holds, at the end of a stream."""
        held = np.zeros(0, np.float32)
        if self._stream is not None:
            held = self._stream.resample_chunk(np.zeros(0, np.float32), last=True)
        self.reset()
        return held

    def reset(self) -> None:
        """Forget the stream without producing its tail (after an interruption)."""
        self._in_rate = None
        self._stream = None


def _clipped(samples: np.ndarray) -> np.ndarray:
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


class WavSink:
    """A mono WAV file that grows as reply audio is written to it; valid once closed.

    A path that cannot be written (no such folder, a folder itself) is refused here, before any audio is made.

    The file's rate is ``sample_rate`` (24 kHz unless told), or with ``sample_rate=None`` the rate of
    the first audio written. Later chunks at other rates are resampled to it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sample_rate: int | None = DEFAULT_OUTPUT_RATE,
        subtype: str = "PCM_16",
    ) -> None:
        if sample_rate is not None and sample_rate <= 0:
            raise ValueError(f"WavSink sample_rate must be positive or None, got {sample_rate!r}")
        self.path = Path(path)
        folder = self.path.parent
        if self.path.is_dir():
            raise ValueError(f"cannot write audio to {str(self.path)!r}: it is a folder; name a .wav file in it")
        if not folder.is_dir():
            raise ValueError(f"cannot write audio to {str(self.path)!r}: folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write audio to {str(self.path)!r}: folder {str(folder)!r} is not writable")
        self.sample_rate = sample_rate
        self.subtype = subtype
        self.frames_written = 0
        self._file: sf.SoundFile | None = None
        self._resampler: _StreamResampler | None = None
        self._closed = False

    @property
    def duration_s(self) -> float:
        """Seconds written so far."""
        return self.frames_written / self.sample_rate if self.sample_rate else 0.0

    def write(self, audio: Audio) -> None:
        """Append ``audio`` to the file, resampled to the file's rate."""
        if self._closed:
            raise ValueError(f"WavSink {str(self.path)!r} is closed; cannot write more audio")
        self._write_samples(self._open(audio.sample_rate).feed(audio))

    def close(self) -> None:
        """Write what the resampler holds and finalise the WAV header; closing twice is harmless."""
        if self._closed:
            return
        resampler = self._open(self.sample_rate or DEFAULT_OUTPUT_RATE)
        self._write_samples(resampler.flush())
        assert self._file is not None
        self._file.close()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open(self, first_rate: int) -> _StreamResampler:
        if self._resampler is None:
            self.sample_rate = self.sample_rate or first_rate
            self._file = sf.SoundFile(
                self.path, "w", samplerate=self.sample_rate, channels=1, format="WAV", subtype=self.subtype
            )
            self._resampler = _StreamResampler(self.sample_rate)
        return self._resampler

    def _write_samples(self, samples: np.ndarray) -> None:
        if samples.size:
            assert self._file is not None
            self._file.write(_clipped(samples))
            self.frames_written += len(samples)


class LiveKitPublisher:
    """One persona's voice in a LiveKit room: a mono ``rtc.AudioSource`` published as a microphone track.

    Create it inside the running event loop. ``push`` audio as it is produced (it is cut into
    ``frame_ms`` frames at ``source_rate``; LiveKit paces playout in real time), ``flush`` at the end of
    a reply, ``interrupt`` on barge-in. ``frame_tap``, if given, sees every ``rtc.AudioFrame`` just
    before it is captured. One producer pushes at a time.
    """

    def __init__(
        self,
        track_name: str = "voice",
        *,
        source_rate: int = DEFAULT_OUTPUT_RATE,
        frame_ms: int = 20,
        queue_size_ms: int = 1000,
        frame_tap: Callable[[rtc.AudioFrame], None] | None = None,
    ) -> None:
        if source_rate <= 0 or frame_ms <= 0 or (source_rate * frame_ms) % 1000:
            raise ValueError(
                f"frame_ms={frame_ms!r} at source_rate={source_rate!r} is not a whole number of samples"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError as error:
            raise RuntimeError(
                "create LiveKitPublisher inside a running event loop (from async code)"
            ) from error
        from livekit import rtc  # here, not at import: a process that writes WAV files only does not load it (~70 ms)

        self.source_rate = source_rate
        self.samples_per_frame = source_rate * frame_ms // 1000
        self.frame_tap = frame_tap
        self.source = rtc.AudioSource(source_rate, 1, queue_size_ms=queue_size_ms, loop=loop)
        self.track = rtc.LocalAudioTrack.create_audio_track(track_name, self.source)
        self.room: rtc.Room | None = None
        self.publication: rtc.LocalTrackPublication | None = None
        self.frames_captured = 0
        self._resampler = _StreamResampler(source_rate)
        self._pending = np.zeros(0, np.float32)
        self._generation = 0  # bumped by interrupt() so that a push in progress stops

    @property
    def seconds_captured(self) -> float:
        """Audio handed to the source so far, in seconds."""
        return self.frames_captured * self.samples_per_frame / self.source_rate

    @property
    def seconds_played(self) -> float:
        """Audio the room has been sent so far (captured minus what still waits in the source's queue)."""
        return max(0.0, self.seconds_captured - self.source.queued_duration)

    async def push(self, audio: Audio) -> None:
        """Send ``audio`` to the room in whole frames; a partial frame waits for more audio or ``flush``."""
        generation = self._generation
        self._pending = np.concatenate([self._pending, self._resampler.feed(audio)])
        await self._capture_whole_frames(generation)

    async def flush(self) -> None:
        """Send everything held back, the last frame padded with silence: call at the end of a reply."""
        generation = self._generation
        self._pending = np.concatenate([self._pending, self._resampler.flush()])
        partial = len(self._pending) % self.samples_per_frame
        if partial:
            silence = np.zeros(self.samples_per_frame - partial, np.float32)
            self._pending = np.concatenate([self._pending, silence])
        await self._capture_whole_frames(generation)

    def interrupt(self) -> None:
        """Barge-in: drop the audio queued in the source and whatever has not been pushed yet."""
        self._generation += 1
        self._resampler.reset()
        self._pending = np.zeros(0, np.float32)
        self.source.clear_queue()

    async def connect(self, url: str, token: str) -> rtc.Room:
        """Join the room at ``url`` as the participant ``token`` names."""
        from livekit import rtc

        room = rtc.Room()
        await room.connect(url, token)
        self.room = room
        return room

    async def publish(self) -> rtc.LocalTrackPublication:
        """Publish the voice track as this participant's microphone."""
        if self.room is None:
            raise RuntimeError("LiveKitPublisher.publish() needs connect(url, token) first")
        from livekit import rtc

        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        self.publication = await self.room.local_participant.publish_track(self.track, options)
        return self.publication

    async def aclose(self) -> None:
        """Leave the room and release the audio source."""
        self.interrupt()
        if self.room is not None:
            await self.room.disconnect()
            self.room = None
        await self.source.aclose()

    async def _capture_whole_frames(self, generation: int) -> None:
        from livekit import rtc

        size = self.samples_per_frame
        while len(self._pending) >= size and self._generation == generation:
            samples, self._pending = self._pending[:size], self._pending[size:]
            pcm = Audio(_clipped(samples), self.source_rate).to_pcm16()
            frame = rtc.AudioFrame(pcm, self.source_rate, 1, size)
            if self.frame_tap is not None:
                self.frame_tap(frame)
            await self.source.capture_frame(frame)
            self.frames_captured += 1


def participant_token(
    identity: str,
    room: str,
    *,
    api_key: str,
    api_secret: str,
    can_subscribe: bool = True,
    ttl_s: int = 3600,
) -> str:
    """A LiveKit access token (JWT) letting ``identity`` join ``room`` and publish its microphone, no more."""
    try:
        from livekit import api
    except ImportError as error:
        raise ImportError(
            "participant_token needs the livekit-api package: pip install livekit-api"
        ) from error
    required = {"identity": identity, "room": room, "api_key": api_key, "api_secret": api_secret}
    for name, value in required.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"participant_token needs a non-empty {name}, got {value!r}")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_publish_sources=["microphone"],
        can_publish_data=False,
        can_subscribe=can_subscribe,
    )
    return (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_ttl(timedelta(seconds=ttl_s))
        .with_grants(grants)
        .to_jwt()
    )
