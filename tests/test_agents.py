"""turnflow inside LiveKit Agents: a real AgentSession replying through TurnflowLLM, and the worker's job wiring.

The AgentSession runs in text mode without a LiveKit server (`session.run(user_input=...)`, the framework's own
testing path) on the embedded llama-server. The worker's real dispatch needs a LiveKit server: LIVEKIT_URL,
LIVEKIT_API_KEY and LIVEKIT_API_SECRET; skipped, saying so, without.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("livekit.agents", reason="needs LiveKit Agents: pip install 'turnflow[agents]'")

from conftest import RECIPE, copy_recipe_folder, without_adapters  # noqa: E402
from livekit.agents import Agent, AgentSession, AutoSubscribe, ModelSettings, function_tool  # noqa: E402
from livekit.agents import llm as lk_llm  # noqa: E402

from turnflow.livekit import TurnflowLLM, openai_tools  # noqa: E402
from turnflow.recipe import RecipeError  # noqa: E402

INSTRUCTIONS = "You are Maya on a LiveKit call. Answer in one short sentence and never read out lists."


def _reply_of(result: Any) -> str:
    messages = [e.item for e in result.events if e.type == "message" and e.item.role == "assistant"]
    assert messages, f"no assistant message among {[e.type for e in result.events]}"
    return messages[-1].text_content or ""


@pytest.mark.server
def test_agent_session_replies_through_turnflow_with_the_prefix_reused(home: Path, local_url: str) -> None:
    questions = ["Morning Maya, what's on the board?", "Anything blocked?", "Who owns the release?",
                 "When is the demo?", "What did we decide yesterday?", "Thanks, anything else?"]

    async def scenario() -> tuple[list[str], list[dict[str, Any]], list[Any]]:
        model = TurnflowLLM(RECIPE, persona="maya", room=f"agents-{uuid.uuid4().hex[:6]}")
        reports: list[dict[str, Any]] = []
        metrics: list[Any] = []
        model.on("turn_report", reports.append)
        model.on("metrics_collected", metrics.append)
        replies = []
        async with model, AgentSession(llm=model) as session:
            await session.start(Agent(instructions=INSTRUCTIONS))
            for question in questions:
                result = await session.run(user_input=question)
                replies.append(_reply_of(result))
                assert model.last_report is reports[-1]
        return replies, reports, metrics

    replies, reports, metrics = asyncio.run(scenario())
    assert len(reports) == len(questions) == len(replies)
    for reply, report in zip(replies, reports, strict=True):
        assert reply.strip(), "every turn's reply reaches the AgentSession"
        assert reply.strip() == report["reply"].strip()
    assert [r["turn"] for r in reports] == list(range(1, len(questions) + 1))
    assert len({r["prefix"]["invariant_sha256"] for r in reports}) == 1, "the invariant prefix never changed"
    assert "agent_instructions" in reports[0]["prefix"]["order"]
    assert all(r["tier_violations"] == [] for r in reports)
    processed = [(r["llm"]["prompt_tokens_processed"], r["llm"]["prompt_tokens"]) for r in reports]
    print("prompt tokens processed / prompt per turn:", processed)
    for turn, (done, total) in enumerate(processed, start=1):
        if turn >= 3:
            assert done <= 0.05 * total, f"turn {turn} processed {done} of {total} prompt tokens"
    # LiveKit's own metrics event carries the server's counts
    llm_metrics = [m for m in metrics if type(m).__name__ == "LLMMetrics"]
    assert len(llm_metrics) == len(questions)
    assert llm_metrics[-1].prompt_tokens == reports[-1]["llm"]["prompt_tokens"]
    assert llm_metrics[-1].prompt_cached_tokens == reports[-1]["llm"]["prompt_tokens_cached"]


class _BoardAgent(Agent):
    def __init__(self, calls: list[str]) -> None:
        super().__init__(instructions=INSTRUCTIONS)
        self.calls = calls

    def llm_node(self, chat_ctx: lk_llm.ChatContext, tools: list[lk_llm.Tool], model_settings: ModelSettings) -> Any:
        """Call the tool first (`required`), then answer from its result (`none`)."""
        answered = any(item.type == "function_call_output" for item in chat_ctx.items)
        settings = ModelSettings(tool_choice="none" if answered else "required")
        return Agent.default.llm_node(self, chat_ctx, tools, settings)

    @function_tool
    async def read_board(self, column: str) -> str:
        """What is in one column of the team's board today."""
        self.calls.append(f"read_board:{column}")
        return "BOARD: release blocked on the signing key"


