"""The optional extras: what to install when one is missing."""

from __future__ import annotations


def missing_agents(what: str, error: ImportError) -> ImportError:
    """The error for `what` without LiveKit Agents: why the import failed and how to install the `agents` extra."""
    return ImportError(f"{what} needs LiveKit Agents ({error}); install it with: pip install 'turnflow[agents]'")
