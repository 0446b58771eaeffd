"""`turnflow bench`: one scripted voice-room conversation, run twice on the same model server.

The two runs differ only in how each turn's prompt is built and sent:

- **turnflow**: stable-first assembly, each persona pinned to its own slot, composition cache on;
- **naive**: the same sources concatenated in completion order under a timestamped system prompt, no
  slot pinning, no composition cache (``Session(assembly="naive")``) — how most voice pipelines do it.

Both runs use the same recipe, personas, script, server and model, one after the other (turnflow
first, so the naive run can never evict its slots). Every token count comes from the server's own
``timings`` (``prompt_n`` processed, ``cache_n`` reused), read by the turn engine into its report.

The bench writes its recipe folder into the output folder: the example personas (for more than four,
variants with their own id, name and text), the example recipe's rules, and an invariant
``reference_notes`` source that pads each persona's prompt to ``--prompt-tokens`` (above the size of
the examples) or, below it, the examples are cut at line boundaries. The embedded server runs under a
``TURNFLOW_HOME`` inside the output folder and is always stopped at the end.

Output: ``turns.jsonl`` (one record per turn), ``summary.json``, ``summary.md`` and PNG plots.

The package: `fixture` (options, personas, recipe folder, script), `runner` (the run), `summary` (records,
totals, Markdown) and `plots`.
"""

from __future__ import annotations

from turnflow.bench.fixture import (
    BenchOptions,
    ScriptedTurn,
    conversation_script,
    persona_documents,
    reference_notes,
    write_recipe_folder,
)
from turnflow.bench.runner import rebuild_report, run_bench
from turnflow.bench.summary import BenchSummary, ModeSummary, TurnRecord, console_report, markdown_report

__all__ = [
    "BenchOptions", "BenchSummary", "ModeSummary", "ScriptedTurn", "TurnRecord", "conversation_script",
    "console_report", "markdown_report", "persona_documents", "rebuild_report", "reference_notes", "run_bench",
    "write_recipe_folder",
]