def test_a_tool_the_agent_declares_is_called_and_its_result_fed_back(tmp_path: Path) -> None:
    # A stand-in OpenAI-compatible server over real HTTP: the generated model has random weights, and our
    # llama-server build does not hold a model without tool-call support in its template to a tool-call grammar
    # (tool_choice="required" came back as free text), so no real call could be made by it.
    from stubs import tool_calling_model

    calls: list[str] = []
    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")

    async def scenario(url: str) -> tuple[list[dict[str, Any]], Any]:
        (recipe.parent / "backends.yaml").write_text(f"backends:\n  caller:\n    kind: openai\n    url: {url}\n")
        model = TurnflowLLM(recipe, persona="maya", backend="caller", state_dir=tmp_path / "state")
        reports: list[dict[str, Any]] = []
        model.on("turn_report", reports.append)
        async with model, AgentSession(llm=model) as session:
            await session.start(_BoardAgent(calls))
            result = await session.run(user_input="What's on the board?")
        return reports, result

    with tool_calling_model("read_board", '{"column": "blocked"}') as (url, requests):
        reports, result = asyncio.run(scenario(url))
    assert calls == ["read_board:blocked"], "the model's tool call reached the agent's tool with its arguments"
    first, follow_up = requests[0], requests[1]
    assert [t["function"]["name"] for t in first["tools"]] == ["read_board"]
    assert first["tool_choice"] == "required"
    assert first["messages"][-1]["role"] == "user" and first["messages"][-1]["content"].endswith("What's on the board?")
    assert reports[0]["llm"]["tool_calls"] == [{"call_id": "call_1", "name": "read_board",
                                                "arguments": '{"column": "blocked"}'}]
    # the result is fed back: the follow-up is the first prompt, then the call, then the tool's output
    assert follow_up["messages"][: len(first["messages"])] == first["messages"]
    call, output = follow_up["messages"][-2:]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "read_board"
    assert output == {"role": "tool", "tool_call_id": "call_1", "content": "BOARD: release blocked on the signing key"}
    assert reports[1]["prefix"]["invariant_sha256"] == reports[0]["prefix"]["invariant_sha256"]
    types = [e.type for e in result.events]
    assert types[:2] == ["function_call", "function_call_output"] and types[-1] == "message"
    assert _reply_of(result) == "The release is blocked."


def test_agent_tools_become_canonical_openai_definitions() -> None:
    class Two(Agent):
        @function_tool
        async def zeta(self, city: str) -> str:
            """The weather in a city."""
            return city

        @function_tool
        async def alpha(self) -> str:
            """Nothing."""
            return ""

    agent = Two(instructions="x")
    tools = openai_tools(list(agent.tools))
    assert [t["function"]["name"] for t in tools] == ["alpha", "zeta"]
    assert tools[1]["function"]["parameters"]["properties"]["city"]["type"] == "string"
    assert json.dumps(tools[1], sort_keys=True) == json.dumps(tools[1])


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="persona 'nobody' is not served by recipe 'voice-chat'"):
        TurnflowLLM(RECIPE, persona="nobody")
    with pytest.raises(ValueError, match="persona must be a persona id"):
        TurnflowLLM(RECIPE, persona="")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        TurnflowLLM(RECIPE, persona="maya", backend="nope")
    recipe = copy_recipe_folder(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["sources"] = [s for s in data["sources"] if s["name"] != "conversation_history"]
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ValueError, match="no conversation_history source"):
        TurnflowLLM(recipe, persona="maya")

    async def wrong_context() -> None:
        async with TurnflowLLM(RECIPE, persona="maya") as model:
            with pytest.raises(TypeError, match="ChatContext"):
                model.chat(chat_ctx=[{"role": "user", "content": "hi"}])  # type: ignore[arg-type]

    asyncio.run(wrong_context())


