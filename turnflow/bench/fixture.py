"""What `turnflow bench` runs: its options, the personas and recipe folder it writes, and the scripted conversation.

The bench writes its recipe folder into the output folder: the example personas (for more than four,
variants with their own id, name and text), the example recipe's rules, and an invariant
``reference_notes`` source that pads each persona's prompt to ``--prompt-tokens`` (above the size of
the examples) or, below it, the examples are cut at line boundaries. Sizes are calibrated with the
server's own tokenizer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from turnflow.nodes import sources
from turnflow.recipe import BackendSpec, Persona, find_persona, load_recipe

Mode = Literal["turnflow", "naive", "append_only", "no_pinning", "no_composition_cache", "no_ordering"]
MODES: tuple[Mode, ...] = ("turnflow", "naive", "append_only", "no_pinning", "no_composition_cache", "no_ordering")
BASELINES: tuple[Mode, ...] = MODES[1:]
"""What turnflow is measured against: the naive pipeline, append-only chat (LiveKit Agents, Pipecat) and three
ablations of turnflow, each without one of its parts."""
ASSEMBLY: dict[Mode, str] = {
    "turnflow": "stable_first", "naive": "naive", "append_only": "append_only", "no_pinning": "stable_first",
    "no_composition_cache": "stable_first", "no_ordering": "unordered",
}
SESSION_OPTIONS: dict[Mode, dict[str, Any]] = {
    "no_pinning": {"pin_slots": False},
    "no_composition_cache": {"composition_cache": False},
}
"""The Session switches each mode turns off (naive and append_only turn off pinning and the cache themselves)."""

LATE_JOINERS = ("Kai", "Mara")
"""People who join the first room mid-conversation, then speak."""

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
    slots: int | None = None
    """Slots of the embedded server (default: one per persona); fewer than personas makes turnflow page KV."""
    cache_ram_mb: int | None = None
    """llama-server's host prompt cache (`--cache-ram`) in MiB; 0 turns it off (default: the backend's)."""
    paging: bool = True
    """turnflow's KV paging (`kv_paging` of the backend); off, only the host cache can bring a prefix back."""
    baselines: tuple[str, ...] = BASELINES
    """The modes run after turnflow, on the same server configuration."""
    max_tokens: int | None = None
    """Reply length cap (the recipe's `generation.max_tokens`); a small one makes a loaded machine's run shorter."""
    joins: bool = True
    """People join the first room mid-conversation (one a third of the way in, one two thirds)."""
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
        unknown = [b for b in options.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"bench --baselines: unknown {', '.join(unknown)}; known: {', '.join(BASELINES)}")
        if options.slots is not None and options.slots < 1:
            raise ValueError(f"bench --slots must be at least 1, got {options.slots}")
        if options.personas > 4 + len(VARIANT_NAMES):
            raise ValueError(f"bench --personas is at most {4 + len(VARIANT_NAMES)}, got {options.personas}")
        return options


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
        slots=options.slots or options.personas,
        ctx_per_slot=ctx_per_slot,
        cache_ram_mb=options.cache_ram_mb,
        kv_paging=options.paging,
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
        "fn": "turnflow.bench.fixture:reference_notes",
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
        "generation": {**example.get("generation", {}),
                       **({"max_tokens": options.max_tokens} if options.max_tokens else {})},
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


def count_tokens(url: str, text: str) -> int | None:
    """Tokens of `text` in the server's tokenizer (llama-server's `/tokenize`), or None when it has none."""
    from turnflow.nodes.llm import server_root
    from turnflow.nodes.openai_http import tls_for

    try:
        response = httpx.post(server_root(url) + "/tokenize", json={"content": text}, timeout=60.0, verify=tls_for(url))
        tokens = response.json().get("tokens") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return len(tokens) if tokens else None


def bytes_per_token(url: str, sample: str) -> float:
    """UTF-8 bytes per token of `sample` in the server's tokenizer (`/tokenize`, else a 1-token completion)."""
    from turnflow.nodes.llm import api_base
    from turnflow.nodes.openai_http import tls_for

    counted = count_tokens(url, sample)
    if counted:
        return len(sample.encode()) / counted
    response = httpx.post(
        api_base(url) + "/chat/completions",
        json={"messages": [{"role": "user", "content": sample}], "max_tokens": 1}, timeout=600.0, verify=tls_for(url),
    )
    response.raise_for_status()
    return len(sample.encode()) / int(response.json()["usage"]["prompt_tokens"])


def _calibration_sample() -> str:
    """The first example persona's invariant text: what the bench's prompts are mostly made of."""
    recipe = load_recipe(example_recipe_path())
    persona = find_persona(recipe, (recipe.personas or ("maya",))[0])
    parts = (sources.persona_identity(persona), sources.recipe_rules(recipe), sources.tool_definitions(persona))
    return "\n\n".join(parts)



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
    joins: tuple[str, ...] = ()
    """People who join the room just before this turn (and the first of them speaks it)."""


def conversation_script(
    personas: Sequence[tuple[str, str]], turns: int, *, audio: bool, rooms: str, joins: bool = False
) -> list[ScriptedTurn]:
    """The conversation: rounds in which each person addresses the next persona by name; audio every second turn.

    With `joins`, the late joiners enter the first room a third and two thirds of the way in, each speaking
    the turn they join before.
    """
    room_per_persona = rooms == "per-persona"
    join_rounds = {max(1, turns // 3): LATE_JOINERS[0], max(2, 2 * turns // 3): LATE_JOINERS[1]} if joins else {}
    script: list[ScriptedTurn] = []
    for round_no in range(turns):
        for index, (persona_id, name) in enumerate(personas):
            seq = len(script) + 1
            speaker = PEOPLE[index % len(PEOPLE)] if room_per_persona else PEOPLE[(seq - 1) % len(PEOPLE)]
            joiner = join_rounds.get(round_no) if index == 0 and round_no < turns else None
            if joiner:
                speaker = joiner
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
                    joins=(joiner,) if joiner else (),
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
        turn.seq: tts.synthesize(
            turn.text, TtsVoice(voice=voices[(PEOPLE + LATE_JOINERS).index(turn.speaker) % len(voices)])
        )
        for turn in script
        if turn.kind == "audio"
    }


