"""`turnflow serve`: personas that live in a LiveKit room, listen to the people in it and answer by voice.

Each persona joins as its own participant (identity ``persona-<id>``) and publishes a microphone track.
The first persona's connection also listens: every person's audio track feeds an
:class:`EndOfTurnDetector`; when a person's turn ends, :func:`choose_persona` picks who answers (the
recipe's ``routing`` rule), the turn runs in a worker thread, and the reply is published through the
chosen persona's track as it is produced. A person who starts talking over a reply cuts it (barge-in).

The package's modules: `endofturn` (the detector), `routing` (who answers), `credentials` (the LiveKit
server and the personas' identities), `room` (the :class:`RoomAgent`) and `run` (the entry points).
"""

from turnflow.serve.credentials import LiveKitCredentials, MissingCredentialsError, RoomConnectError, persona_identity
from turnflow.serve.endofturn import EndOfTurnDetector
from turnflow.serve.room import RoomAgent, audio_from_frame
from turnflow.serve.room import turn_line as turn_line
from turnflow.serve.routing import choose_persona
from turnflow.serve.run import run_room_agent, serve_room

__all__ = [
    "EndOfTurnDetector",
    "LiveKitCredentials",
    "MissingCredentialsError",
    "RoomAgent",
    "RoomConnectError",
    "audio_from_frame",
    "choose_persona",
    "persona_identity",
    "run_room_agent",
    "serve_room",
]
