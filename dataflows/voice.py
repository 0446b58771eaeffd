"""The turn DAG's voice nodes: audio and images in, the hearing and seeing routes, the speaking route.

Routes are chosen when the driver is built, from what the backend reports it can do:

- `route_audio_in=native`: the model hears; the speaker's audio goes in as an `input_audio` part, no STT.
- `route_audio_in=stt`: a text-only model; the STT bridge transcribes the audio once.
- `route_images_in=native`: the model sees; images go in as `image_url` parts. `describe`: the
  description bridge puts each image into words once.
- `route_audio_out=native`: the model speaks; its audio deltas are played as they arrive, no TTS.
- `route_audio_out=tts`: the TTS bridge speaks each sentence in the persona's voice as soon as the
  sentence exists, while the model keeps generating.

`speech` is the one node that reads the model's reply stream, to its end (so its time is the model call's
and the speaking's); `reply` is the finished reply it hands on.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import numpy as np
from hamilton.function_modifiers import config

from turnflow.adapters import AdapterRegistry, AdapterSet
from turnflow.nodes.fingerprint import voice_fingerprint as fingerprint
from turnflow.nodes.images import Image, ImageError, load_image
from turnflow.nodes.llm import ChatReply, Delta, ReplyStream
from turnflow.nodes.media import Audio, decode_input_audio, load_audio, normalise
from turnflow.nodes.speech import SpeechBridges, TtsVoice
from turnflow.nodes.streaming import SentenceSplitter, SpokenReply
from turnflow.nodes.text import neutralise_control_tokens
from turnflow.recipe import Persona, Recipe, TtsProfile
from turnflow.store import ConversationStore, StoredMessage, UserContent

_log = logging.getLogger("turnflow")

#: Models that speak stream 24 kHz mono PCM16 (OpenAI's `pcm16` audio format).
NATIVE_AUDIO_RATE = 24000


def media(audio_in: Any, recipe: Recipe) -> Audio | None:
    """The speaker's audio as mono 16 kHz float32 with silence trimmed; None for a text turn."""
    if audio_in is None:
        return None
    limit = recipe.media.max_audio_s
    if isinstance(audio_in, dict):  # an OpenAI input_audio part from a client
        audio = decode_input_audio(str(audio_in.get("data", "")), str(audio_in.get("format", "")),
                                   max_duration_s=limit)
    elif isinstance(audio_in, Audio):
        audio = audio_in
    else:
        audio = load_audio(audio_in, max_duration_s=limit)
    return normalise(audio) if recipe.media.trim_silence else audio.resampled(16000)


@config.when(route_audio_in="native")
def transcript__native(media: Audio | None) -> str | None:
    """No transcript: the model hears the audio itself."""
    return None


@config.when(route_audio_in="stt")
def transcript__stt(media: Audio | None, speech_bridges: SpeechBridges, transcript_in: str | None) -> str | None:
    """The STT bridge's transcript of the speaker's audio (None for a text turn).

    A caller that already transcribed the audio once (a room agent choosing who answers) passes it in.
    """
    if media is None:
        return None
    return transcript_in if transcript_in is not None else speech_bridges.stt.transcribe(media)


def images(images_in: Any) -> list[Image]:
    """The images the speaker shared this turn (none for most turns)."""
    return [load_image(item) for item in (images_in or [])]


@config.when(route_images_in="native")
def image_parts__native(images: list[Image]) -> tuple[dict[str, Any], ...]:
    """Each image as an `image_url` part: the model sees it."""
    return tuple({"type": "image_url", "image_url": {"url": image.data_url}} for image in images)


@config.when(route_images_in="describe")
def image_parts__describe(images: list[Image], speech_bridges: SpeechBridges) -> tuple[dict[str, Any], ...]:
    """Each image put into words by the description bridge, for a model that does not see."""
    if not images:
        return ()
    describer = speech_bridges.describer
    if describer is None:
        raise ImageError(
            "this backend's model does not see images and the recipe has no description bridge; "
            "add speech: {describe: {url: ..., model: ...}} or use a backend that sees"
        )
    return tuple(
        {"type": "text", "text": f"[image {neutralise_control_tokens(image.name)}: "
                                 f"{neutralise_control_tokens(describer.describe(image))}]"}
        for image in images
    )


@config.when(route_audio_in="native")
def user_content__native(
    text_in: str | None, media: Audio | None, image_parts: tuple[dict[str, Any], ...], transcript_in: str | None,
) -> UserContent:
    """What the speaker said: their audio as an `input_audio` part (plus any text), control tokens defused. A
    transcript the caller already made (a room agent choosing who answers) is kept with it, not sent: the model
    hears the audio, and a persona whose model does not hear reads the transcript later."""
    text = neutralise_control_tokens(text_in or "")
    if media is None:
        return UserContent(text=text, parts=image_parts)
    part = {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(media.to_wav_bytes()).decode(), "format": "wav"}}
    kept = neutralise_control_tokens(transcript_in) if transcript_in else None
    return UserContent(text=text, parts=(part, *image_parts), transcript=kept)


@config.when(route_audio_in="stt")
def user_content__stt(
    text_in: str | None, transcript: str | None, image_parts: tuple[dict[str, Any], ...]
) -> UserContent:
    """What the speaker said, as text: the transcript of their audio, or their text."""
    text = transcript if transcript is not None else (text_in or "")
    return UserContent(text=neutralise_control_tokens(text), parts=image_parts, transcript=transcript)


