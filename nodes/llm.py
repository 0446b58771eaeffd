"""The model call: an httpx client for OpenAI-compatible chat completions that streams and reads `timings`.

llama-server extensions are sent when the backend is a llama-server: `id_slot` pins the persona's slot,
`cache_prompt` keeps the prefix in KV, `lora` selects adapters. Its `timings` say how many prompt
tokens were processed (`prompt_n`) and how many came from the cache (`cache_n`).
"""

from __future__ import annotations

import json
import operator
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx

from turnflow.nodes.openai_http import OpenAiHttp, api_base, server_root, why
from turnflow.nodes.text import DEFUSE_MARK


class BackendError(RuntimeError):
    """The model server could not produce the reply; the message says what happened and where."""


@dataclass(frozen=True)
class Affinity:
    """A stable name for one conversation (persona@room), sent where a router in front of the servers reads it."""

    key: str
    user_field: bool = True
    """As the OpenAI `user` field."""
    header: str | None = "x-session-id"
    """As this HTTP header (None: no header)."""


@dataclass(frozen=True)
class Delta:
    """One streamed piece of the reply: text, and/or base64 PCM16 audio from a model that speaks."""

    text: str = ""
    audio_b64: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for: the call's id, the function's name and its JSON arguments."""

    call_id: str
    name: str
    arguments: str


@dataclass
class ChatReply:
    """The finished reply and what the server measured about it."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    prompt_tokens_processed: int | None = None
    prompt_tokens_cached: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    server_timings: dict[str, Any] = field(default_factory=dict)
    audio_b64: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The function calls the model made, in order (assembled from the streamed pieces)."""


class ChatClient(OpenAiHttp):
    """One OpenAI-compatible model server."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, timeout_s: float = 120.0):
        super().__init__(url, api_key=api_key, timeout=timeout_s, connect_timeout=5.0)
        self.url = server_root(url)
        self.base = api_base(url)
        self.model = model
        self._llama_cpp = False

    @property
    def llama_cpp(self) -> bool:
        """Whether the server is a llama-server (it answers `/props`): it is sent every stop string, not OpenAI's
        4, and asked for `timings` in every event, so a reply cut short (barge-in) still reports its prompt. No
        connection to it is kept open: it closes one after every streamed reply anyway (measured on our build), and
        an idle one held here makes it take ~0.1 s longer to exit (an adapter page-in restarts it)."""
        return self._llama_cpp

    @llama_cpp.setter
    def llama_cpp(self, value: bool) -> None:
        if value and not self._llama_cpp:
            self._keep_no_connections()
        self._llama_cpp = value

    def _error(self, message: str) -> Exception:
        return BackendError(message)

    def _unreachable(self, url: str, exc: httpx.HTTPError) -> Exception:
        return BackendError(f"cannot reach the model server at {self.url}: {why(exc)}")

    def get_json(self, path: str, *, root: bool = False) -> dict[str, Any] | None:
        """GET a JSON document from the server, or None when it does not serve that path."""
        response = self._request("GET", (self.url if root else self.base) + path, timeout=10.0)
        if response.status_code >= 400:
            return None
        try:
            value = response.json()
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def get_json_list(self, path: str) -> list[Any]:
        """GET a JSON list from the server root (llama-server's `/lora-adapters`, `/slots`); [] when not served."""
        response = self._request("GET", self.url + path, timeout=10.0)
        try:
            value = response.json() if response.status_code < 400 else []
        except ValueError:
            return []
        return value if isinstance(value, list) else []

    def count_tokens(self, text: str, *, special: bool = False) -> int | None:
        """How many tokens the server's tokenizer makes of `text` (llama-server's `/tokenize`), or None.

        With `special`, control-token text counts as the control token (`parse_special`)."""
        try:
            body = {"content": text, "parse_special": special}
            response = self._http.post(self.url + "/tokenize", json=body, timeout=30.0)
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

    def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        id_slot: int | None = None,
        lora: list[dict[str, Any]] | None = None,
        audio_out: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        affinity: Affinity | None = None,
        stop: list[str] | None = None,
        labels: list[str] | None = None,
    ) -> ReplyStream:
        """A reply stream; the request starts when iteration does.

        `stop` (the chat template's end markers) is sent to the server and also enforced here: the reply is
        cut where one first appears, so nothing after it is stored or spoken, whatever the server does (a
        llama-server is sent all, other servers the first 4, OpenAI's limit). `labels` (speaker labels such as
        `Maya:`) are dropped from the start of the reply.

        `audio_out` (e.g. `{"voice": "alloy", "format": "pcm16"}`) asks a model that speaks for audio too.
        `tools` (OpenAI function definitions) and `tool_choice` go into the request as given; the calls the
        model makes are in the finished reply's `tool_calls`.
        `affinity` names the conversation for a router in front of several servers (the `user` field and/or a
        header), so it keeps sending it to the server that holds its prefix.
        """
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        if seed is not None:
            body["seed"] = seed
        if id_slot is not None:
            body["id_slot"] = id_slot
            body["cache_prompt"] = True
        if lora is not None:
            body["lora"] = lora
        if audio_out is not None:
            body["modalities"] = ["text", "audio"]
            body["audio"] = audio_out
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        if self.llama_cpp:  # prompt counts in every event: a reply left early (barge-in, a stop cut here) keeps them
            body["timings_per_token"] = True
        body.update(extra or {})
        stops = [s for s in (stop or []) if s]
        if stops:
            stops = list(dict.fromkeys([*stops, *(body.get("stop") or [])]))
            body["stop"] = stops if self.llama_cpp else stops[:4]  # OpenAI's limit is 4; llama-server has none
        headers: dict[str, str] = {}
        if affinity is not None:
            if affinity.user_field:
                body["user"] = affinity.key
            if affinity.header:
                headers[affinity.header] = affinity.key
        return ReplyStream(self, body, headers, stop=stops, labels=labels)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
