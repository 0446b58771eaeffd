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
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import yaml
from pydantic import BaseModel, Field

from turnflow.nodes import sources
from turnflow.recipe import BackendSpec, Persona, find_persona, load_recipe

Mode = Literal["turnflow", "naive"]
MODES: tuple[Mode, ...] = ("turnflow", "naive")
ASSEMBLY: dict[Mode, str] = {"turnflow": "stable_first", "naive": "naive"}

STEADY_FROM_TURN = 3
"""A persona's turns from this one on form the steady state that ratios and hit ratios are taken over."""

BACKEND_NAME = "bench"
PEOPLE = ("Dana", "Jonas", "Priya", "Sam", "Lee")
"""The people in the room; they take turns speaking."""

VARIANT_NAMES = ("Nora", "Otto", "Iris", "Felix", "Lena", "Hugo", "Vera", "Milo", "Ada", "Theo", "Rosa", "Emil")
"""Names of the persona variants made when the bench asks for more personas than the four examples."""

UTTERANCES = (
    "what's the one thing I should look at first this morning?",
    "can you give me the short version of where we are?",
    "is anything blocking us right now?",
    "what did we decide about the flaky integration tests?",
    "remind me who owns the payments migration.",
    "can you check whether the release branch is cut?",
    "what would you do next, in one sentence?",
    "does that change anything for the demo on Thursday?",
    "how long do you think that will take?",
    "who should I talk to about the staging database?",
    "can you say that again, but shorter?",
    "what's the risk if we leave it until next sprint?",
    "okay, and what happens after that?",
    "is there anything you need from me?",
    "should we move this to the parking lot?",
    "how sure are you about that?",
    "what's the status of ticket four twelve?",
    "can you summarise the last ten minutes?",
    "anything else before we wrap up?",
    "thanks, that's all for now.",
)
"""What the people say, in order; each line is addressed to a persona by name."""

NOTE_WORDS = (
    "team service release incident ticket review branch deploy latency budget owner customer queue retry "
    "timeout schema migration database cache index shard replica rollback canary metric alert dashboard "
    "runbook escalation handover priority sprint board column blocker estimate scope risk decision summary "
    "follow-up channel meeting agenda timebox standup retro demo feedback test coverage flaky pipeline build "
    "artifact version changelog dependency upgrade security token rotation access audit policy privacy "
    "export import report weekly daily morning afternoon evening quickly carefully usually rarely always "
    "never first then finally because although unless while before after during the a an of for with to "
    "in on at by from and or but is are was were has have will should could may might must can"
).split()
"""Vocabulary of the deterministic reference notes that pad prompts to the requested size."""

FIRST_TURN_OVERHEAD_TOKENS = 300
"""Tokens a first turn adds to the invariant sections: participants, adapters, time, the question, chat markup."""


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BenchOptions:
    """What `turnflow bench` runs."""

    personas: int = 6
    """Personas in the room (the four examples, then variants of them)."""
    turns: int = 20
    """Turns per persona."""
    prompt_tokens: int = 14000
    """Target size of a persona's prompt at its first turn, in the server's tokens."""
    out: Path | None = None
    """Output folder; default `bench-runs/<timestamp>/`."""
    backend_url: str | None = None
    """An OpenAI-compatible server to use instead of starting an embedded llama-server."""
    model: str = "bench"
    """Embedded model: a generated kind (`bench`: wide, prompt processing costs real time; `tiny`) or a GGUF path."""
    audio: bool = True
    """Include audio turns (every second turn of each persona) when the voice path is available."""
    rooms: Literal["per-persona", "shared"] = "per-persona"
    """`per-persona`: each persona in its own room, one person talking to it (a 1:1 voice call);
    `shared`: all personas in one room, sharing its history, so each persona's turn must also process
    what the others said since it last spoke."""
    quick: bool = False
    """The preset used (for the record)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    @classmethod
    def preset(cls, *, quick: bool = False, **overrides: Any) -> BenchOptions:
        """The full or `--quick` preset, with explicitly given values (not None) taking precedence."""
        base = cls(personas=3, turns=5, prompt_tokens=4000, quick=True) if quick else cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        options = replace(base, **given)
        for name in ("personas", "turns", "prompt_tokens"):
            if getattr(options, name) < 1:
                raise ValueError(f"bench --{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
        if options.prompt_tokens < 500:
            raise ValueError(f"bench --prompt-tokens must be at least 500, got {options.prompt_tokens}")
        if options.personas > 4 + len(VARIANT_NAMES):
            raise ValueError(f"bench --personas is at most {4 + len(VARIANT_NAMES)}, got {options.personas}")
        return options


# --------------------------------------------------------------------------------------------- records


class TurnRecord(BaseModel):
    """Everything measured about one turn of one mode."""

    mode: Mode
    seq: int = Field(description="position of the turn in the scripted conversation, from 1")
    persona: str
    persona_turn: int = Field(description="the persona's n-th turn, from 1")
    room: str
    speaker: str
    kind: Literal["text", "audio"]
    steady: bool = Field(description=f"the persona's turn {STEADY_FROM_TURN} or later")
    slot: int | None
    prompt_tokens: int
    prompt_tokens_processed: int
    prompt_tokens_cached: int
    completion_tokens: int | None
    invariant_sha256: str
    route_audio_in: str
    route_audio_out: str
    stt_invocations: int
    tts_invocations: int
    llm_invocations: int
    ttft_ms: float | None
    first_audio_ms: float | None
    e2e_ms: float
    model_ms: float | None
    turnflow_ms: float | None
    node_ms: dict[str, float]
    composition_cache_hits: int
    composition_cache_misses: int
    tier_violations: int
    server_rss_mb: float | None
    turnflow_rss_mb: float
    reply_chars: int


class ModeSummary(BaseModel):
    """One mode's totals; the unsuffixed token counts are over the steady state (each persona's turns 3+)."""

    turns: int
    steady_turns: int
    audio_turns: int
    prompt_tokens: int
    prompt_tokens_processed: int
    prompt_tokens_cached: int
    cache_hit_ratio: float | None = Field(description="cached ÷ prompt tokens over the steady state")
    prompt_tokens_all: int
    prompt_tokens_processed_all: int
    prompt_tokens_cached_all: int
    cache_hit_ratio_all: float | None
    processed_per_turn_p50: float | None
    e2e_ms_p50: float | None
    e2e_ms_p90: float | None
    e2e_ms_p50_all: float | None
    ttft_ms_p50: float | None
    first_audio_ms_p50: float | None
    model_ms_p50: float | None
    turnflow_overhead_ms_p50: float | None
    node_ms_p50: dict[str, float]
    new_tokens: int | None = Field(
        None, description="steady state: tokens new to each persona since its own last turn (others' messages, "
        "its last reply, the new question): what an ideal cache would still process"
    )
    reprocessed_tokens: int | None = Field(
        None, description="steady state: tokens processed beyond new_tokens, i.e. re-processed although the "
        "persona's slot had already seen them"
    )
    reprocessed_per_turn_p50: float | None = None
    composition_cache_hits: int
    composition_cache_misses: int
    composition_cache_hit_ratio: float | None
    stt_invocations: int
    stt_invocations_native: int
    tts_invocations: int
    llm_invocations: int
    tier_violations: int
    prefix_stable: bool
    wall_s: float


class BenchSummary(BaseModel):
    """The bench's result: both modes side by side, with what they were run on."""

    created_at: str
    out: str
    wall_s: float
    config: dict[str, Any]
    server: dict[str, Any]
    ratio_processed: float | None = Field(description="naive ÷ turnflow prompt tokens processed, steady state")
    ratio_processed_all_turns: float | None
    steady_state_from_turn: int = STEADY_FROM_TURN
    prefix_stable: bool
    prefix_stable_by_persona: dict[str, bool]
    prompt_tokens_first_turn: float
    turnflow: ModeSummary
    naive: ModeSummary
    audio_turns: int
    stt_invocations_native: int
    tts_invocations: int
    server_rss_mb: float | None
    turnflow_rss_mb: float
    load_average: dict[str, list[float]]
    cpu_count: int
    notes: list[str]
    plots: dict[str, str]
    files: dict[str, str]


