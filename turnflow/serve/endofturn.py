"""One person's turns cut out of a stream of audio: speech starts, and the turn ends after enough silence."""

from __future__ import annotations

import numpy as np

from turnflow.nodes.media import VAD_RATE, Audio, SpeechFrames


class EndOfTurnDetector:
    """One person's turns cut out of a stream of audio (webrtcvad at 16 kHz).

    Speech starts after ``start_speech_ms`` of consecutive voiced frames; the turn ends after
    ``end_of_turn_silence_ms`` of silence, or when it reaches ``max_utterance_s``. Utterances come out at
    the rate of the first chunk pushed, from ``padding_ms`` before the first voiced frame to ``padding_ms``
    after the last one.
    """

    def __init__(
        self,
        end_of_turn_silence_ms: int = 700,
        *,
        start_speech_ms: int = 150,
        padding_ms: int = 200,
        aggressiveness: int = 2,
        frame_ms: int = 30,
        max_utterance_s: float = 60.0,
    ) -> None:
        self._frames = SpeechFrames(aggressiveness, frame_ms)
        if end_of_turn_silence_ms < frame_ms:
            raise ValueError(f"end_of_turn_silence_ms must be at least one frame ({frame_ms} ms), "
                             f"got {end_of_turn_silence_ms!r}")
        if start_speech_ms < frame_ms or padding_ms < 0 or max_utterance_s <= 0:
            raise ValueError(
                f"need start_speech_ms >= frame_ms, padding_ms >= 0 and max_utterance_s > 0; got "
                f"start_speech_ms={start_speech_ms!r}, padding_ms={padding_ms!r}, max_utterance_s={max_utterance_s!r}"
            )
        self.end_of_turn_silence_ms = end_of_turn_silence_ms
        self.frame_ms = frame_ms
        self.padding_s = padding_ms / 1000
        self.max_utterance_s = max_utterance_s
        self._start_frames = -(-start_speech_ms // frame_ms)
        self._end_frames = -(-end_of_turn_silence_ms // frame_ms)
        self._rate: int | None = None
        self._samples_in = 0  # original-rate samples pushed so far
        self._vad_samples_in = 0  # 16 kHz samples made from them (kept in step, no drift)
        self._vad_pcm = bytearray()
        self._frames_decided = 0
        self._chunks: list[np.ndarray] = []
        self._buffer_start = 0  # original-rate index of the first buffered sample
        self._speaking = False
        self._voiced_run = 0
        self._start_s = 0.0
        self._last_voiced_frame_end = 0
        self._silent_frames = 0
        self._voiced_frames = 0

    @property
    def speaking(self) -> bool:
        """Whether a person is in the middle of a turn (speech started, end not reached yet)."""
        return self._speaking

    @property
    def speech_ms(self) -> int:
        """Voiced milliseconds in the turn under way (0 between turns)."""
        return self._voiced_frames * self.frame_ms if self._speaking else 0

    def push(self, audio: Audio) -> list[Audio]:
        """Feed the next chunk of the stream; returns the utterances whose turn ended in it (usually none)."""
        if self._rate is None:
            self._rate = audio.sample_rate
        if audio.sample_rate != self._rate:
            audio = audio.resampled(self._rate)
        if not audio.samples.size:
            return []
        self._chunks.append(audio.samples)
        self._samples_in += audio.samples.size
        self._vad_pcm += self._for_vad(audio).to_pcm16()
        whole = len(self._vad_pcm) - len(self._vad_pcm) % self._frames.frame_bytes
        pcm = bytes(self._vad_pcm[:whole])
        del self._vad_pcm[:whole]
        ended: list[Audio] = []
        for voiced in self._frames.voiced(pcm):
            utterance = self._decide(voiced)
            if utterance is not None:
                ended.append(utterance)
        return ended

    def flush(self) -> Audio | None:
        """End the stream: the turn under way, if any, as an utterance."""
        if not self._speaking:
            return None
        return self._end_turn()

    def _for_vad(self, audio: Audio) -> Audio:
        """The chunk at 16 kHz, trimmed or padded so the 16 kHz stream keeps exact step with the original."""
        assert self._rate is not None
        converted = audio.resampled(VAD_RATE).samples
        wanted = self._samples_in * VAD_RATE // self._rate - self._vad_samples_in
        if converted.size > wanted:
            converted = converted[:wanted]
        elif converted.size < wanted:
            converted = np.concatenate([converted, np.zeros(wanted - converted.size, np.float32)])
        self._vad_samples_in += wanted
        return Audio(np.ascontiguousarray(converted), VAD_RATE)

    def _decide(self, voiced: bool) -> Audio | None:
        index = self._frames_decided
        self._frames_decided += 1
        frame_s = self.frame_ms / 1000
        if not self._speaking:
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run < self._start_frames:
                self._forget_before(self._frames_decided * frame_s - self._start_frames * frame_s - self.padding_s)
                return None
            self._speaking = True
            self._start_s = max(0.0, (index - self._start_frames + 1) * frame_s - self.padding_s)
            self._voiced_frames = self._start_frames
            self._last_voiced_frame_end = index + 1
            self._silent_frames = 0
            return None
        if voiced:
            self._voiced_frames += 1
            self._last_voiced_frame_end = index + 1
            self._silent_frames = 0
        else:
            self._silent_frames += 1
        too_long = self._frames_decided * frame_s - self._start_s >= self.max_utterance_s
        if self._silent_frames >= self._end_frames or too_long:
            return self._end_turn()
        return None

    def _end_turn(self) -> Audio:
        assert self._rate is not None
        heard_s = self._frames_decided * self.frame_ms / 1000
        end_s = min(heard_s, self._last_voiced_frame_end * self.frame_ms / 1000 + self.padding_s)
        start, end = round(self._start_s * self._rate), round(end_s * self._rate)
        buffered = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        samples = buffered[max(0, start - self._buffer_start) : max(0, end - self._buffer_start)]
        self._speaking = False
        self._voiced_run = 0
        self._voiced_frames = 0
        self._silent_frames = 0
        self._chunks = [buffered]
        self._forget_before(end_s)
        return Audio(np.ascontiguousarray(samples), self._rate)

    def _forget_before(self, seconds: float) -> None:
        """Drop buffered chunks that end before ``seconds`` into the stream (they can no longer be needed)."""
        assert self._rate is not None
        keep_from = round(max(0.0, seconds) * self._rate)
        while self._chunks and self._buffer_start + self._chunks[0].size <= keep_from:
            self._buffer_start += self._chunks.pop(0).size