"""JSON as httpx would send it (one encoder: `json.dumps` with options makes a new one every call)."""


class MessageJson:
    """Chat requests as JSON bytes, the messages a request shares with an earlier one taken from that one's JSON.

    A stable-first prompt repeats its long system message and its history turn after turn as the very same
    objects (cached sections, the rendered history), so a request is compared with the last one that began with
    the same system text, message by message, and only what follows the messages they share is encoded. A
    message is shared when it is the very same dict (turnflow never changes a message once made: the history and
    the composition cache rely on that too), or when both are a role and the same text. What is kept of a request
    stops before its first message that is not text (audio or image parts: large, and new every turn).
    """

    def __init__(self, runs: int = 256):
        self._runs_max = runs
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def body(self, body: dict[str, Any]) -> bytes:
        """A chat request (its `messages` and other fields) as UTF-8 JSON."""
        messages: list[dict[str, Any]] = body["messages"]
        first = messages[0].get("content") if messages else None
        if type(first) is not str:
            first = None
        with self._lock:
            run = self._runs.get(first) if first is not None else None
        shared = 0
        if run is not None:
            same = list(map(operator.is_, messages, run.messages))  # in C, without looking into the messages
            while shared < len(same):
                if same[shared]:
                    shared = same.index(False, shared) if False in same[shared:] else len(same)
                elif _same_text(messages[shared], run.messages[shared]):
                    shared += 1
                else:
                    break
        head = run.joined[: run.ends[shared - 1]] if run is not None and shared else b""
        parts = [_dumps(m).encode() for m in messages[shared:]]
        rest = _dumps({k: v for k, v in body.items() if k != "messages"}).encode()
        pieces = [b'{"messages":[', head]
        for part in parts:
            pieces += [b",", part] if len(pieces) > 2 or head else [part]
        pieces += [b"]", b"," if len(rest) > 2 else b"", rest[1:]]
        content = b"".join(pieces)  # the one copy of the request
        if first is not None:
            ends = list(run.ends[:shared]) if run is not None else []
            at = len(head)
            for part in parts:
                at += len(part) + (1 if at else 0)
                ends.append(at)
            # kept up to the first message that is not text (audio or image parts are new every turn and can be
            # large): the view of this request's bytes when that is all of them, else a copy of that much
            keep = next((i for i in range(shared, len(messages)) if type(messages[i].get("content")) is not str),
                        len(messages))
            view = memoryview(content)[13: 13 + (ends[keep - 1] if keep else 0)]  # after '{"messages":['
            stored = _Run(tuple(messages[:keep]), tuple(ends[:keep]), view if keep == len(messages) else view.tobytes())
            with self._lock:
                self._runs.pop(first, None)
                self._runs[first] = stored
                while len(self._runs) > self._runs_max:
                    self._runs.pop(next(iter(self._runs)))
        return content