# --------------------------------------------------------------------------------------------- the recipe folder


def example_recipe_path() -> Path:
    """The packaged example recipe the bench copies."""
    from turnflow import recipes

    return Path(recipes.__file__).parent / "voice-chat.yaml"


def reference_notes(persona: Persona, size_bytes: dict[str, int]) -> str:
    """Reference notes for the persona: deterministic text of about `size_bytes[persona id]` bytes."""
    target = int(size_bytes.get(persona.persona, 0))
    if target <= 0:
        return ""
    rng = random.Random(f"reference-notes:{persona.persona}")
    lines = [f"Reference notes for {persona.name}, for background only:"]
    size = len(lines[0]) + 1
    number = 1
    while size < target:
        words = [rng.choice(NOTE_WORDS) for _ in range(rng.randint(8, 18))]
        line = f"{number}. {' '.join(words).capitalize()}."
        lines.append(line)
        size += len(line.encode()) + 1
        number += 1
    return "\n".join(lines)


def _cut(text: str, fraction: float) -> str:
    """The first lines of `text` up to `fraction` of its bytes (at least one line)."""
    if fraction >= 1:
        return text
    budget = fraction * len(text.encode())
    kept: list[str] = []
    size = 0
    for line in text.splitlines():
        if kept and size + len(line.encode()) > budget:
            break
        kept.append(line)
        size += len(line.encode()) + 1
    return "\n".join(kept).rstrip() + "\n"


def persona_documents(count: int) -> list[dict[str, Any]]:
    """`count` persona documents: the four examples, then variants with their own id, name and text."""
    recipe = load_recipe(example_recipe_path())
    examples = [find_persona(recipe, pid) for pid in (recipe.personas or ())]
    documents = []
    for index in range(count):
        base = examples[index % len(examples)]
        doc = base.model_dump(mode="json", exclude_none=True)
        if index >= len(examples):
            name = VARIANT_NAMES[index - len(examples)]
            doc.update(
                persona=name.lower(),
                name=name,
                description=f"{name}: a variant of {base.name} for the benchmark. {base.description}",
                system_prompt=base.system_prompt.replace(base.name, name),
            )
        documents.append(doc)
    return documents


def _sized(
    documents: list[dict[str, Any]], rules: str, target_bytes: int
) -> tuple[list[dict[str, Any]], str, dict[str, int]]:
    """Cut the examples down when `target_bytes` is smaller than they are, and the padding each persona needs.

    Cuts keep whole lines and aim a little below the target, so that the padding (which is exact) fills the rest.
    """

    def invariant_bytes(doc: dict[str, Any], rules_text: str) -> int:
        return len(_invariant_text(doc, rules_text).encode())

    aim = 0.9 * target_bytes
    natural = sum(invariant_bytes(d, rules) for d in documents) / len(documents)
    cut_rules = _cut(rules, aim / natural)
    sized, padding = [], {}
    for doc in documents:
        fraction = aim / invariant_bytes(doc, rules)
        tools = sorted(doc.get("tools") or [], key=lambda t: t["function"]["name"])
        doc = {
            **doc,
            "system_prompt": _cut(doc["system_prompt"], fraction),
            "tools": tools[: max(1, round(min(1.0, fraction) * len(tools)))] if tools else [],
        }
        sized.append(doc)
        padding[doc["persona"]] = max(0, target_bytes - invariant_bytes(doc, cut_rules))
    return sized, cut_rules, padding


def _invariant_text(doc: dict[str, Any], rules: str, padding_bytes: int = 0) -> str:
    """A persona's invariant sections as the bench recipe renders them (identity, rules, tools, notes)."""
    persona = Persona.model_validate(doc)
    notes = reference_notes(persona, {persona.persona: padding_bytes})
    parts = (sources.persona_identity(persona), rules.strip(), sources.tool_definitions(persona), notes)
    return "\n\n".join(part for part in parts if part)


