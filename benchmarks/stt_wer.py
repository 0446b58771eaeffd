"""Word error rate of the STT bridges on espeak-ng utterances (the demo's lines): pocketsphinx vs Whisper base.

    .venv/bin/python benchmarks/stt_wer.py            # prints a table; needs espeak-ng and the whisper extra
"""

from __future__ import annotations

import re
import shutil
import sys
import time

UTTERANCES = [
    "Morning Maya, what's on the sprint board today?",
    "Anything blocked on the payments migration?",
    "Helper, what's the weather like for the offsite?",
    "Maya, please move the retro to Thursday.",
    "And convert twenty miles to kilometres.",
    "Thanks, let's wrap up the standup.",
    "The quick brown fox jumps over the lazy dog.",
]

_NUMBERS = {"20": "twenty", "kilometers": "kilometres", "off-site": "offsite", "stand-up": "standup"}


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, a few spellings made one (20/twenty, kilometers/kilometres)."""
    text = text.lower().replace("’", "'")
    for a, b in _NUMBERS.items():
        text = text.replace(a, b)
    return re.findall(r"[a-z0-9']+", text)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / max(len(ref), 1)


def measure(engine: object, audios: list[object]) -> tuple[float, float, list[str]]:
    """(mean WER, seconds for all, transcripts) of one engine over the utterances."""
    started = time.perf_counter()
    heard = [engine.transcribe(audio) for audio in audios]  # type: ignore[attr-defined]
    seconds = time.perf_counter() - started
    return sum(wer(u, h) for u, h in zip(UTTERANCES, heard, strict=True)) / len(UTTERANCES), seconds, heard


def main() -> int:
    from turnflow.nodes.speech import EspeakTts, PocketsphinxStt, TtsVoice, WhisperStt

    if shutil.which("espeak-ng") is None:
        print("espeak-ng is not installed (apt-get install espeak-ng)", file=sys.stderr)
        return 2
    tts = EspeakTts()
    audios = [tts.synthesize(u, TtsVoice(voice="en-us+f4", rate_wpm=150)) for u in UTTERANCES]
    rows = []
    for name, make in (("pocketsphinx", PocketsphinxStt), ("whisper base int8 beam 1", WhisperStt)):
        engine = make()
        mean, seconds, heard = measure(engine, audios)
        rows.append((name, mean, seconds, engine.load_time_s))
        for said, got in zip(UTTERANCES, heard, strict=True):
            print(f"  {name:>24}: {said!r} -> {got!r} (WER {wer(said, got):.2f})")
    print(f"\n{'engine':>24} | {'WER':>5} | {'s for all':>9} | {'load s':>6}")
    for name, mean, seconds, load in rows:
        print(f"{name:>24} | {mean:5.2f} | {seconds:9.1f} | {load:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