def _read_to_the_end(lines: Iterator[str]) -> None:
    """The rest of a stream after its `[DONE]`, read (as OpenAI's own client does) so that the connection goes back
    to the pool instead of being closed; a server closing it before the body's end is no error: the reply was
    complete. (A client of a llama-server pools no connection: see `ChatClient.llama_cpp`.)"""
    try:
        for _ in lines:
            pass
    except httpx.HTTPError:
        pass


def _same_text(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two messages are a role and a text each, the same ones."""
    return (len(a) == 2 and len(b) == 2 and type(a.get("content")) is str and a.get("content") == b.get("content")
            and a.get("role") == b.get("role"))


class _Run(NamedTuple):
    """One request's messages, where each one's JSON ends in `joined`, and their JSON joined by commas (a view
    of the request's bytes)."""

    messages: tuple[dict[str, Any], ...]
    ends: tuple[int, ...]
    joined: memoryview | bytes


_MESSAGE_JSON = MessageJson()


class ReplyStream:
    """Deltas as the model produces them; `.reply` holds the finished reply once iteration ends."""

    def __init__(
        self, client: ChatClient, body: dict[str, Any], headers: dict[str, str] | None = None, *,
        stop: list[str] | None = None, labels: list[str] | None = None,
    ):
        self._client = client
        self.body = body
        self.content = _MESSAGE_JSON.body(body)
        """The request's JSON, made here (the part shared with an earlier request from its JSON), not as it is sent."""
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self._trim = StopTrimmer(stop or [])
        self._label = LabelStripper(labels or [])
        self.reply = ChatReply()
        self.started_at: float | None = None
        self.streamed_chars = 0
        """Characters of reply text yielded so far."""
        self._done = False
        self._tool_parts: dict[int, dict[str, str]] = {}  # streamed pieces of each tool call, by index
        self.on_delta: Callable[[str], None] | None = None
        self.cancel: threading.Event | None = None
        """Set it to stop the reply (barge-in): the stream ends, the connection closes, the server stops."""

    @property
    def cancelled(self) -> bool:
        """Whether the reply was stopped before the model finished it."""
        return self.reply.finish_reason == "cancelled"

    def __iter__(self) -> Iterator[Delta]:
        if self._done:
            raise RuntimeError("a reply stream can be read once")
        self._done = True
        return self._run()

    def drain(self) -> ChatReply:
        """Read the whole stream and return the finished reply."""
        for _ in self:
            pass
        return self.reply

    def _run(self) -> Iterator[Delta]:
        client, reply = self._client, self.reply
        self.started_at = start = time.perf_counter()
        parts: list[str] = []
        try:
            with client._http.stream(
                "POST", client.base + "/chat/completions", content=self.content, headers=self.headers
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise BackendError(
                        f"the model server at {client.url} refused the request "
                        f"(HTTP {response.status_code}): {response.text[:500]}"
                    )
                lines = response.iter_lines()
                for line in lines:
                    if self.cancel is not None and self.cancel.is_set():
                        reply.finish_reason = "cancelled"  # leaving the block closes the connection
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        _read_to_the_end(lines)
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BackendError(f"the model server at {client.url} failed mid-reply: {chunk['error']}")
                    delta = self._absorb(chunk)
                    finished = reply.finish_reason is not None
                    text = self._label.feed(delta.text)
                    if finished:  # the model ended: what was held back as a possible label is reply text
                        text += self._label.flush()
                    delta = Delta(self._trim.feed(text), delta.audio_b64)
                    if self._trim.stopped:
                        reply.finish_reason = "stop"
                    elif finished:  # the model ended: what was held back as a possible marker is reply text
                        delta = Delta(delta.text + self._trim.flush(), delta.audio_b64)
                    if delta.text or delta.audio_b64:
                        if reply.ttft_ms is None:
                            reply.ttft_ms = (time.perf_counter() - start) * 1000
                        parts.append(delta.text)
                        self.streamed_chars += len(delta.text)
                        if self.on_delta and delta.text:
                            self.on_delta(delta.text)
                        yield delta
                    if self._trim.stopped:
                        break  # leaving the block closes the connection: the server stops generating
        except httpx.HTTPError as exc:
            raise BackendError(
                f"the model server at {client.url} failed during the reply: {why(exc)}; "
                f"the turn was not committed (`turnflow server status` shows the embedded server)"
            ) from None
        except json.JSONDecodeError as exc:
            raise BackendError(f"the model server at {client.url} sent a malformed event: {exc}") from None
        reply.text = "".join(parts)
        reply.tool_calls = [
            ToolCall(call_id=piece["id"] or f"call_{index}", name=piece["name"], arguments=piece["arguments"] or "{}")
            for index, piece in sorted(self._tool_parts.items())
        ]
        reply.total_ms = (time.perf_counter() - start) * 1000
        if reply.finish_reason is None:
            raise BackendError(f"the model server at {client.url} ended the reply without finishing it")

    def _absorb(self, chunk: dict[str, Any]) -> Delta:
        reply = self.reply
        delta_text = ""
        delta_audio = ""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            delta_text += delta.get("content") or ""
            audio = delta.get("audio") or {}
            if audio.get("data"):
                reply.audio_b64.append(audio["data"])
                delta_audio += audio["data"]
            # a model that speaks streams its words as the audio's transcript
            delta_text += audio.get("transcript") or ""
            for call in delta.get("tool_calls") or []:  # OpenAI streams a call's id and name once, arguments in pieces
                piece = self._tool_parts.setdefault(int(call.get("index", 0)), {"id": "", "name": "", "arguments": ""})
                function = call.get("function") or {}
                piece["id"] = piece["id"] or call.get("id") or ""
                piece["name"] = piece["name"] or function.get("name") or ""
                piece["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                reply.finish_reason = choice["finish_reason"]
        timings = chunk.get("timings")
        if timings:
            reply.server_timings = timings
            reply.prompt_tokens_processed = timings.get("prompt_n")
            reply.prompt_tokens_cached = timings.get("cache_n")
            reply.completion_tokens = timings.get("predicted_n", reply.completion_tokens)
            if reply.prompt_tokens_processed is not None and reply.prompt_tokens_cached is not None:
                reply.prompt_tokens = reply.prompt_tokens_processed + reply.prompt_tokens_cached
        usage = chunk.get("usage")
        if usage:
            reply.prompt_tokens = reply.prompt_tokens or usage.get("prompt_tokens")
            reply.completion_tokens = usage.get("completion_tokens")
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if reply.prompt_tokens_cached is None and cached is not None:
                reply.prompt_tokens_cached = cached
                reply.prompt_tokens_processed = usage.get("prompt_tokens", 0) - cached
        return Delta(delta_text, delta_audio)


class LabelStripper:
    """Drops a speaker label (`Maya:`, then spaces) from the start of streamed text, holding back the text's
    beginning until it is clear whether it is one."""

    def __init__(self, labels: list[str]):
        self.labels = sorted({label for label in labels if label}, key=len, reverse=True)
        self._pending: str | None = "" if self.labels else None  # None: decided, text passes through

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that is surely not a label."""
        if self._pending is None:
            return text
        self._pending += text
        head = self._pending.lstrip()
        for label in self.labels:
            if head.startswith(label):
                rest = head[len(label):]
                if not rest.strip():
                    return ""  # the label, and perhaps the spaces after it: wait for the words
                self._pending = None
                return rest.lstrip()
        if any(label.startswith(head) for label in self.labels):
            return ""  # could still become a label
        out, self._pending = self._pending, None
        return out

    def flush(self) -> str:
        """What was held back, once the text ended (a label alone is dropped)."""
        out, self._pending = self._pending or "", None
        head = out.lstrip()
        return "" if any(head.startswith(label) for label in self.labels) else out


class StopTrimmer:
    """Cuts streamed text at the first stop sequence, holding back a tail that could be one's beginning.

    A model that copies a defused marker from its history (`<\u2060|im_end|\u2060>`: turnflow's own WORD
    JOINER inside it) has ended its turn just the same: the joiner is dropped before matching.
    """

    def __init__(self, stops: list[str]):
        self.stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that is surely reply text."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self._pending += text.replace(DEFUSE_MARK, "")
        cuts = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self._pending, self.stopped = self._pending[: min(cuts)], "", True
            return out
        keep = 0  # the longest tail that is a stop sequence's beginning
        for n in range(min(self._hold, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out

    def flush(self) -> str:
        """What was held back, once the reply ended without a stop sequence."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

