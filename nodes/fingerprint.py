"""Voice fingerprints: a few numbers that say how a spoken reply sounds, to check a persona sounds like itself.

A fingerprint is the median fundamental frequency (F0, Hz) of the voiced frames, their mean spectral
centroid (Hz) and a short mean-MFCC vector (coefficients 1-12: the spectral envelope, i.e. the timbre),
all computed with numpy from the reply's audio. `fingerprint_distance` compares two: the same voice
saying different sentences lands near itself; different voices land far apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .media import Audio

RATE = 16000
FRAME = 400  # 25 ms
HOP = 160  # 10 ms
PITCH_FRAME = 640  # 40 ms: two periods of a 50 Hz voice
N_FFT = 512
N_MELS = 26
N_MFCC = 12
F0_RANGE_HZ = (60.0, 400.0)


@dataclass(frozen=True)
class VoiceFingerprint:
    """How a stretch of speech sounds: pitch, brightness and timbre."""

    f0_hz: float | None
    """Median fundamental frequency of the voiced frames (None when nothing was voiced)."""
    centroid_hz: float
    """Mean spectral centroid of the voiced frames."""
    mfcc: tuple[float, ...]
    """Mean MFCCs 1-12 of the voiced frames."""
    voiced_s: float
    """Seconds of voiced speech the numbers come from."""

    def as_dict(self) -> dict[str, Any]:
        """The fingerprint for the turn report, rounded."""
        data = asdict(self)
        data["f0_hz"] = None if self.f0_hz is None else round(self.f0_hz, 1)
        data["centroid_hz"] = round(self.centroid_hz, 1)
        data["mfcc"] = [round(x, 3) for x in self.mfcc]
        data["voiced_s"] = round(self.voiced_s, 2)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VoiceFingerprint:
        """A fingerprint read back from a report."""
        return cls(data.get("f0_hz"), float(data["centroid_hz"]), tuple(data["mfcc"]), float(data["voiced_s"]))


@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    """Triangular mel filters, (N_MELS, N_FFT // 2 + 1)."""
    def mel(hz: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(0.0), mel(RATE / 2), N_MELS + 2))
    bins = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    filters = np.zeros((N_MELS, bins.size), dtype=np.float64)
    for i in range(N_MELS):
        low, centre, high = edges[i], edges[i + 1], edges[i + 2]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        filters[i] = np.clip(np.minimum(rising, falling), 0.0, None)
    return filters


@lru_cache(maxsize=1)
def _dct() -> np.ndarray:
    """DCT-II basis for coefficients 1..N_MFCC over N_MELS log energies, (N_MFCC, N_MELS)."""
    n = np.arange(N_MELS)
    k = np.arange(1, N_MFCC + 1)[:, None]
    return np.sqrt(2.0 / N_MELS) * np.cos(np.pi * k * (n + 0.5) / N_MELS)


def _frames(samples: np.ndarray, size: int) -> np.ndarray:
    """Frames of `size` samples every HOP, as a read-only view of `samples` (no copy); at least `size` samples."""
    return np.lib.stride_tricks.sliding_window_view(samples, size)[::HOP]


def _f0s(frames: np.ndarray) -> np.ndarray:
    """F0 of each frame by normalised autocorrelation (NaN where a frame is not periodic enough)."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    energy = np.einsum("ij,ij->i", frames, frames)
    low, high = int(RATE / F0_RANGE_HZ[1]), int(RATE / F0_RANGE_HZ[0])
    # zero-padded to a power of two that keeps every lag up to `high` (and the one after it) free of wrap-around
    spectrum = np.fft.rfft(frames, 1 << (frames.shape[1] + high).bit_length(), axis=1)
    corr = np.fft.irfft(spectrum * np.conj(spectrum), axis=1)[:, : high + 1]
    corr /= np.maximum(energy, 1e-12)[:, None]
    lag = low + np.argmax(corr[:, low:high], axis=1)
    rows = np.arange(frames.shape[0])
    a, b, c = corr[rows, lag - 1], corr[rows, lag], corr[rows, lag + 1]
    denominator = a - 2 * b + c
    shift = np.where(denominator != 0, 0.5 * (a - c) / np.where(denominator != 0, denominator, 1), 0.0)
    return np.where((b >= 0.45) & (energy > 1e-9), RATE / (lag + shift), np.nan)


def voice_fingerprint(audio: Audio) -> VoiceFingerprint | None:
    """The fingerprint of some speech; None when it holds under 0.2 s of voiced frames."""
    samples = audio.resampled(RATE).samples.astype(np.float64)
    if samples.size < PITCH_FRAME:
        return None
    frames = _frames(samples, FRAME)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    if rms.max() <= 1e-6:
        return None
    voiced = rms > 0.1 * rms.max()  # within 20 dB of the loudest frame
    if voiced.sum() * HOP / RATE < 0.2:
        return None
    window = np.hamming(FRAME)
    power = np.abs(np.fft.rfft(frames[voiced] * window, N_FFT)) ** 2
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    magnitude = np.sqrt(power)
    centroid = float(np.mean((magnitude @ freqs) / np.maximum(magnitude.sum(axis=1), 1e-12)))
    log_mel = np.log(np.maximum(power @ _mel_filters().T, 1e-10))
    mfcc = (log_mel @ _dct().T).mean(axis=0)
    long_frames = _frames(samples, PITCH_FRAME)
    long_rms = np.sqrt(np.mean(long_frames**2, axis=1))
    pitches = _f0s(long_frames[long_rms > 0.1 * long_rms.max()])
    pitches = pitches[~np.isnan(pitches)]
    f0 = float(np.median(pitches)) if pitches.size >= 5 else None
    return VoiceFingerprint(f0, centroid, tuple(float(x) for x in mfcc), float(voiced.sum() * HOP / RATE))


def fingerprint_distance(a: VoiceFingerprint | dict[str, Any], b: VoiceFingerprint | dict[str, Any]) -> float:
    """How far apart two voices are: 0 for identical fingerprints, about 1 and more for different voices.

    The sum of three comparable parts: the pitch difference in semitones over 2, the centroid difference
    over 800 Hz (it moves with what is said), and the RMS difference of the MFCCs over 4 (their typical
    spread within one voice).
    """
    a = a if isinstance(a, VoiceFingerprint) else VoiceFingerprint.from_dict(a)
    b = b if isinstance(b, VoiceFingerprint) else VoiceFingerprint.from_dict(b)
    pitch = 0.0
    if a.f0_hz and b.f0_hz:
        pitch = abs(12.0 * math.log2(a.f0_hz / b.f0_hz)) / 2.0
    elif (a.f0_hz is None) != (b.f0_hz is None):
        pitch = 1.0
    centroid = abs(a.centroid_hz - b.centroid_hz) / 800.0
    mfcc = float(np.sqrt(np.mean((np.asarray(a.mfcc) - np.asarray(b.mfcc)) ** 2))) / 4.0
    return pitch + centroid + mfcc


SAME_VOICE = 2.0
"""Distances below this are the same voice: measured with espeak-ng, one voice saying different replies stays
under 0.8, and the example personas' voices are at least 3.2 apart."""
