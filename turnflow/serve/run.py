"""`turnflow serve`'s entry points: serve personas in a room until told to stop, from async code or the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ParamSpec

from turnflow.serve.credentials import LiveKitCredentials
from turnflow.serve.room import RoomAgent, _log_to_stderr

_P = ParamSpec("_P")


async def serve_room(
    recipe: str | Path,
    *,
    room: str,
    personas: Sequence[str],
    credentials: LiveKitCredentials,
    backend: str | None = None,
    log: Callable[[str], None] = _log_to_stderr,
) -> int:
    """Serve ``personas`` in ``room`` until SIGINT or SIGTERM (or the room goes away); returns the exit code."""
    from turnflow.session import Session

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform / thread
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    session = await asyncio.to_thread(Session, recipe, backend=backend)
    agent = RoomAgent(session, room, personas, credentials=credentials, log=log, on_disconnected=stop.set)
    try:
        await agent.start()
        log(f"in room {room!r} as {', '.join(agent.identities)} on {credentials.url}; Ctrl-C to leave")
        await stop.wait()
        log("leaving the room")
    finally:
        await agent.aclose()
        await asyncio.to_thread(session.close)
        for signum in handled:
            loop.remove_signal_handler(signum)
    log(f"left room {room!r} after {agent.turns_run} turn(s)")
    return 0


def release_livekit_runtime() -> None:
    """Shut LiveKit's native runtime down now, while the interpreter is still whole.

    `livekit.rtc` disposes its native (Rust) runtime from an `atexit` handler. A runtime worker that calls back
    into a Python already finalizing aborts the process ("panic in a function that cannot unwind"), after the
    work is done but with a failing exit status. Called once nothing of LiveKit's is used any more (the end
    of `turnflow serve`, of a test session), the handler finds nothing left to do. Nothing happens when
    `livekit.rtc` never started its runtime in this process.
    """
    module = sys.modules.get("livekit.rtc._ffi_client")
    client = getattr(getattr(module, "FfiClient", None), "_instance", None)
    if client is not None:
        import gc

        gc.collect()  # drop the sources and tracks left, while their handles can still be released
        client._dispose()


def _blocking(serve: Callable[_P, Coroutine[Any, Any, int]]) -> Callable[_P, int]:
    """``serve`` as a blocking call that takes the same parameters (declared once, on ``serve``)."""

    @functools.wraps(serve, assigned=())  # only `__wrapped__`: help() and inspect show serve's parameters
    def run_room_agent(*args: _P.args, **kwargs: _P.kwargs) -> int:
        """Blocking entry point for the CLI: :func:`serve_room` in a fresh event loop (the same parameters)."""
        try:
            return asyncio.run(serve(*args, **kwargs))
        finally:
            release_livekit_runtime()

    return run_room_agent


run_room_agent = _blocking(serve_room)
