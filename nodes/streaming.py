"""The streamed reply as it is spoken: cut into sentences, recorded as it plays, and what listeners heard of it.

:class:`SentenceSplitter` cuts a streamed reply into sentences so speech can start before the reply ends;
:class:`SpokenReply` keeps the reply's audio with when each part became ready; :func:`words_heard` says how much
of a reply cut short (barge-in) was heard. The engines that hear and speak are in :mod:`.speech`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .llm import ChatReply
from .media import Audio

__all__ = ["SentenceSplitter", "SpokenReply", "words_heard"]


class SentenceSplitter:
    """Cuts a streamed reply into sentences for TTS, giving the same sentences however the text is chunked.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (with any closing quotes or brackets) followed by
    whitespace, or at a newline. Abbreviations (Dr., Mr., e.g., i.e., U.S.), initials (J. Smith) and
    decimals (3.14) do not end a sentence. A sentence of fewer than ``min_words`` words is held and
    spoken together with the next one, so TTS never says a lone "Sure."
    """

    ABBREVIATIONS = frozenset(
        {"mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "vs.", "cf.", "approx.", "fig."}
    )
    _TERMINATORS = ".!?…"
    _CLOSERS = "\"')]}”’»"

    def __init__(self, min_words: int = 2) -> None:
        if min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {min_words!r}")
        self.min_words = min_words
        self._buffer = ""
        self._checked = 0  # buffer[:_checked] holds no sentence end
        self._held = ""

    def feed(self, delta: str) -> list[str]:
        """Add streamed text; returns the sentences it completed, in order."""
        self._buffer += delta
        sentences: list[str] = []
        while (end := self._next_sentence_end()) is not None:
            sentence, self._buffer, self._checked = self._buffer[:end], self._buffer[end:], 0
            sentences += self._emit(sentence)
        return sentences

    def flush(self) -> list[str]:
        """The text not yet returned, as a last sentence (empty list when there is none)."""
        rest = " ".join(part for part in (self._held, self._buffer.strip()) if part)
        self._buffer, self._checked, self._held = "", 0, ""
        return [rest] if rest else []

    def _emit(self, sentence: str) -> list[str]:
        sentence = " ".join(part for part in (self._held, sentence.strip()) if part)
        if len(sentence.split()) < self.min_words:
            self._held = sentence
            return []
        self._held = ""
        return [sentence]

    def _next_sentence_end(self) -> int | None:
        """Index just past the first complete sentence in the buffer, or None if more text is needed."""
        text, index = self._buffer, self._checked
        while index < len(text):
            char = text[index]
            if char in "\r\n":
                return index + 1
            if char not in self._TERMINATORS:
                index += 1
                continue
            after = index + 1
            while after < len(text) and (text[after] in self._TERMINATORS or text[after] in self._CLOSERS):
                after += 1
            if after == len(text):
                self._checked = index  # whether this ends a sentence depends on the next character
                return None
            if text[after].isspace() and not self._is_abbreviation(text[: index + 1]):
                return after
            index = after
        self._checked = len(text)
        return None

    def _is_abbreviation(self, text_through_period: str) -> bool:
        if not text_through_period.endswith("."):
            return False
        word = text_through_period.rsplit(None, 1)[-1].lstrip("\"'([{“‘«").lower()
        if word in self.ABBREVIATIONS:
            return True
        letters = word.split(".")[:-1]
        # Initials and dotted abbreviations: "J.", "e.g.", "i.e.", "U.S.", "a.m."
        return bool(letters) and all(len(letter) == 1 and letter.isalpha() for letter in letters)


@dataclass
class SpokenReply:
    """The reply's audio as it was produced, with when each part became ready, and the finished reply."""

    route: str
    chunks: list[Audio] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    first_audio_ms: float | None = None
    tts_ttfb_ms: float | None = None
    #: How many characters of the reply the model had streamed when the first audio went to the sink.
    first_audio_at_char: int | None = None
    #: The finished reply, once the stream this was spoken from has been read to its end.
    reply: ChatReply | None = None
    _audio: Audio | None = field(default=None, init=False, repr=False, compare=False)

    def add(
        self, audio: Audio, sentence: str, *, asked: float | None, turn_started: float, sink: Any,
        streamed_chars: int,
    ) -> None:
        """Record one chunk of reply audio and hand it to the sink at once."""
        now = time.perf_counter()
        if self.first_audio_ms is None:
            self.first_audio_ms = (now - turn_started) * 1000
            self.first_audio_at_char = streamed_chars
            if asked is not None:
                self.tts_ttfb_ms = (now - asked) * 1000
        self.chunks.append(audio)
        self._audio = None
        if sentence:
            self.sentences.append(sentence)
            if not audio.caption:
                audio = replace(audio, caption=sentence)
        if sink is not None:
            sink(audio)

    @property
    def audio(self) -> Audio | None:
        """The whole reply audio, at the first chunk's rate (joined once, when first asked for)."""
        if not self.chunks:
            return None
        if self._audio is None:
            rate = self.chunks[0].sample_rate
            self._audio = Audio(np.concatenate([c.resampled(rate).samples for c in self.chunks]), rate)
        return self._audio

    @property
    def duration_s(self) -> float:
        """Seconds of reply audio, without joining it."""
        return sum(len(c.samples) / c.sample_rate for c in self.chunks)


def words_heard(captioned: Sequence[tuple[float, str]], played_s: float) -> str:
    """What listeners heard of a reply cut after `played_s` seconds of audio.

    `captioned` is the reply's audio as it was sent, as (duration in seconds, caption) per chunk. Chunks
    played to the end count whole; of the chunk playing at the cut, the share of its words that its
    played share of time covers (speech runs at a roughly even pace within a sentence).
    """
    heard: list[str] = []
    start = 0.0
    for duration, caption in captioned:
        words = caption.split()
        if start + duration <= played_s:
            heard.extend(words)
        elif played_s > start and duration > 0:
            heard.extend(words[: int(len(words) * (played_s - start) / duration)])
            break
        else:
            break
        start += duration
    return " ".join(heard)