def test_the_chat_context_maps_onto_recipe_sources() -> None:
    """Instructions out of the history, the new user message apart, each message as the model saw it."""

    async def scenario() -> None:
        async with TurnflowLLM(RECIPE, persona="maya") as model:
            ctx = lk_llm.ChatContext()
            ctx.add_message(role="system", content=INSTRUCTIONS, id="lk.agent_task.instructions")
            ctx.add_message(role="user", content="first", id="u1")
            ctx.add_message(role="assistant", content="reply one", id="a1")
            ctx.insert(lk_llm.FunctionCall(call_id="c1", name="read_board", arguments="{}", id="a1/fnc_0"))
            ctx.insert(lk_llm.FunctionCallOutput(call_id="c1", name="read_board", output="BOARD", is_error=False))
            ctx.add_message(role="user", content="second", id="u2")
            model._seen["u1"] = "Current time: Monday.\n\nfirst"
            model._replies["reply one"] = "reply one "
            context, text, user_item = model._context(ctx, [], None)
            assert context.instructions == INSTRUCTIONS
            assert (text, user_item) == ("second", "u2")
            assert context.history == [
                {"role": "user", "content": "Current time: Monday.\n\nfirst"},
                {"role": "assistant", "content": "reply one ",
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "read_board", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "BOARD"},
            ]
            assert (context.turn, context.compaction_epoch) == (1, 0)
            prompt = model.session.preview(persona="maya", room=model.room, text=text, context=context)
            assert prompt.messages[0]["role"] == "system" and INSTRUCTIONS in prompt.messages[0]["content"]
            assert prompt.messages[-4:-1] == context.history
            assert prompt.messages[-1]["content"].endswith("second")

            # the agent dropped its oldest messages: a new epoch, not a tier violation
            shorter = lk_llm.ChatContext([i for i in ctx.items if i.id not in ("u1",)])
            context, _, _ = model._context(shorter, [], None)
            assert (context.turn, context.compaction_epoch) == (2, 1)

            # after tool results nothing new was said: the prompt ends with the result
            after_tool = lk_llm.ChatContext([i for i in ctx.items if i.id != "u2"])
            context, text, _ = model._context(after_tool, [], None)
            assert text is None
            prompt = model.session.preview(persona="maya", room=model.room, text=None, context=context)
            assert prompt.messages[-1] == {"role": "tool", "tool_call_id": "c1", "content": "BOARD"}

    asyncio.run(scenario())


# --- the worker -------------------------------------------------------------------------------------


def test_worker_config_refuses_bad_input_before_any_job(tmp_path: Path) -> None:
    from turnflow.worker import WorkerConfig

    with pytest.raises(ValueError, match="at least one persona"):
        WorkerConfig.checked(RECIPE, [" ", ""])
    with pytest.raises(ValueError, match="distinct"):
        WorkerConfig.checked(RECIPE, ["maya", "maya"])
    with pytest.raises(ValueError, match="persona 'nobody' is not served"):
        WorkerConfig.checked(RECIPE, ["maya", "nobody"])
    with pytest.raises(ValueError, match="unknown backend"):
        WorkerConfig.checked(RECIPE, ["maya"], backend="nope")
    with pytest.raises(RecipeError, match="file not found"):
        WorkerConfig.checked(tmp_path / "missing.yaml", ["maya"])


def test_worker_options_dispatch_by_name_and_survive_the_trip_to_a_job_process() -> None:
    from turnflow.worker import WorkerConfig, entrypoint, prewarm, worker_options

    config = WorkerConfig.checked(RECIPE, ["maya", "helper"], agent_name="standup-personas")
    options = worker_options(config)
    assert options.agent_name == "standup-personas"
    assert Path(config.recipe).is_absolute()
    for fnc, target in ((options.entrypoint_fnc, entrypoint), (options.prewarm_fnc, prewarm)):
        restored = pickle.loads(pickle.dumps(fnc))  # job processes receive them pickled
        assert restored.func is target and restored.keywords == {"config": config}


def test_worker_cli_needs_livekit_settings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from turnflow.cli import main

    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert main(["worker", str(RECIPE), "--personas", "maya"]) == 2
    assert "set LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET" in capsys.readouterr().err


