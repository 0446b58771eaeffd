"""turnflow inside LiveKit Agents: `TurnflowLLM`, an `llm.LLM` whose every reply is one turn of a turnflow recipe.

    from livekit.agents import Agent, AgentSession
    from turnflow.livekit import TurnflowLLM

    session = AgentSession(llm=TurnflowLLM("recipes/voice-chat.yaml", persona="maya"))
    await session.start(Agent(instructions="Answer in one sentence."))

Each `chat()` runs the recipe's DAG: the agent's instructions become the invariant `agent_instructions`
source, its chat context the `conversation_history` source (each message as the model saw it, so the
history only appends), its tools the request's `tools` (sorted by name, canonical JSON). The prompt is
assembled stable-first on the persona's pinned slot with its adapters; the reply streams back as
`ChatChunk`s, tool calls as `FunctionToolCall`s, and the turn's report is `.last_report` (the same dict as
`turnflow run --json`), the `turn_report` event, and LiveKit's own `metrics_collected` (token counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Literal

from turnflow.extras import missing_agents

try:
    from livekit.agents import llm as lk_llm
    from livekit.agents._exceptions import APIConnectionError
    from livekit.agents.llm.chat_context import DYNAMIC_INSTRUCTIONS_MESSAGE_ID
    from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr
    from livekit.agents.utils import aio
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise missing_agents("turnflow.livekit", exc) from exc

from turnflow.nodes.prompt import Prompt
from turnflow.nodes.text import canonical_json
from turnflow.recipe import Recipe, SourceSpec, load_recipe
from turnflow.session import AgentContext, Session, TurnError, TurnResult

__all__ = ["AGENT_INSTRUCTIONS_SOURCE", "TurnflowLLM", "TurnflowLLMStream", "agent_recipe", "openai_tools"]

AGENT_INSTRUCTIONS_SOURCE = SourceSpec(
    name="agent_instructions", tier="invariant", cache_key=("persona_id", "instructions_digest")
)
"""The source the agent's instructions render in, added to a recipe that does not declare one."""