class HistoryStt:
    """The words of past audio that a model heard itself and no one wrote down (a person talking to a persona whose
    model hears), for a model that does not hear: the STT bridge transcribes each such message once, when a persona
    first sees it, and the store keeps the transcript for every persona and process after it. Its time is STT
    time, not turnflow's own (`ms`, `count`)."""

    def __init__(self, bridges: SpeechBridges, store: ConversationStore, max_audio_s: float):
        self._bridges, self._store, self._max_audio_s = bridges, store, max_audio_s
        self.ms = 0.0
        self.count = 0

    def __call__(self, message: StoredMessage) -> str:
        kept = self._store.transcript_of(message.id)
        if kept is not None:
            return kept
        part = message.unheard_audio or {}
        started = time.perf_counter()
        try:
            audio = decode_input_audio(str(part.get("data", "")), str(part.get("format", "")),
                                       max_duration_s=self._max_audio_s)
            words = neutralise_control_tokens(self._bridges.stt.transcribe(audio))
        except Exception as exc:  # the history still renders ("[voice message]"); the next process tries again
            _log.warning("turnflow: could not transcribe the audio of message %s for a model that does not hear: "
                         "%s: %s", message.id, type(exc).__name__, exc)
            return ""
        finally:
            self.ms += (time.perf_counter() - started) * 1000
            self.count += 1
        return self._store.keep_transcript(message.id, words)


def history_stt(
    hears: bool, speech_bridges: SpeechBridges, store: ConversationStore, recipe: Recipe
) -> HistoryStt | None:
    """For a model that does not hear: the transcripts of past audio another persona's model heard itself (None
    when this one hears: it gets the audio)."""
    return None if hears else HistoryStt(speech_bridges, store, recipe.media.max_audio_s)


def hears(route_audio_in: str) -> bool:
    """Whether the backend's model hears audio itself."""
    return route_audio_in == "native"


def tts_voice(persona: Persona, adapter_set: AdapterSet, adapter_registry: AdapterRegistry) -> TtsVoice:
    """The persona's voice for the TTS bridge: its voice-profile adapter when it has one, else its `voice.tts`."""
    voice = adapter_set.voice
    if voice is not None and voice.manifest.format == "tts-profile":
        tts = TtsProfile.model_validate(adapter_registry.profile(voice.manifest))
    else:
        tts = persona.voice.tts
    return TtsVoice(voice=tts.voice, pitch=tts.pitch, rate_wpm=tts.rate_wpm, model=tts.model, speed=tts.speed)


@config.when(route_audio_out="tts")
def speech__tts(
    reply_stream: ReplyStream, speech_bridges: SpeechBridges, tts_voice: TtsVoice, audio_sink: Any,
    turn_started: float,
) -> SpokenReply:
    """The reply stream read to its end, spoken sentence by sentence by the TTS bridge while the model keeps
    generating."""
    spoken = SpokenReply(route="tts" if audio_sink is not None else "none")
    splitter = SentenceSplitter()

    def speak(sentences: list[str]) -> None:
        for sentence in sentences:
            asked = time.perf_counter()
            audio = speech_bridges.tts.synthesize(sentence, tts_voice)
            spoken.add(audio, sentence, asked=asked, turn_started=turn_started, sink=audio_sink,
                       streamed_chars=reply_stream.streamed_chars)

    for delta in reply_stream:
        if audio_sink is not None and delta.text and not reply_stream.cancelled:
            speak(splitter.feed(delta.text))
    if audio_sink is not None and not reply_stream.cancelled:  # a cut reply says nothing more
        speak(splitter.flush())
    spoken.reply = reply_stream.reply
    return spoken


@config.when(route_audio_out="native")
def speech__native(reply_stream: ReplyStream, audio_sink: Any, turn_started: float) -> SpokenReply:
    """The reply stream read to its end, the model's own audio played as it streams; no TTS."""
    spoken = SpokenReply(route="native" if audio_sink is not None else "none")
    words = ""  # the transcript streamed since the last audio chunk: that chunk's caption
    for delta in reply_stream:
        words += delta.text
        audio = _pcm16_delta(delta, caption=words)
        if audio is not None and audio_sink is not None:
            spoken.add(audio, "", asked=None, turn_started=turn_started, sink=audio_sink,
                       streamed_chars=reply_stream.streamed_chars)
            words = ""
    spoken.reply = reply_stream.reply
    return spoken


def _pcm16_delta(delta: Delta, caption: str = "") -> Audio | None:
    if not delta.audio_b64:
        return None
    pcm = np.frombuffer(base64.b64decode(delta.audio_b64), dtype="<i2")
    return Audio((pcm.astype(np.float32) / 32768.0), NATIVE_AUDIO_RATE, caption=caption) if pcm.size else None


def voice_fingerprint(speech: SpokenReply) -> dict[str, Any] | None:
    """How the spoken reply sounds (median F0, spectral centroid, mean MFCCs); None when nothing was spoken."""
    audio = speech.audio
    found = fingerprint(audio) if audio is not None else None
    return found.as_dict() if found is not None else None


def reply(speech: SpokenReply) -> ChatReply:
    """The finished reply, as `speech` read it from the stream (the one place the stream is read)."""
    if speech.reply is None:
        raise RuntimeError("the speech node returned without reading the reply stream to its end")
    return speech.reply
