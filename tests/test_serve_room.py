"""`turnflow serve` in a real LiveKit room: a person names a persona, and that persona answers by voice.

Needs a LiveKit server (LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET) and the embedded llama-server;
skipped, saying which is missing, without them. Everything here is real: the room, the tracks, the
turn (pocketsphinx hears the person, the tiny model answers, espeak-ng speaks the reply).

The persona named (Maya) is also the last one addressed, so the answer does not hang on pocketsphinx
catching the name in espeak-ng speech that went through Opus; choosing by name on real speech is
tested in ``test_serve.py``. Maya is not the listening persona, so her own connection must publish.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPE
from livekit import rtc

from turnflow.nodes.media import Audio
from turnflow.nodes.publish import LiveKitPublisher, participant_token
from turnflow.nodes.speech import EspeakTts, TtsVoice
from turnflow.serve import LiveKitCredentials, RoomAgent, persona_identity
from turnflow.session import Session

pytestmark = pytest.mark.livekit

_NEEDED = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")


@pytest.fixture(scope="module")
def livekit() -> LiveKitCredentials:
    """The LiveKit server to test against, or a visible skip naming the variables to set."""
    missing = [name for name in _NEEDED if not os.environ.get(name)]
    if missing:
        pytest.skip(f"no LiveKit server configured: set {', '.join(missing)} to run this test")
    return LiveKitCredentials.from_env()


async def _subscribed_track(room: rtc.Room, identity: str, timeout_s: float = 20.0) -> rtc.Track:
    """The audio track ``identity`` publishes, once this participant is subscribed to it."""
    async with asyncio.timeout(timeout_s):
        while True:
            participant = room.remote_participants.get(identity)
            for publication in participant.track_publications.values() if participant else []:
                if publication.track is not None and publication.kind == rtc.TrackKind.KIND_AUDIO:
                    return publication.track
            await asyncio.sleep(0.1)


async def _count_loud_seconds(track: rtc.Track, loud_s: list[float], threshold: float = 0.02) -> None:
    """Add up, in ``loud_s[0]``, the seconds of audible audio received on ``track`` (runs until cancelled)."""
    stream = rtc.AudioStream.from_track(track=track, sample_rate=24000, num_channels=1)
    try:
        async for event in stream:
            samples = np.frombuffer(event.frame.data, np.int16).astype(np.float32) / 32768
            if samples.size and float(np.sqrt(np.mean(samples**2))) > threshold:
                loud_s[0] += event.frame.duration
    finally:
        await stream.aclose()


@pytest.mark.timeout(300)
def test_the_named_persona_answers_in_the_room(livekit: LiveKitCredentials, local_url: str, home: Path) -> None:
    room_name = f"turnflow-serve-{uuid.uuid4().hex[:8]}"
    said = EspeakTts().synthesize("Hey Maya, what is on the board today?", TtsVoice("en-us"))
    lines: list[str] = []

    async def scenario() -> None:
        session = await asyncio.to_thread(Session, RECIPE, backend="local")
        agent = RoomAgent(session, room_name, ["helper", "maya"], credentials=livekit, log=lines.append)
        person = LiveKitPublisher("alice-microphone")
        maya_loud_s, helper_loud_s = [0.0], [0.0]
        counting: list[asyncio.Task[None]] = []
        try:
            await agent.start()
            agent.last_addressed = "maya"
            token = participant_token(
                "person-alice", room_name, api_key=livekit.api_key, api_secret=livekit.api_secret, ttl_s=300
            )
            room = await asyncio.wait_for(person.connect(livekit.url, token), timeout=20)
            await asyncio.wait_for(person.publish(), timeout=20)
            for persona, loud_s in (("maya", maya_loud_s), ("helper", helper_loud_s)):
                track = await _subscribed_track(room, persona_identity(persona))
                counting.append(asyncio.create_task(_count_loud_seconds(track, loud_s)))

            quiet = np.zeros(24000, np.float32)
            await person.push(Audio(quiet[:12000], 24000))
            await person.push(said)
            for _ in range(3):  # 1.5 s of silence: the end of alice's turn
                await person.push(Audio(quiet[:12000], 24000))
            await person.flush()

            async with asyncio.timeout(240):  # the first turn prefills the whole prompt on the tiny model
                while not any(line.startswith("turn 1 ") for line in lines):
                    await asyncio.sleep(0.2)
            await agent.replies_sent()
            await asyncio.sleep(2.0)  # the last second queued in the source plays out
        finally:
            for task in counting:
                task.cancel()
            await asyncio.gather(*counting, return_exceptions=True)
            await person.aclose()
            await agent.aclose()
            await asyncio.to_thread(session.close)
        turn_line = next(line for line in lines if line.startswith("turn 1 "))
        assert "person-alice -> maya" in turn_line and "audio in stt" in turn_line, lines
        assert maya_loud_s[0] > 0.3, f"heard {maya_loud_s[0]:.2f} s of maya's reply; log: {lines}"
        assert helper_loud_s[0] == 0.0, f"helper spoke for {helper_loud_s[0]:.2f} s; log: {lines}"

    asyncio.run(scenario())