def agent_recipe(recipe: str | Path | Recipe) -> Recipe:
    """The recipe ready for LiveKit Agents: it must take the chat context as history; the agent's instructions
    get the invariant `agent_instructions` source unless the recipe places them itself."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    names = {spec.name for spec in loaded.sources}
    where = f"recipe {loaded.recipe!r}" + (f" ({loaded.path})" if loaded.path else "")
    if "conversation_history" not in names:
        raise ValueError(
            f"{where} has no conversation_history source, so the agent's chat context has nowhere to go; add "
            "{name: conversation_history, tier: semi_stable, cache_key: [room_id, persona_id, history_tail_msg_ids]}"
        )
    if AGENT_INSTRUCTIONS_SOURCE.name in names:
        return loaded
    adapted = loaded.model_copy(update={"sources": (*loaded.sources, AGENT_INSTRUCTIONS_SOURCE)})
    adapted._path = loaded.path
    adapted._digest = hashlib.sha256(f"{loaded.digest}+agent_instructions".encode()).hexdigest()
    return adapted


def openai_tools(tools: list[lk_llm.Tool]) -> list[dict[str, Any]]:
    """The agent's function tools as OpenAI definitions, sorted by name with keys in canonical order, so the
    same tools are the same bytes every turn."""
    if not tools:
        return []
    definitions = lk_llm.ToolContext(tools).parse_function_tools("openai", strict=False)
    ordered = sorted(definitions, key=lambda d: str(d.get("function", {}).get("name", "")))
    return [json.loads(canonical_json(definition)) for definition in ordered]


class TurnflowLLM(lk_llm.LLM[Literal["turn_report"]]):
    """A LiveKit Agents LLM that runs each reply as one turn of a turnflow recipe, for one persona.

    `recipe` is a recipe file (or a loaded `Recipe`); `persona` one of the personas beside it; `room` names the
    conversation in turnflow's store and composition cache (default: one of its own per instance); `backend`
    overrides the recipe's backend. The conversation itself is the AgentSession's chat context: nothing is
    written to turnflow's history.
    """

    def __init__(
        self,
        recipe: str | Path | Recipe,
        *,
        persona: str,
        room: str | None = None,
        backend: str | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(persona, str) or not persona.strip():
            raise ValueError(f"persona must be a persona id (a non-empty string), got {persona!r}")
        if room is not None and (not isinstance(room, str) or not room.strip()):
            raise ValueError(f"room must be a non-empty string or None, got {room!r}")
        self.session = Session(agent_recipe(recipe), backend=backend, state_dir=state_dir)
        try:
            self.session.persona(persona)  # an unknown persona fails here, not on the first reply
        except Exception:
            self.session.close()
            raise
        self.persona = persona
        self.room = room or f"agent-{uuid.uuid4().hex[:12]}"
        self.last_report: dict[str, Any] | None = None
        """The latest turn's report (the same dict as `turnflow run --json`)."""
        self.last_prompt: Prompt | None = None
        """The latest turn's prompt: the messages sent, with the prefix hashes."""
        self._lock = threading.Lock()
        self._turns = 0
        self._epoch = 0
        self._history_lines: list[str] = []
        self._seen: dict[str, str] = {}  # chat item id of a user message -> its content as the model saw it
        self._replies: dict[str, str] = {}  # a reply as the chat context keeps it (stripped) -> as the model wrote it

    @property
    def model(self) -> str:
        return f"turnflow:{self.session.recipe.recipe}/{self.persona}"

    @property
    def provider(self) -> str:
        return "turnflow"

    def chat(
        self,
        *,
        chat_ctx: lk_llm.ChatContext,
        tools: list[lk_llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[lk_llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> TurnflowLLMStream:
        """One reply: a turn of the recipe over the agent's chat context, streamed as `ChatChunk`s."""
        if not isinstance(chat_ctx, lk_llm.ChatContext):
            raise TypeError(f"chat_ctx must be a livekit.agents.llm.ChatContext, got {type(chat_ctx).__name__}")
        tools = list(tools or [])
        choice: str | dict[str, Any] | None = None
        if isinstance(tool_choice, str):
            choice = tool_choice
        elif isinstance(tool_choice, dict):
            choice = dict(tool_choice)
        context, text, user_item = self._context(chat_ctx, tools, choice)
        return TurnflowLLMStream(
            self, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options, context=context, text=text,
            user_item=user_item,
        )

    async def aclose(self) -> None:
        await asyncio.to_thread(self.session.close)
        await super().aclose()

    # -- the chat context as turnflow sees it

    def _context(
        self, chat_ctx: lk_llm.ChatContext, tools: list[lk_llm.Tool], tool_choice: str | dict[str, Any] | None
    ) -> tuple[AgentContext, str | None, str | None]:
        """The turn's `AgentContext`, what the user said this turn (None: the turn goes on after tool results or
        speaks first), and the id of that user message."""
        items = list(chat_ctx.items)
        instructions: list[str] = []
        dynamic: list[str] = []
        while items and items[0].type == "message" and items[0].role in ("system", "developer"):
            first = items.pop(0)
            assert isinstance(first, lk_llm.ChatMessage)
            (dynamic if first.id == DYNAMIC_INSTRUCTIONS_MESSAGE_ID else instructions).append(first.text_content or "")
        text: str | None = None
        user_item: str | None = None
        if items and items[-1].type == "message" and items[-1].role == "user":
            last = items.pop()
            assert isinstance(last, lk_llm.ChatMessage)
            text, user_item = last.text_content or "", last.id
            if dynamic:  # per-call instructions change every call: they go with what is new, never in the prefix
                text = "\n".join([*dynamic, text])
        history = self._messages(items)
        lines = [canonical_json(message) for message in history]
        with self._lock:
            if lines[: len(self._history_lines)] != self._history_lines:
                self._epoch += 1  # the agent truncated or rewrote its history: a new epoch, not a tier violation
            self._history_lines = lines
            self._turns += 1
            turn = self._turns
            epoch = self._epoch
        context = AgentContext(
            instructions="\n\n".join(part for part in instructions if part),
            history=history,
            tools=openai_tools(tools),
            tool_choice=tool_choice,
            turn=turn,
            compaction_epoch=epoch,
        )
        return context, text, user_item

    def _messages(self, items: list[Any]) -> list[dict[str, Any]]:
        """Chat items as OpenAI messages, each user message and reply byte for byte as the model saw it."""
        shown: list[Any] = []
        for item in items:
            if item.type == "message" and item.id in self._seen:
                item = item.model_copy(update={"content": [self._seen[item.id]]})
            elif item.type == "message" and item.role == "assistant":
                written = self._replies.get((item.text_content or "").strip())
                if written is not None:
                    item = item.model_copy(update={"content": [written]})
            shown.append(item)
        messages, _ = lk_llm.ChatContext(shown).to_provider_format("openai", inject_dummy_user_message=False)
        return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]

    def _remember(self, result: TurnResult, user_item: str | None) -> None:
        """Keep what the model saw of this turn's user message and what it wrote, for the next turns' history."""
        content = result.prompt.user_message.get("content")
        with self._lock:
            if user_item is not None and isinstance(content, str):
                self._seen[user_item] = content
            if result.reply.strip():
                self._replies[result.reply.strip()] = result.reply
            self.last_report = result.report
            self.last_prompt = result.prompt


class TurnflowLLMStream(lk_llm.LLMStream):
    """One turn's reply as LiveKit Agents reads it: text deltas as they stream, then tool calls, then usage."""

    def __init__(
        self,
        llm: TurnflowLLM,
        *,
        chat_ctx: lk_llm.ChatContext,
        tools: list[lk_llm.Tool],
        conn_options: APIConnectOptions,
        context: AgentContext,
        text: str | None,
        user_item: str | None,
    ) -> None:
        super().__init__(llm, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._turnflow = llm
        self._context = context
        self._text = text
        self._user_item = user_item

    async def _run(self) -> None:
        llm = self._turnflow
        loop = asyncio.get_running_loop()
        request_id = f"turnflow-{uuid.uuid4().hex[:12]}"
        cancel = threading.Event()

        def send(chunk: lk_llm.ChatChunk) -> None:
            with contextlib.suppress(aio.channel.ChanClosed):  # the agent stopped reading (interrupted)
                self._event_ch.send_nowait(chunk)

        def on_text(delta: str) -> None:  # called in the turn's worker thread
            chunk = lk_llm.ChatChunk(id=request_id, delta=lk_llm.ChoiceDelta(role="assistant", content=delta))
            loop.call_soon_threadsafe(send, chunk)

        turn = asyncio.ensure_future(asyncio.to_thread(
            llm.session.turn, persona=llm.persona, room=llm.room, text=self._text, context=self._context,
            on_text=on_text, cancel=cancel,
        ))
        try:
            result = await asyncio.shield(turn)
        except asyncio.CancelledError:
            cancel.set()  # the model stops; the worker thread ends with what was written so far
            with contextlib.suppress(Exception):
                await turn
            raise
        except TurnError as exc:
            raise APIConnectionError(str(exc), retryable=not self._event_ch.output_sent) from exc
        llm._remember(result, self._user_item)
        for call in result.llm.tool_calls:
            tool_call = lk_llm.FunctionToolCall(name=call.name, arguments=call.arguments, call_id=call.call_id)
            send(lk_llm.ChatChunk(id=request_id, delta=lk_llm.ChoiceDelta(role="assistant", tool_calls=[tool_call])))
        reply = result.llm
        prompt_tokens = reply.prompt_tokens or 0
        completion_tokens = reply.completion_tokens or 0
        send(lk_llm.ChatChunk(id=request_id, usage=lk_llm.CompletionUsage(
            prompt_tokens=prompt_tokens,
            prompt_cached_tokens=reply.prompt_tokens_cached or 0,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )))
        llm.emit("turn_report", result.report)
