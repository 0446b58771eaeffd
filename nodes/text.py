"""Canonical text: the serialisation rules that keep prompt bytes identical across turns, and user-text hygiene."""

from __future__ import annotations

import json
import re
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
_ZWJ = "\u2060"  # WORD JOINER: invisible, and splits the token text so no tokenizer reads it as a control token


def neutralise_control_tokens(text: str) -> str:
    """`text` with chat-template control tokens defused: `<|im_start|>` becomes `<\u2060|im_start|\u2060>`."""
    return _CONTROL_TOKEN.sub(lambda m: m.group(0)[0] + _ZWJ + m.group(0)[1:-1] + _ZWJ + m.group(0)[-1], text)


def canonical_json(value: Any) -> str:
    """One fixed serialisation: sorted keys, no whitespace variance, UTF-8 kept, floats in repr form."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""
