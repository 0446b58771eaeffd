"""turnflow: every voice turn of an AI persona is a Hamilton dataflow declared by YAML recipes.

    import turnflow

    with turnflow.Session("recipes/voice-chat.yaml") as session:
        result = session.turn(persona="maya", room="standup", text="What's on the board?")
        print(result.report["llm"]["prompt_tokens_processed"])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Session": "turnflow.session",
    "TurnResult": "turnflow.session",
    "TurnError": "turnflow.session",
    "Event": "turnflow.cache",
    "Recipe": "turnflow.recipe",
    "Persona": "turnflow.recipe",
    "RecipeError": "turnflow.recipe",
    "load_recipe": "turnflow.recipe",
    "validate_paths": "turnflow.recipe",
    "Audio": "turnflow.nodes.media",
    "AudioError": "turnflow.nodes.media",
    "ImageError": "turnflow.nodes.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the public names on first use, so `import turnflow` stays light."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'turnflow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
