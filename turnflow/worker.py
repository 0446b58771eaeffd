"""`turnflow worker`: turnflow's room agent as a LiveKit Agents worker, sent to rooms by LiveKit's dispatcher.

The worker registers with the LiveKit server under an `agent_name` (explicit dispatch: a room gets the
personas when a token or `AgentDispatch.create_dispatch` asks for that name). LiveKit Agents runs each job
in a process of its own, reports the worker's load to the server and stops taking jobs above its
threshold, so several workers on several machines share the rooms. A job's entrypoint connects to its room
(LiveKit's connection listens) and runs :class:`~turnflow.serve.RoomAgent` there: each persona speaks with
its own track, turns run through the recipe's DAG. `turnflow serve` stays for one room without a dispatcher.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnflow.extras import missing_agents

try:
    from livekit.agents import AutoSubscribe, JobContext, JobProcess, WorkerOptions, cli
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise missing_agents("turnflow worker", exc) from exc

from turnflow.recipe import load_recipe
from turnflow.serve import LiveKitCredentials, RoomAgent

__all__ = ["WorkerConfig", "entrypoint", "prewarm", "run_worker", "worker_options"]

logger = logging.getLogger("turnflow.worker")

_SESSION_KEY = "turnflow_session"


@dataclass(frozen=True)
class WorkerConfig:
    """What every job of the worker serves."""

    recipe: str
    """The recipe file (an absolute path: job processes may start elsewhere)."""
    personas: tuple[str, ...]
    """The personas each dispatched room gets, in order (with `turnflow serve`, the first one listened)."""
    backend: str | None = None
    """Overrides the recipe's backend."""
    agent_name: str = "turnflow"
    """The name rooms dispatch the worker by."""

    @classmethod
    def checked(
        cls, recipe: str | Path, personas: Sequence[str], *, backend: str | None = None, agent_name: str = "turnflow"
    ) -> WorkerConfig:
        """A config whose recipe, personas and backend exist (every problem raised now, not in a job)."""
        persona_ids = tuple(p.strip() for p in personas if p.strip())
        if not persona_ids:
            raise ValueError("--personas needs at least one persona id (comma-separated)")
        if len(set(persona_ids)) != len(persona_ids):
            raise ValueError(f"personas must be distinct, got {list(persona_ids)}")
        if not agent_name.strip():
            raise ValueError("the agent name must not be empty (rooms dispatch the worker by it)")
        from turnflow.session import Session

        loaded = load_recipe(recipe)  # RecipeError: every problem of the recipe, FILE:LINE
        with Session(loaded, backend=backend, state_dir=None) as session:  # unknown backend: ValueError
            for persona_id in persona_ids:
                session.persona(persona_id)
        return cls(str(Path(recipe).resolve()), persona_ids, backend, agent_name.strip())


def prewarm(proc: JobProcess, *, config: WorkerConfig) -> None:
    """Before a job arrives: open the recipe and reach its model server (an embedded one is started once and
    shared by the worker's processes), so a dispatched room hears its first answer without the wait."""
    from turnflow.session import Session

    session = Session(config.recipe, backend=config.backend)
    _ = session.backend.capabilities
    proc.userdata[_SESSION_KEY] = session


async def entrypoint(ctx: JobContext, *, config: WorkerConfig) -> None:
    """One dispatched room: connect (the job's connection listens), then the personas join, speak and answer."""
    from turnflow.session import Session

    session = ctx.proc.userdata.pop(_SESSION_KEY, None)
    if session is None:
        session = await asyncio.to_thread(Session, config.recipe, backend=config.backend)
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    room_name = ctx.room.name
    agent = RoomAgent(
        session, room_name, config.personas, credentials=LiveKitCredentials.from_env(),
        log=lambda message: logger.info("%s: %s", room_name, message),
    )

    async def leave(reason: str) -> None:
        await agent.aclose()
        await asyncio.to_thread(session.close)
        logger.info("%s: left after %d turn(s) (%s)", room_name, agent.turns_run, reason)

    ctx.add_shutdown_callback(leave)
    await agent.start(listen_on=ctx.room)
    logger.info("%s: serving %s", room_name, ", ".join(agent.identities))


def worker_options(config: WorkerConfig) -> WorkerOptions:
    """LiveKit Agents worker options: explicit dispatch by `agent_name`, turnflow's room agent in each job, and
    LiveKit's own load reporting and process pool."""
    return WorkerOptions(
        entrypoint_fnc=functools.partial(entrypoint, config=config),
        prewarm_fnc=functools.partial(prewarm, config=config),
        agent_name=config.agent_name,
    )


def run_worker(config: WorkerConfig, mode: str = "start", extra_args: Sequence[str] = ()) -> None:
    """Run the worker with LiveKit Agents' CLI (`cli.run_app`) in `mode` (`start`, `dev`, ...); blocks."""
    argv: list[Any] = [f"{Path(sys.argv[0]).name} worker", mode, *extra_args]
    sys.argv = argv
    cli.run_app(worker_options(config))