class _BlockDumper(yaml.SafeDumper):
    """YAML that writes multi-line text as `|` blocks, so the recipe reads like the examples."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_block)


def _dump_yaml(path: Path, data: Any, header: str = "") -> None:
    text = yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100_000)
    path.write_text(header + text, encoding="utf-8")


def backend_spec(options: BenchOptions, *, ctx_per_slot: int, audio: bool) -> BackendSpec:
    """The bench backend: an embedded llama-server with one slot per persona, or the given URL."""
    if options.backend_url:
        return BackendSpec(kind="openai", url=options.backend_url)
    from turnflow.modelgen import MODEL_KINDS

    generated = options.model in MODEL_KINDS
    model = f"generated:{options.model}" if generated else options.model
    return BackendSpec(
        kind="embedded",
        model=model,
        mmproj=model if (audio and generated) else None,
        slots=options.personas,
        ctx_per_slot=ctx_per_slot,
        max_resident_adapters=max(8, 3 * options.personas),  # every persona's adapters stay resident
    )


def context_per_slot(options: BenchOptions) -> int:
    """Context each slot needs: the prompt plus the history the conversation grows (generously)."""
    exchanges = options.turns * (1 if options.rooms == "per-persona" else options.personas)
    needed = options.prompt_tokens + exchanges * 320 + 2048
    return int(math.ceil(needed / 1024) * 1024)


def write_recipe_folder(folder: Path, options: BenchOptions, spec: BackendSpec, url: str, ctx_per_slot: int) -> Path:
    """Write the bench recipe, its personas and backends.yaml into `folder`; returns the recipe's path.

    Sizes are calibrated with the server's tokenizer: bytes per token of the examples first, then one
    correction per persona from the token count of its rendered invariant text.
    """
    example = yaml.safe_load(example_recipe_path().read_text(encoding="utf-8"))
    ratio = bytes_per_token(url, _calibration_sample())
    target_tokens = max(250, options.prompt_tokens - FIRST_TURN_OVERHEAD_TOKENS)
    documents = persona_documents(options.personas)
    documents, rules, padding = _sized(documents, example["rules"], int(target_tokens * ratio))
    for doc in documents:
        counted = count_tokens(url, _invariant_text(doc, rules, padding[doc["persona"]]))
        if counted:
            padding[doc["persona"]] = max(0, padding[doc["persona"]] + int((target_tokens - counted) * ratio))
    documents = _with_bench_adapters(documents, spec)
    (folder / "personas").mkdir(parents=True, exist_ok=True)
    for doc in documents:
        _dump_yaml(folder / "personas" / f"{doc['persona']}.yaml", doc, "# Written by `turnflow bench`.\n")
    notes = {
        "name": "reference_notes",
        "tier": "invariant",
        "cache_key": ["persona_id", "persona_version"],
        "fn": "turnflow.bench:reference_notes",
        "params": {"size_bytes": padding},
    }
    recipe = {
        **example,
        "recipe": "bench",
        "description": f"The voice-chat example sized to ~{options.prompt_tokens} prompt tokens for `turnflow bench`.",
        "backend": BACKEND_NAME,
        "personas": [d["persona"] for d in documents],
        "rules": rules,
        "sources": [*example["sources"], notes],
        "budget": {"max_prompt_tokens": ctx_per_slot},
    }
    path = folder / "bench.yaml"
    _dump_yaml(path, recipe, "# Written by `turnflow bench`: the voice-chat example, sized for the benchmark.\n")
    backend = spec.model_dump(mode="json", exclude_defaults=True)
    _dump_yaml(folder / "backends.yaml", {"backends": {BACKEND_NAME: backend}}, "# Written by `turnflow bench`.\n")
    return path


def _with_bench_adapters(documents: list[dict[str, Any]], spec: BackendSpec) -> list[dict[str, Any]]:
    """The personas' voice and skill adapters made for the bench's generated model (a variant of each id in
    the bench's registry); for any other model the personas run without adapters."""
    from turnflow.adapters import AdapterRegistry
    from turnflow.modelgen import MODEL_KINDS

    model = (spec.model or "").removeprefix("generated:")
    if spec.kind != "embedded" or model not in MODEL_KINDS:
        return [{**doc, "voice": {k: v for k, v in doc.get("voice", {}).items() if k != "adapter"}, "skills": []}
                for doc in documents]
    wanted: dict[str, str] = {}
    for doc in documents:
        voice = doc.get("voice", {}).get("adapter")
        if voice:
            wanted[voice] = "voice"
        wanted.update({skill["adapter"]: "skill" for skill in doc.get("skills", [])})
    registry = AdapterRegistry()
    for adapter_id, kind in wanted.items():
        registry.add(f"generated:{model}/{adapter_id}", kind=kind, adapter_id=adapter_id,  # type: ignore[arg-type]
                     authors=("turnflow bench",))
    return documents


# --------------------------------------------------------------------------------------------- measuring


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process in MB (this process when `pid` is None), from /proc."""
    path = f"/proc/{pid}/status" if pid else "/proc/self/status"
    try:
        with open(path) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if pid is None:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return None


def count_tokens(url: str, text: str) -> int | None:
    """Tokens of `text` in the server's tokenizer (llama-server's `/tokenize`), or None when it has none."""
    from turnflow.nodes.llm import server_root

    try:
        response = httpx.post(server_root(url) + "/tokenize", json={"content": text}, timeout=60.0)
        tokens = response.json().get("tokens") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return len(tokens) if tokens else None


def bytes_per_token(url: str, sample: str) -> float:
    """UTF-8 bytes per token of `sample` in the server's tokenizer (`/tokenize`, else a 1-token completion)."""
    from turnflow.nodes.llm import api_base

    counted = count_tokens(url, sample)
    if counted:
        return len(sample.encode()) / counted
    with httpx.Client(timeout=600.0) as http:
        response = http.post(
            api_base(url) + "/chat/completions",
            json={"messages": [{"role": "user", "content": sample}], "max_tokens": 1},
        )
        response.raise_for_status()
        return len(sample.encode()) / int(response.json()["usage"]["prompt_tokens"])


def _calibration_sample() -> str:
    """The first example persona's invariant text: what the bench's prompts are mostly made of."""
    recipe = load_recipe(example_recipe_path())
    persona = find_persona(recipe, (recipe.personas or ("maya",))[0])
    parts = (sources.persona_identity(persona), sources.recipe_rules(recipe), sources.tool_definitions(persona))
    return "\n\n".join(parts)