class _FakeProc:
    def __init__(self) -> None:
        self.userdata: dict[str, Any] = {}


class _FakeRoom:
    """The job's room connection as the room agent uses it: a name, event handlers, the people already there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handlers: dict[str, Any] = {}
        self.remote_participants: dict[str, Any] = {}

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler


class _FakeJobContext:
    def __init__(self, room: str) -> None:
        self.proc = _FakeProc()
        self.room = _FakeRoom(room)
        self.connected_with: AutoSubscribe | None = None
        self.shutdown_callbacks: list[Any] = []

    async def connect(self, *, auto_subscribe: AutoSubscribe) -> None:
        self.connected_with = auto_subscribe

    def add_shutdown_callback(self, callback: Any) -> None:
        self.shutdown_callbacks.append(callback)


@pytest.mark.server
def test_the_job_entrypoint_runs_the_room_agent_in_the_dispatched_room(
    home: Path, local_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from turnflow import serve, worker

    monkeypatch.setenv("LIVEKIT_URL", "wss://livekit.invalid")
    monkeypatch.setenv("LIVEKIT_API_KEY", "key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "secret")
    started: list[tuple[serve.RoomAgent, Any]] = []
    real_start = serve.RoomAgent.start

    async def start_without_server(self: serve.RoomAgent, *, connect: bool = True, listen_on: Any = None) -> None:
        started.append((self, listen_on))
        await real_start(self, connect=False)  # the personas' voices are made; joining needs the server
        self._listen_to(listen_on)

    monkeypatch.setattr(serve.RoomAgent, "start", start_without_server)
    config = worker.WorkerConfig.checked(RECIPE, ["maya", "helper"])
    ctx = _FakeJobContext("dispatched-room")

    async def scenario() -> None:
        worker.prewarm(ctx.proc, config=config)  # type: ignore[arg-type]
        session = ctx.proc.userdata["turnflow_session"]
        assert session._backend is not None, "prewarm reached the model server"
        await worker.entrypoint(ctx, config=config)  # type: ignore[arg-type]
        assert ctx.connected_with == AutoSubscribe.AUDIO_ONLY
        (agent, listen_on), = started
        assert agent.session is session, "the prewarmed session serves the job"
        assert agent.room == "dispatched-room" and agent.persona_ids == ["maya", "helper"]
        assert agent.credentials is not None and agent.credentials.url == "wss://livekit.invalid"
        assert listen_on is ctx.room, "the job's own connection listens"
        assert {"track_subscribed", "track_unsubscribed"} <= set(ctx.room.handlers)
        assert set(agent.display_names) == {"maya", "helper"}, "the personas were seated in the room"
        (leave,) = ctx.shutdown_callbacks
        await leave("room closed")
        assert agent._closed

    asyncio.run(scenario())


_LIVEKIT = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
_MISSING = [name for name in _LIVEKIT if not os.environ.get(name)]


@pytest.mark.livekit
@pytest.mark.server
@pytest.mark.skipif(bool(_MISSING), reason=f"no LiveKit server configured: set {', '.join(_MISSING)} to run this test")
def test_a_real_livekit_server_dispatches_a_room_to_the_worker(home: Path, local_url: str, tmp_path: Path) -> None:
    from livekit import api

    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")
    agent_name = f"turnflow-test-{uuid.uuid4().hex[:6]}"
    room = f"turnflow-dispatch-{uuid.uuid4().hex[:6]}"
    turnflow = shutil.which("turnflow") or str(Path(sys.executable).parent / "turnflow")
    proc = subprocess.Popen(
        [turnflow, "worker", str(recipe), "--personas", "maya", "--agent-name", agent_name, "dev"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )

    async def scenario() -> set[str]:
        async with api.LiveKitAPI() as lk:
            await asyncio.sleep(5)  # the worker registers
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=agent_name, room=room))
            deadline = time.monotonic() + 60
            identities: set[str] = set()
            while time.monotonic() < deadline and "persona-maya" not in identities:
                await asyncio.sleep(1)
                listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
                identities = {p.identity for p in listed.participants}
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            return identities

    try:
        identities = asyncio.run(scenario())
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert "persona-maya" in identities, f"participants seen: {identities}"
