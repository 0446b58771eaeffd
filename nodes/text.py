"""Canonical text: the serialisation rules that keep prompt bytes identical across turns, and user-text hygiene.

What people say (and their names, transcripts, image captions and file names), and what personas reply before
it enters the history, has its chat-template control tokens defused: a WORD JOINER goes inside each one, so
no tokenizer reads it as a control token and nothing is lost. The control tokens are the model's own (its
tokenizer's special tokens, set for the turn with `control_tokens_for`), plus the common template families'.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

# Chat-template control tokens of the common template families (ChatML, Llama 3, Gemma, Mistral, Phi,
# DeepSeek...). Any `<|...|>` form is covered by the first alternative.
_CONTROL_TOKEN = re.compile(
    r"<\|[^<>|\s]{0,64}\|>"
    r"|<｜[^<>｜\s]{0,64}｜>"
    r"|</?s>"
    r"|\[/?INST\]|\[/?SYSTEM_PROMPT\]|\[/?AVAILABLE_TOOLS\]|\[/?TOOL_RESULTS\]"
    r"|<(?:start_of_turn|end_of_turn|bos|eos|pad)>",
    re.IGNORECASE,
)
DEFUSE_MARK = "\u2060"  # WORD JOINER: invisible, and splits the token text so no tokenizer reads it as a control token


_MARKUP = re.compile(r"<[^<>\s]{1,96}>|\[[^\[\]\s]{1,96}\]|\{[^{}\s]{1,96}\}")
"""Where a model's control tokens usually are: `<...>`, `[...]`, `{...}` spans (checked against its token set)."""


class ControlTokens:
    """A model's control tokens, and how to defuse them in text."""

    def __init__(self, tokens: Iterable[str] = ()):
        self.tokens = frozenset(t for t in tokens if len(t) > 1 and not t.isspace())
        loose = sorted((t for t in self.tokens if not _MARKUP.fullmatch(t)), key=len, reverse=True)
        self._loose = re.compile("|".join(re.escape(t) for t in loose)) if loose else None
        self.digest = hashlib.sha256("\n".join(sorted(self.tokens)).encode()).hexdigest()[:12]

    def neutralise(self, text: str) -> str:
        """`text` with every control token (the model's and the common families') defused."""
        if not text:
            return text
        text = _CONTROL_TOKEN.sub(_defuse, text)
        if self.tokens:
            text = _MARKUP.sub(lambda m: _defuse(m) if m.group(0) in self.tokens else m.group(0), text)
        if self._loose is not None:
            text = self._loose.sub(_defuse, text)
        return text


def _defuse(match: re.Match[str]) -> str:
    token = match.group(0)
    if len(token) == 2:
        return token[0] + DEFUSE_MARK + token[1]
    return token[0] + DEFUSE_MARK + token[1:-1] + DEFUSE_MARK + token[-1]


_NO_MODEL = ControlTokens()
_ACTIVE: contextvars.ContextVar[ControlTokens] = contextvars.ContextVar("control_tokens", default=_NO_MODEL)


@contextmanager
def control_tokens_for(tokens: ControlTokens) -> Iterator[None]:
    """Defuse this model's control tokens in everything neutralised inside the block (one turn)."""
    reset = _ACTIVE.set(tokens)
    try:
        yield
    finally:
        _ACTIVE.reset(reset)


def neutralise_control_tokens(text: str) -> str:
    """`text` with chat-template control tokens defused: `<|im_start|>` becomes `<\u2060|im_start|\u2060>`.

    The tokens are the common template families' and, inside `control_tokens_for`, the turn's model's own.
    """
    return _ACTIVE.get().neutralise(text)


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def canonical_json(value: Any) -> str:
    """One fixed serialisation: sorted keys, no whitespace variance, UTF-8 kept, floats in repr form."""
    return _CANONICAL.encode(value)  # one encoder: `json.dumps` with options builds a new one on every call


def with_preface(content: Any, preface: str) -> Any:
    """A user message's content with the turn's volatile text sections (`preface`) in front of it, as the persona
    that answers the message sees it."""
    if not preface:
        return content
    if isinstance(content, str):
        return f"{preface}\n\n{content}" if content else preface
    return [{"type": "text", "text": preface + "\n\n"}, *content]


def without_preface(content: Any, preface: str) -> Any:
    """The content `with_preface` made, without the preface (what was said, as everyone else sees it); content it
    did not make is given back as it is."""
    if not preface:
        return content
    if isinstance(content, str):
        if content == preface:
            return ""
        return content[len(preface) + 2:] if content.startswith(preface + "\n\n") else content
    if isinstance(content, list) and content and content[0] == {"type": "text", "text": preface + "\n\n"}:
        return content[1:]
    return content


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class CanonicalMessages(list[dict[str, Any]]):
    """Chat messages that carry their canonical text (one canonical JSON line per message), when the source made
    it from lines it keeps per message: a long history is then not serialised again every turn."""

    def __init__(self, messages: Iterable[dict[str, Any]], canonical: str):
        super().__init__(messages)
        self.canonical = canonical


class TextDigests:
    """SHA-256 of texts that mostly repeat or extend one seen before (a persona's system prompt, its history).

    A text that starts with a recently hashed one is hashed from where that one ended (hashlib state is copied,
    the prefix is compared, not hashed again); one that is the very object hashed before costs a lookup (its
    digest is kept: no hashing library is called). Any other text is hashed in full. Candidates are found by the
    text's first bytes, so histories that share a start (a room's personas) keep one candidate each.
    """

    _HEAD = 512
    _PER_HEAD = 4

    def __init__(self, capacity: int = 128):
        self._capacity = capacity
        self._seen: dict[str, list[tuple[str, Any, int, str]]] = {}

    def sha256(self, text: str) -> tuple[str, int]:
        """The hex SHA-256 of `text` encoded as UTF-8, and that encoding's length in bytes."""
        head = text[: self._HEAD]
        candidates = self._seen.pop(head, [])
        found: tuple[Any, int, str] | None = None
        for index, (before, state, size, hexdigest) in enumerate(candidates):
            if before is text:  # the very text hashed before: its digest as it was
                found = state, size, hexdigest
            elif len(before) <= len(text) and text.startswith(before):
                grown = state.copy()
                rest = text[len(before):].encode()
                grown.update(rest)
                found = grown, size + len(rest), grown.hexdigest()
            else:
                continue
            del candidates[index]
            break
        if found is None:
            encoded = text.encode()
            state = hashlib.sha256(encoded)
            found = state, len(encoded), state.hexdigest()
        candidates.insert(0, (text, *found))
        self._seen[head] = candidates[: self._PER_HEAD]  # re-inserted: the newest heads stay
        while len(self._seen) > self._capacity:
            self._seen.pop(next(iter(self._seen)))
        return found[2], found[1]


_DIGESTS = TextDigests()
_DIGESTS_LOCK = threading.Lock()


def sha256_text(text: str) -> str:
    """The hex SHA-256 of `text` (UTF-8), from an earlier text it extends when there is one (see `TextDigests`)."""
    return text_digest(text)[0]


def text_digest(text: str) -> tuple[str, int]:
    """`sha256_text` and the length of `text` in UTF-8 bytes."""
    with _DIGESTS_LOCK:
        return _DIGESTS.sha256(text)
