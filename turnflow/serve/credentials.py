"""Where the LiveKit server is, the key pair that signs the personas' tokens, and who the personas join as."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_IDENTITY_PREFIX = "persona-"


class RoomConnectError(RuntimeError):
    """A persona could not join the LiveKit room."""


class MissingCredentialsError(ValueError):
    """LiveKit settings absent from the environment."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        super().__init__(
            f"set {', '.join(self.missing)} to join a LiveKit room "
            "(the server's URL, e.g. wss://example.livekit.cloud, and an API key and secret it accepts)"
        )


@dataclass(frozen=True)
class LiveKitCredentials:
    """Where the LiveKit server is, and the API key pair that signs the personas' tokens."""

    url: str
    """The server's URL (``ws://``, ``wss://`` or ``https://``)."""
    api_key: str
    """An API key the server accepts."""
    api_secret: str
    """That key's secret."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LiveKitCredentials:
        """Read ``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and ``LIVEKIT_API_SECRET``; every missing one is named."""
        environ = os.environ if environ is None else environ
        names = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
        missing = [name for name in names if not environ.get(name, "").strip()]
        if missing:
            raise MissingCredentialsError(missing)
        url, api_key, api_secret = (environ[name].strip() for name in names)
        return cls(url=url, api_key=api_key, api_secret=api_secret)


def persona_identity(persona_id: str) -> str:
    """The LiveKit participant identity a persona joins as."""
    return f"{_IDENTITY_PREFIX}{persona_id}"
