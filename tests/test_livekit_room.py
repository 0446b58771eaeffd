"""A persona's voice published into a real LiveKit room.

Needs a LiveKit server: LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET; skipped, saying so, without.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest
from livekit import rtc

from turnflow.nodes.media import Audio
from turnflow.nodes.publish import LiveKitPublisher, participant_token

_NEEDED = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
_MISSING = [name for name in _NEEDED if not os.environ.get(name)]

pytestmark = [
    pytest.mark.livekit,
    pytest.mark.skipif(
        bool(_MISSING), reason=f"no LiveKit server configured: set {', '.join(_MISSING)} to run this test"
    ),
]


def test_persona_voice_is_published_as_a_microphone_track() -> None:
    async def scenario() -> None:
        identity, room_name = f"persona-{uuid.uuid4().hex[:8]}", f"turnflow-test-{uuid.uuid4().hex[:8]}"
        token = participant_token(
            identity,
            room_name,
            api_key=os.environ["LIVEKIT_API_KEY"],
            api_secret=os.environ["LIVEKIT_API_SECRET"],
            ttl_s=300,
        )
        publisher = LiveKitPublisher(f"{identity}-voice")
        try:
            room = await asyncio.wait_for(publisher.connect(os.environ["LIVEKIT_URL"], token), timeout=20)
            assert room.isconnected()
            assert room.local_participant.identity == identity

            publication = await asyncio.wait_for(publisher.publish(), timeout=20)
            assert publication.sid
            assert publication.source == rtc.TrackSource.SOURCE_MICROPHONE
            assert room.local_participant.track_publications[publication.sid].name == f"{identity}-voice"

            time_s = np.arange(12000) / 24000
            await publisher.push(Audio((0.2 * np.sin(2 * np.pi * 330 * time_s)).astype(np.float32), 24000))
            await publisher.flush()
            assert publisher.frames_captured == 25
            await publisher.source.wait_for_playout()
        finally:
            await publisher.aclose()

    asyncio.run(scenario())