def _percentile(values: Sequence[float | None], q: float) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.percentile(present, q)), 2) if present else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the bench runs, so that its model server is stopped on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _turnflow_home(path: Path) -> Iterator[None]:
    """Point TURNFLOW_HOME at `path` for the bench, so its server never meets the user's."""
    previous = os.environ.get("TURNFLOW_HOME")
    os.environ["TURNFLOW_HOME"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TURNFLOW_HOME", None)
        else:
            os.environ["TURNFLOW_HOME"] = previous


# --------------------------------------------------------------------------------------------- the script


@dataclass(frozen=True)
class ScriptedTurn:
    """One turn of the scripted conversation: who says what to which persona, in which room."""

    seq: int
    persona: str
    persona_name: str
    persona_turn: int
    room: str
    speaker: str
    text: str
    kind: Literal["text", "audio"]


def conversation_script(
    personas: Sequence[tuple[str, str]], turns: int, *, audio: bool, rooms: str
) -> list[ScriptedTurn]:
    """The conversation: rounds in which each person addresses the next persona by name; audio every second turn."""
    room_per_persona = rooms == "per-persona"
    script: list[ScriptedTurn] = []
    for round_no in range(turns):
        for index, (persona_id, name) in enumerate(personas):
            seq = len(script) + 1
            speaker = PEOPLE[index % len(PEOPLE)] if room_per_persona else PEOPLE[(seq - 1) % len(PEOPLE)]
            utterance = UTTERANCES[(round_no + index) % len(UTTERANCES)]
            script.append(
                ScriptedTurn(
                    seq=seq,
                    persona=persona_id,
                    persona_name=name,
                    persona_turn=round_no + 1,
                    room=persona_id if room_per_persona else "room",
                    speaker=speaker,
                    text=f"{name}, {utterance}",
                    kind="audio" if audio and round_no % 2 == 1 else "text",
                )
            )
    return script


def voice_path_available() -> bool:
    """Whether `Session.turn` takes `audio=` (the voice path is built)."""
    import inspect

    from turnflow.session import Session

    return "audio" in inspect.signature(Session.turn).parameters


def _speak_script(script: Sequence[ScriptedTurn]) -> dict[int, Any]:
    """The people's audio for the audio turns, spoken by espeak-ng (one voice per person)."""
    from turnflow.nodes.speech import EspeakTts, TtsVoice

    voices = ("en-us", "en-us+f3", "en-gb", "en-us+m3", "en-us+f2")
    tts = EspeakTts()
    return {
        turn.seq: tts.synthesize(turn.text, TtsVoice(voice=voices[PEOPLE.index(turn.speaker) % len(voices)]))
        for turn in script
        if turn.kind == "audio"
    }


# --------------------------------------------------------------------------------------------- running


@dataclass
class _Run:
    """State of one bench run."""

    options: BenchOptions
    out: Path
    records: list[TurnRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    server_pid: int | None = None


def _record(mode: Mode, turn: ScriptedTurn, report: dict[str, Any], e2e_ms: float, run: _Run) -> TurnRecord:
    """A turn's report reduced to the bench's per-turn record."""
    llm = report["llm"]
    timings = report.get("timings_ms") or {}
    route = report.get("route") or {}
    invocations = report.get("invocations") or {}
    cache = report.get("composition_cache") or {}
    processed = int(llm.get("prompt_tokens_processed") or 0)
    cached = int(llm.get("prompt_tokens_cached") or 0)
    return TurnRecord(
        mode=mode,
        seq=turn.seq,
        persona=turn.persona,
        persona_turn=turn.persona_turn,
        room=report.get("room", turn.room),
        speaker=turn.speaker,
        kind=turn.kind,
        steady=turn.persona_turn >= min(STEADY_FROM_TURN, run.options.turns),
        slot=llm.get("slot"),
        prompt_tokens=int(llm.get("prompt_tokens") or processed + cached),
        prompt_tokens_processed=processed,
        prompt_tokens_cached=cached,
        completion_tokens=llm.get("completion_tokens"),
        invariant_sha256=(report.get("prefix") or {}).get("invariant_sha256", ""),
        route_audio_in=str(route.get("audio_in", "none")),
        route_audio_out=str(route.get("audio_out", "none")),
        stt_invocations=int(invocations.get("stt", 0)),
        tts_invocations=int(invocations.get("tts", 0)),
        llm_invocations=int(invocations.get("llm", 1)),
        ttft_ms=llm.get("ttft_ms"),
        first_audio_ms=timings.get("first_audio"),
        e2e_ms=round(e2e_ms, 2),
        model_ms=timings.get("model"),
        turnflow_ms=timings.get("turnflow"),
        node_ms={k: float(v) for k, v in (timings.get("nodes") or {}).items()},
        composition_cache_hits=int(cache.get("hits", 0)),
        composition_cache_misses=int(cache.get("misses", 0)),
        tier_violations=len(report.get("tier_violations") or []),
        server_rss_mb=rss_mb(run.server_pid) if run.server_pid else None,
        turnflow_rss_mb=rss_mb() or 0.0,
        reply_chars=len(report.get("reply") or ""),
    )


def _run_mode(
    mode: Mode,
    recipe_path: Path,
    script: Sequence[ScriptedTurn],
    clips: dict[int, Any],
    run: _Run,
    progress: Any,
    sink: Any,
) -> None:
    """Run the whole script in one mode, in its own state folder and room(s), on the shared server."""
    import inspect

    from turnflow.session import Session

    started = time.perf_counter()
    speaks = "audio_sink" in inspect.signature(Session.turn).parameters  # every reply is spoken into the room
    with Session(
        recipe_path, backend=BACKEND_NAME, state_dir=run.out / "state" / mode, assembly=ASSEMBLY[mode],
        warn=lambda message: run.warnings.append(f"{mode}: {message}"),
    ) as session:
        # A naive turn re-reads a ~40k-token prompt on 2 cores: allow minutes between streamed bytes.
        session.backend.client._http.timeout = httpx.Timeout(1800.0, connect=10.0)
        for room in sorted({t.room for t in script}):  # everyone is in the call before anyone speaks
            for person in sorted({t.speaker for t in script if t.room == room}):
                session.join(room, person, display_name=person)
            for persona_id, name in sorted({(t.persona, t.persona_name) for t in script if t.room == room}):
                session.join(room, persona_id, kind="persona", display_name=name)
        progress.set_description(mode)
        for turn in script:
            kwargs: dict[str, Any] = {"persona": turn.persona, "room": turn.room, "speaker": turn.speaker}
            if turn.kind == "audio":
                kwargs["audio"] = clips[turn.seq]
            else:
                kwargs["text"] = turn.text
            if speaks:
                kwargs["audio_sink"] = _played
            turn_started = time.perf_counter()
            result = session.turn(**kwargs)
            record = _record(mode, turn, result.report, (time.perf_counter() - turn_started) * 1000, run)
            run.records.append(record)
            sink.write(record.model_dump_json() + "\n")
            sink.flush()
            progress.set_postfix(processed=record.prompt_tokens_processed, e2e_ms=round(record.e2e_ms), refresh=False)
            progress.update(1)
    run.wall_s[mode] = round(time.perf_counter() - started, 2)


def _preload_adapters(server: Any, recipe: Any) -> str:
    """Page every persona's adapters in before the clock starts (one restart), so the run measures turns only."""
    from turnflow.adapters import AdapterRegistry, resolve_base, resolve_set
    from turnflow.server import LoraFile

    registry, base = AdapterRegistry(), resolve_base(server.spec.model or "generated:tiny")[0]
    needed: dict[str, LoraFile] = {}
    for persona_id in recipe.personas or ():
        voice, skills = find_persona(recipe, persona_id).adapter_refs
        for adapter in resolve_set(voice, skills, registry, base).loras:
            needed[adapter.key] = LoraFile(adapter.key, adapter.id, str(adapter.path))
    lease = server.lease(list(needed.values()))
    lease.release()
    return str(lease.url)


def _played(audio: Any) -> None:
    """Where the bench plays the replies' audio: nowhere (time to first audio is what it measures)."""


def run_bench(options: BenchOptions) -> BenchSummary:
    """Run both modes on one server and write the raw data, the summary and the plots to the output folder."""
    from tqdm import tqdm

    from turnflow.server import EmbeddedServer

    created = datetime.now(UTC)
    out = Path(options.out or Path("bench-runs") / created.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(options, out)
    notes: list[str] = []
    load_start = list(os.getloadavg())
    started = time.perf_counter()

    audio = options.audio and voice_path_available()
    if options.audio and not audio:
        notes.append("audio turns skipped: Session.turn does not take audio= in this build (voice path missing)")
    if audio and shutil.which("espeak-ng") is None:
        audio = False
        notes.append("audio turns skipped: espeak-ng (which speaks the people's lines) is not installed")
    ctx_per_slot = context_per_slot(options)
    spec = backend_spec(options, ctx_per_slot=ctx_per_slot, audio=audio)

    with _turnflow_home(out / "home"), _exit_on_sigterm():
        server = EmbeddedServer(BACKEND_NAME, spec) if spec.kind == "embedded" else None
        try:
            url = server.up() if server else str(spec.url)
            recipe_path = write_recipe_folder(out / "recipe", options, spec, url, ctx_per_slot)
            recipe = load_recipe(recipe_path)
            if server:
                url = _preload_adapters(server, recipe)
                run.server_pid = server.status().get("pid")
            names = [(pid, find_persona(recipe, pid).name) for pid in recipe.personas or ()]
            script = conversation_script(
                names, options.turns, audio=audio, rooms=options.rooms
            )
            clips = _speak_script(script) if audio else {}
            with (
                open(out / "turns.jsonl", "w", encoding="utf-8") as sink,
                tqdm(
                    total=len(script) * len(MODES), unit="turn", file=sys.stderr, disable=not options.progress,
                    dynamic_ncols=True,
                ) as progress,
            ):
                for mode in MODES:
                    _run_mode(mode, recipe_path, script, clips, run, progress, sink)
            server_peak = _peak_rss_mb(run.server_pid)
        finally:
            if server:
                server.down()

    notes.append(
        "the turnflow run goes first, then the naive run (so naive requests never evict turnflow's slots); "
        "latencies include whatever else the machine was doing (see load_average)"
    )
    notes.extend(run.warnings[:20])
    server_info = {
        "url": url,
        "embedded": server is not None,
        "model": spec.model if server else None,
        "mmproj": spec.mmproj,
        "slots": spec.slots if server else None,
        "ctx_per_slot": ctx_per_slot if server else None,
        "pid": run.server_pid,
    }
    summary = summarise(
        run,
        created=created,
        wall_s=time.perf_counter() - started,
        server=server_info,
        server_peak_mb=server_peak,
        load={"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        notes=notes,
    )
    summary.files = {
        "turns": str(out / "turns.jsonl"),
        "summary_json": str(out / "summary.json"),
        "summary_md": str(out / "summary.md"),
        "recipe": str(out / "recipe" / "bench.yaml"),
    }
    return _write_report(summary, run.records, out)


def _write_report(summary: BenchSummary, records: Sequence[TurnRecord], out: Path) -> BenchSummary:
    """Draw the plots and write `summary.json` and `summary.md` into `out`."""
    summary.plots = write_plots(records, summary, out)
    (out / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown_report(summary), encoding="utf-8")
    return summary


def rebuild_report(out: Path) -> BenchSummary:
    """Re-write an earlier run's summary, table and plots from its `turns.jsonl` (with this turnflow's metrics).

    What was measured stays as it was: the per-turn records, the server, the load and the wall times.
    """
    try:
        before = BenchSummary.model_validate_json((out / "summary.json").read_text(encoding="utf-8"))
        with open(out / "turns.jsonl", encoding="utf-8") as lines:
            records = [TurnRecord.model_validate_json(line) for line in lines if line.strip()]
    except (OSError, ValueError) as error:
        raise ValueError(f"{out}: not a finished bench run (summary.json and turns.jsonl): {error}") from error
    by_mode = {mode: [r for r in records if r.mode == mode] for mode in MODES}
    summary = before.model_copy(
        update={
            "turnflow": summarise_mode(by_mode["turnflow"], before.turnflow.wall_s),
            "naive": summarise_mode(by_mode["naive"], before.naive.wall_s),
            "out": str(out),
        }
    )
    return _write_report(summary, records, out)


def _peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident memory (VmHWM) of a running process, in MB."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------- summary


def summarise_mode(records: Sequence[TurnRecord], wall_s: float) -> ModeSummary:
    """One mode's totals and distributions."""
    steady = [r for r in records if r.steady]
    nodes = sorted({name for r in records for name in r.node_ms})
    node_p50 = {n: _percentile([r.node_ms.get(n) for r in records], 50) or 0.0 for n in nodes}
    hashes: dict[str, set[str]] = {}
    for r in records:
        hashes.setdefault(r.persona, set()).add(r.invariant_sha256)
    hits = sum(r.composition_cache_hits for r in records)
    misses = sum(r.composition_cache_misses for r in records)
    new_and_again = _new_and_reprocessed(records)

    def total(rows: Sequence[TurnRecord], name: str) -> int:
        return sum(int(getattr(r, name)) for r in rows)

    return ModeSummary(
        turns=len(records),
        steady_turns=len(steady),
        audio_turns=sum(r.kind == "audio" for r in records),
        prompt_tokens=total(steady, "prompt_tokens"),
        prompt_tokens_processed=total(steady, "prompt_tokens_processed"),
        prompt_tokens_cached=total(steady, "prompt_tokens_cached"),
        cache_hit_ratio=_ratio(total(steady, "prompt_tokens_cached"), total(steady, "prompt_tokens")),
        prompt_tokens_all=total(records, "prompt_tokens"),
        prompt_tokens_processed_all=total(records, "prompt_tokens_processed"),
        prompt_tokens_cached_all=total(records, "prompt_tokens_cached"),
        cache_hit_ratio_all=_ratio(total(records, "prompt_tokens_cached"), total(records, "prompt_tokens")),
        processed_per_turn_p50=_percentile([r.prompt_tokens_processed for r in steady], 50),
        e2e_ms_p50=_percentile([r.e2e_ms for r in steady], 50),
        e2e_ms_p90=_percentile([r.e2e_ms for r in steady], 90),
        e2e_ms_p50_all=_percentile([r.e2e_ms for r in records], 50),
        ttft_ms_p50=_percentile([r.ttft_ms for r in steady], 50),
        first_audio_ms_p50=_percentile([r.first_audio_ms for r in steady], 50),
        model_ms_p50=_percentile([r.model_ms for r in steady], 50),
        turnflow_overhead_ms_p50=_percentile([r.turnflow_ms for r in steady], 50),
        node_ms_p50=dict(sorted(node_p50.items(), key=lambda item: -item[1])),
        new_tokens=sum(new for new, _ in new_and_again),
        reprocessed_tokens=sum(again for _, again in new_and_again),
        reprocessed_per_turn_p50=_percentile([again for _, again in new_and_again], 50),
        composition_cache_hits=hits,
        composition_cache_misses=misses,
        composition_cache_hit_ratio=_ratio(hits, hits + misses),
        stt_invocations=total(records, "stt_invocations"),
        stt_invocations_native=sum(r.stt_invocations for r in records if r.route_audio_in == "native"),
        tts_invocations=total(records, "tts_invocations"),
        llm_invocations=total(records, "llm_invocations"),
        tier_violations=total(records, "tier_violations"),
        prefix_stable=bool(hashes) and all(len(h) == 1 for h in hashes.values()),
        wall_s=wall_s,
    )


def _new_and_reprocessed(records: Sequence[TurnRecord]) -> list[tuple[int, int]]:
    """Per steady-state turn: (tokens new to the persona since its last turn, tokens processed beyond those).

    New = this prompt's length minus the persona's previous prompt and reply: what the others said in the
    meantime, the persona's own reply as it went into the history, the new question and the volatile tail.
    """
    seen: dict[str, int] = {}
    counts: list[tuple[int, int]] = []
    for r in sorted(records, key=lambda r: r.seq):
        before = seen.get(r.persona)
        if before is not None and r.steady:
            new = max(0, r.prompt_tokens - before)
            counts.append((new, max(0, r.prompt_tokens_processed - new)))
        seen[r.persona] = r.prompt_tokens + (r.completion_tokens or 0)
    return counts


def summarise(
    run: _Run,
    *,
    created: datetime,
    wall_s: float,
    server: dict[str, Any],
    server_peak_mb: float | None,
    load: dict[str, list[float]],
    notes: list[str],
) -> BenchSummary:
    """Both modes side by side."""
    options = run.options
    by_mode = {mode: [r for r in run.records if r.mode == mode] for mode in MODES}
    modes = {mode: summarise_mode(by_mode[mode], run.wall_s.get(mode, 0.0)) for mode in MODES}
    tf, naive = modes["turnflow"], modes["naive"]
    stable: dict[str, bool] = {}
    for r in by_mode["turnflow"]:
        stable.setdefault(r.persona, True)
    for persona in stable:
        stable[persona] = len({r.invariant_sha256 for r in by_mode["turnflow"] if r.persona == persona}) == 1
    first_turns = [r.prompt_tokens for r in by_mode["turnflow"] if r.persona_turn == 1]
    server_rss = [r.server_rss_mb for r in run.records if r.server_rss_mb is not None]
    peak = max([*server_rss, *([server_peak_mb] if server_peak_mb else [])], default=None)
    if tf.audio_turns == 0:
        notes = [*notes, "audio_turns: 0 — time to first audio and STT/TTS counts cover text turns only"]
    notes.append(
        f"ratio_processed and cache_hit_ratio are over each persona's turns {STEADY_FROM_TURN}+ (its first turns "
        f"fill its slot); ratio_processed_all_turns counts every turn"
    )
    return BenchSummary(
        created_at=created.isoformat(timespec="seconds"),
        out=str(run.out),
        wall_s=round(wall_s, 1),
        config={
            "personas": options.personas,
            "turns": options.turns,
            "prompt_tokens": options.prompt_tokens,
            "quick": options.quick,
            "model": options.model if not options.backend_url else None,
            "backend_url": options.backend_url,
            "rooms": options.rooms,
            "audio": options.audio,
        },
        server=server,
        ratio_processed=_ratio(naive.prompt_tokens_processed, tf.prompt_tokens_processed),
        ratio_processed_all_turns=_ratio(naive.prompt_tokens_processed_all, tf.prompt_tokens_processed_all),
        prefix_stable=bool(stable) and all(stable.values()),
        prefix_stable_by_persona=stable,
        prompt_tokens_first_turn=round(float(np.mean(first_turns)), 1) if first_turns else 0.0,
        turnflow=tf,
        naive=naive,
        audio_turns=tf.audio_turns + naive.audio_turns,
        stt_invocations_native=tf.stt_invocations_native + naive.stt_invocations_native,
        tts_invocations=tf.tts_invocations + naive.tts_invocations,
        server_rss_mb=peak,
        turnflow_rss_mb=max((r.turnflow_rss_mb for r in run.records), default=rss_mb() or 0.0),
        load_average=load,
        cpu_count=os.cpu_count() or 0,
        notes=notes,
        plots={},
        files={},
    )


def _fmt_int(value: int | float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return ""
    return f"{numerator / denominator:,.1f}×"


def _rooms_label(rooms: str) -> str:
    return {"per-persona": "a room each", "shared": "one shared room"}.get(rooms, rooms)


def markdown_report(summary: BenchSummary) -> str:
    """The summary as Markdown: the headline table, turnflow's overhead per node, and the plots."""
    tf, nv = summary.turnflow, summary.naive
    c = summary.config
    rooms = _rooms_label(c["rooms"])
    model = summary.server.get("model") or summary.server.get("url")
    steady_ratio = _fmt_ratio(nv.prompt_tokens_processed, tf.prompt_tokens_processed)
    all_ratio = _fmt_ratio(nv.prompt_tokens_processed_all, tf.prompt_tokens_processed_all)
    lines = [
        f"# turnflow bench — {summary.created_at}",
        "",
        f"{c['personas']} personas ({rooms}), {c['turns']} turns each, ~{summary.prompt_tokens_first_turn:,.0f}-token "
        f"prompts at a persona's first turn; {tf.audio_turns} audio turns per mode. Model server: {model}, "
        f"{summary.server.get('slots') or '?'} slots. Both modes on the same server, one after the other. "
        f"Token counts are the server's own `timings`. Steady state = each persona's turns "
        f"{summary.steady_state_from_turn}+. {summary.cpu_count} CPU cores, load average "
        f"{summary.load_average['start'][0]:.1f} → {summary.load_average['end'][0]:.1f}; wall time "
        f"{_fmt_s(summary.wall_s)}.",
        "",
        "| | turnflow | naive | naive ÷ turnflow |",
        "| --- | ---: | ---: | ---: |",
        f"| prompt tokens processed, steady state | {_fmt_int(tf.prompt_tokens_processed)} | "
        f"{_fmt_int(nv.prompt_tokens_processed)} | **{steady_ratio}** |",
        f"| prompt tokens processed, all turns | {_fmt_int(tf.prompt_tokens_processed_all)} | "
        f"{_fmt_int(nv.prompt_tokens_processed_all)} | {all_ratio} |",
        f"| prompt tokens sent, all turns | {_fmt_int(tf.prompt_tokens_all)} | {_fmt_int(nv.prompt_tokens_all)} | |",
        f"| KV cache hit ratio (cached ÷ prompt), steady state | {tf.cache_hit_ratio or 0:.3f} | "
        f"{nv.cache_hit_ratio or 0:.3f} | |",
        f"| tokens processed per turn, p50 | {_fmt_int(tf.processed_per_turn_p50)} | "
        f"{_fmt_int(nv.processed_per_turn_p50)} | {_fmt_ratio(nv.processed_per_turn_p50, tf.processed_per_turn_p50)} |",
        f"| tokens new to the persona since its last turn, steady state | {_fmt_int(tf.new_tokens)} | "
        f"{_fmt_int(nv.new_tokens)} | |",
        f"| tokens re-processed although the slot had seen them, per turn p50 | "
        f"{_fmt_int(tf.reprocessed_per_turn_p50)} | {_fmt_int(nv.reprocessed_per_turn_p50)} | "
        f"{_fmt_ratio(nv.reprocessed_per_turn_p50, tf.reprocessed_per_turn_p50)} |",
        f"| end-to-end latency p50 / p90 | {_fmt_ms(tf.e2e_ms_p50)} / {_fmt_ms(tf.e2e_ms_p90)} | "
        f"{_fmt_ms(nv.e2e_ms_p50)} / {_fmt_ms(nv.e2e_ms_p90)} | {_fmt_ratio(nv.e2e_ms_p50, tf.e2e_ms_p50)} |",
        f"| time to first token p50 | {_fmt_ms(tf.ttft_ms_p50)} | {_fmt_ms(nv.ttft_ms_p50)} | "
        f"{_fmt_ratio(nv.ttft_ms_p50, tf.ttft_ms_p50)} |",
        f"| time to first audio p50 | {_fmt_ms(tf.first_audio_ms_p50)} | {_fmt_ms(nv.first_audio_ms_p50)} | "
        f"{_fmt_ratio(nv.first_audio_ms_p50, tf.first_audio_ms_p50)} |",
        f"| turnflow's own time per turn p50 | {_fmt_ms(tf.turnflow_overhead_ms_p50)} | "
        f"{_fmt_ms(nv.turnflow_overhead_ms_p50)} | |",
        f"| composition cache hits | {tf.composition_cache_hits:,} of "
        f"{tf.composition_cache_hits + tf.composition_cache_misses:,} | off | |",
        f"| STT / TTS / LLM calls | {tf.stt_invocations} / {tf.tts_invocations} / {tf.llm_invocations} | "
        f"{nv.stt_invocations} / {nv.tts_invocations} / {nv.llm_invocations} | |",
        f"| STT calls on turns the model heard natively | {tf.stt_invocations_native} | "
        f"{nv.stt_invocations_native} | |",
        f"| invariant prefix stable for every persona | {'yes' if tf.prefix_stable else 'NO'} | "
        f"{'yes' if nv.prefix_stable else 'no'} | |",
        f"| wall time of the mode | {_fmt_s(tf.wall_s)} | {_fmt_s(nv.wall_s)} | |",
        "",
        f"Model server resident memory, peak: {_fmt_int(summary.server_rss_mb)} MB (shared by both modes); "
        f"turnflow process: {_fmt_int(summary.turnflow_rss_mb)} MB.",
        "",
        "Time per node of the turn DAG (p50 over the turnflow run). `speech` reads the model's stream and speaks it "
        "(model and TTS time), `transcript` is the STT bridge; the rest is turnflow's own work:",
        "",
        "| node | p50 |",
        "| --- | ---: |",
    ]
    for name, ms in list(tf.node_ms_p50.items())[:12]:
        lines.append(f"| `{name}` | {ms:.2f} ms |")
    if summary.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in summary.notes]
    if summary.plots:
        lines += [""] + [f"![{name}]({Path(path).name})" for name, path in summary.plots.items()]
    return "\n".join(lines) + "\n"


def console_report(summary: BenchSummary) -> str:
    """A few lines for the terminal: the headline numbers and where everything was written."""
    tf, nv = summary.turnflow, summary.naive
    plots = ", ".join(Path(p).name for p in summary.plots.values())
    return "\n".join(
        [
            f"ratio_processed {summary.ratio_processed} (steady state; all turns: {summary.ratio_processed_all_turns})",
            f"cache_hit_ratio turnflow {tf.cache_hit_ratio} | naive {nv.cache_hit_ratio}",
            f"prompt tokens processed turnflow {tf.prompt_tokens_processed:,} | naive {nv.prompt_tokens_processed:,}",
            f"e2e p50 turnflow {_fmt_ms(tf.e2e_ms_p50)} | naive {_fmt_ms(nv.e2e_ms_p50)}",
            f"prefix stable: {summary.prefix_stable}; server RSS peak {summary.server_rss_mb} MB; "
            f"wall {_fmt_s(summary.wall_s)}",
            *[f"note: {n}" for n in summary.notes],
            f"wrote {summary.out}/ (summary.md, summary.json, turns.jsonl, {plots})",
        ]
    )


# --------------------------------------------------------------------------------------------- plots

COLORS: dict[str, str] = {"turnflow": "#0f7b6c", "naive": "#d9603b"}
"""One colour per mode, the same in every plot."""


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)


def _tick_ms(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"


def _human(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def write_plots(records: Sequence[TurnRecord], summary: BenchSummary, out: Path) -> dict[str, str]:
    """PNG plots: tokens processed per turn (and cumulative), latency distribution, memory over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "figure.dpi": 110})
    by_mode = {mode: sorted((r for r in records if r.mode == mode), key=lambda r: r.seq) for mode in MODES}
    plots: dict[str, str] = {}
    subtitle = (
        f"{summary.config['personas']} personas ({_rooms_label(summary.config['rooms'])}) · "
        f"{summary.config['turns']} turns each · "
        f"~{summary.prompt_tokens_first_turn / 1000:.1f}k-token prompts · {summary.server.get('model') or 'server'}"
    )

    # 1. tokens processed per turn, and cumulative
    fig, (ax, ax_sum) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    warm = [r.seq for r in by_mode["turnflow"] if not r.steady]
    last = max((r.seq for r in records), default=1)
    if warm:
        ax.axvspan(0.5, max(warm) + 0.5, color="#f2f2f2", zorder=0)
        label = f"warm-up: each persona's turns 1–{STEADY_FROM_TURN - 1}"
        if max(warm) > 0.25 * last:
            ax.text((max(warm) + 1) / 2, 0.02, label.replace(": ", ":\n"), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="#777777")
        else:
            ax.text(max(warm) + 0.01 * last, 0.02, "← " + label, transform=ax.get_xaxis_transform(),
                    ha="left", va="bottom", fontsize=8, color="#777777")
    tf_rows = by_mode["turnflow"]
    dense = len(tf_rows) > 40
    ax.plot([r.seq for r in tf_rows], [r.prompt_tokens for r in tf_rows], color="#9a9a9a", lw=1, ls="--",
            label="prompt size (tokens sent)")
    for mode in MODES:
        rows = by_mode[mode]
        ax.plot([r.seq for r in rows], [max(1, r.prompt_tokens_processed) for r in rows], color=COLORS[mode],
                lw=1.3 if dense else 1.8, marker="o", ms=0 if dense else 3, label=f"{mode}: tokens processed")
        audio = [r for r in rows if r.kind == "audio"]
        if audio:
            ax.scatter([r.seq for r in audio], [max(1, r.prompt_tokens_processed) for r in audio],
                       s=9 if dense else 28, facecolors="none", edgecolors=COLORS[mode], lw=0.9, zorder=3)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("turn in the conversation" + (" (hollow rings: audio turns)" if summary.audio_turns else ""))
    ax.set_ylabel("prompt tokens (log scale)")
    ax.set_title("Prompt tokens the model server processed, per turn")
    ax.legend(frameon=False, loc="center right", fontsize=9)
    _style(ax)
    for mode in MODES:
        rows = by_mode[mode]
        ax_sum.plot([r.seq for r in rows], np.cumsum([r.prompt_tokens_processed for r in rows]), color=COLORS[mode],
                    lw=2.2, label=mode)
        if rows:
            total = sum(r.prompt_tokens_processed for r in rows)
            ax_sum.annotate(_human(total), (rows[-1].seq, total), xytext=(4, 0), textcoords="offset points",
                            va="center", color=COLORS[mode], fontweight="bold")
    ax_sum.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax_sum.set_xlabel("turn in the conversation")
    ax_sum.set_title("Cumulative")
    ratio = summary.ratio_processed
    if ratio:
        ax_sum.text(0.04, 0.95, f"{ratio:,.0f}× fewer tokens processed\nin the steady state\n"
                    f"({summary.ratio_processed_all_turns or 0:,.1f}× over all turns)", transform=ax_sum.transAxes,
                    va="top", fontsize=9.5, color="#333333")
    ax_sum.margins(x=0.12)
    _style(ax_sum)
    fig.suptitle(subtitle, fontsize=9, color="#555555", y=0.995, x=0.01, ha="left")
    fig.tight_layout()
    plots["tokens"] = _save(fig, out / "tokens.png")

    # 2. latency distribution
    panels = [("e2e_ms", "End-to-end turn latency"), ("ttft_ms", "Time to first token")]
    if any(r.first_audio_ms is not None for r in records):
        panels.append(("first_audio_ms", "Time to first audio"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1, 4.6))
    rng = np.random.default_rng(0)
    for ax, (metric, title) in zip(np.atleast_1d(axes), panels, strict=True):
        data = [[getattr(r, metric) for r in by_mode[mode] if r.steady and getattr(r, metric) is not None]
                for mode in MODES]
        positions = list(range(1, len(MODES) + 1))
        present = [(p, d, m) for p, d, m in zip(positions, data, MODES, strict=True) if d]
        if present:
            values = [v for _, d, _ in present for v in d]
            log = min(values) > 0 and max(values) / min(values) > 20
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            boxes = ax.boxplot([d for _, d, _ in present], positions=[p for p, _, _ in present], widths=0.5,
                               whis=(5, 95), showfliers=False, patch_artist=True, medianprops={"lw": 0})
            for box, (_, _, mode) in zip(boxes["boxes"], present, strict=True):
                box.set(facecolor=COLORS[mode], alpha=0.15, edgecolor=COLORS[mode])
            for line in boxes["whiskers"] + boxes["caps"]:
                line.set(color="#999999", lw=1)
            for position, data, mode in present:
                ax.scatter(position + rng.uniform(-0.14, 0.14, len(data)), data, s=10, color=COLORS[mode],
                           alpha=0.55, lw=0, zorder=3)
                median = float(np.median(data))
                ax.hlines(median, position - 0.25, position + 0.25, color=COLORS[mode], lw=2.5, zorder=4)
                ax.annotate(_fmt_ms(median), (position + 0.3, median), va="center", fontsize=9,
                            color=COLORS[mode], fontweight="bold")
            if not log:
                ax.set_ylim(bottom=0)
        ax.set_xticks(positions, MODES)
        ax.set_xlim(0.4, len(MODES) + 0.8)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_ms(v)))
        ax.set_title(title)
        _style(ax)
    fig.suptitle(f"Steady state (each persona's turns {STEADY_FROM_TURN}+); line = median, box = quartiles, "
                 "whiskers = 5th–95th percentile · " + subtitle,
                 fontsize=9, color="#555555", x=0.01, ha="left")
    fig.tight_layout()
    plots["latency"] = _save(fig, out / "latency.png")

    # 3. memory over the run
    fig, ax = plt.subplots(figsize=(10, 4.2))
    timeline = by_mode["turnflow"] + by_mode["naive"]
    steps = list(range(1, len(timeline) + 1))
    if any(r.server_rss_mb is not None for r in timeline):
        server_mb = [np.nan if r.server_rss_mb is None else r.server_rss_mb for r in timeline]
        ax.plot(steps, server_mb, color="#3b5bdb", lw=2, label="model server")
    ax.plot(steps, [r.turnflow_rss_mb for r in timeline], color="#868e96", lw=2, ls="--", label="turnflow process")
    split = len(by_mode["turnflow"])
    if split and split < len(timeline):
        ax.axvline(split + 0.5, color="#bbbbbb", lw=1)
    for start, stop, mode in ((0, split, "turnflow"), (split, len(timeline), "naive")):
        if stop > start:
            ax.text((start + stop + 1) / 2, 1.01, f"{mode} run", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", color=COLORS[mode], fontweight="bold")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("turn of the bench (turnflow run, then naive run, on the same server)")
    ax.set_ylabel("resident memory (MB)")
    ax.legend(frameon=False, loc="lower right")
    _style(ax)
    ax.set_title("Resident memory", pad=18)
    if summary.server.get("embedded"):
        fig.text(0.01, -0.02, "The model server's memory includes llama-server's host prompt cache (--cache-ram, "
                 "8 GiB by default), which keeps the state of recent prompts and grows with every distinct one.",
                 fontsize=8, color="#666666", ha="left", va="top")
    fig.tight_layout()
    plots["memory"] = _save(fig, out / "memory.png")
    return plots


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return str(path)
