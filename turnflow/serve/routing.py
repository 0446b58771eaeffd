"""Who answers in a shared room: the persona named in the utterance, else the last one addressed."""

from __future__ import annotations

import re
from collections.abc import Mapping


def _mention_pattern(words: str) -> re.Pattern[str]:
    """A whole-word, case-insensitive pattern for a name or id; ``-``, ``_`` and spaces inside it are alike."""
    parts = [re.escape(part) for part in re.split(r"[\s_-]+", words.strip()) if part]
    return re.compile(r"(?<!\w)" + r"[\s_-]+".join(parts) + r"(?!\w)", re.IGNORECASE)


def choose_persona(
    transcript: str | None,
    personas: Mapping[str, str],
    last_addressed: str | None,
    default: str | None,
) -> str:
    """Who answers under the rule ``named_else_last``: the persona named first, else the last one addressed.

    ``personas`` maps persona id to display name; a persona is named when its name or its id appears
    as a whole word in ``transcript`` (case-insensitive), and the earliest mention wins. Without a
    transcript (a backend that hears natively gets the audio and no STT runs, on purpose) nobody can be
    named, so the answer is the last persona addressed, else ``default``, else the first persona.
    """
    if not personas:
        raise ValueError("choose_persona needs at least one persona")
    for role, persona_id in (("last_addressed", last_addressed), ("default", default)):
        if persona_id is not None and persona_id not in personas:
            raise ValueError(f"{role} {persona_id!r} is not one of the personas {sorted(personas)}")
    if transcript:
        mentions = []
        for persona_id, name in personas.items():
            for words in {persona_id, name}:
                if words.strip() and (found := _mention_pattern(words).search(transcript)):
                    mentions.append((found.start(), -len(found.group()), persona_id))
        if mentions:
            return min(mentions)[2]
    return last_addressed or default or next(iter(personas))
