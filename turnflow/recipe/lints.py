"""Checks beyond the schema: sources resolve, keys exist, personas, adapters and backend are found, and
warnings about tiers and cache keys that would make a prompt go stale."""

from __future__ import annotations

from typing import Any

from turnflow.dependencies import CACHE_KEYS, SOURCE_INPUTS
from turnflow.recipe.errors import Problem, RecipeError, _did_you_mean
from turnflow.recipe.loader import _Document, available_personas, backends_for, load_persona, persona_dir
from turnflow.recipe.schema import Persona, Recipe, SourceSpec
from turnflow.recipe.usercode import resolve_source_fn, source_parameters


def _check_recipe(
    recipe: Recipe, doc: _Document, indexed: list[tuple[int, SourceSpec]] | None = None, *, adapters: bool = True
) -> list[Problem]:
    """Problems beyond the schema: sources resolve, keys exist, personas and backend are found.

    `indexed` pairs each source with its position in the file (when some sources were dropped as invalid).
    With `adapters`, the personas' adapters are looked up in the registry too (`turnflow validate` does;
    loading a recipe for turns does not: a turn of a persona whose adapter is missing fails on its own).
    """
    file = str(doc.path)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, spec in indexed if indexed is not None else enumerate(recipe.sources):
        at = ("sources", i)
        if spec.name in seen:
            problems.append(
                Problem(
                    file,
                    doc.line(at + ("name", "<value>")),
                    f"duplicate source name {spec.name!r} (first declared as item {seen[spec.name]}); "
                    f"each source needs its own name",
                )
            )
            continue
        seen[spec.name] = i
        from turnflow.driver import is_reserved

        if is_reserved(spec.name):
            problems.append(
                Problem(
                    file,
                    doc.line(at + ("name", "<value>")),
                    f"source name {spec.name!r} is taken by a node of the turn DAG; pick another name",
                )
            )
            continue
        for j, key in enumerate(spec.cache_key):
            if key not in CACHE_KEYS:
                problems.append(
                    Problem(
                        file,
                        doc.line(at + ("cache_key", j)),
                        f"unknown cache key {key!r}{_did_you_mean(key, CACHE_KEYS)}; "
                        f"cache keys are {', '.join(CACHE_KEYS)}",
                    )
                )
        if spec.tier == "volatile" and spec.cache_key:
            problems.append(
                Problem(
                    file,
                    doc.line(at + ("cache_key",)),
                    f"source {spec.name!r} is volatile (new every turn) and cannot be cached; remove its cache_key",
                    "warning",
                )
            )
        line = doc.line(at + ("fn", "<value>")) if spec.fn else doc.line(at + ("name", "<value>"))
        try:
            fn = resolve_source_fn(recipe, spec)
            params = source_parameters(fn, spec)
        except (LookupError, TypeError) as exc:
            problems.append(Problem(file, line, str(exc)))
            continue
        problems.extend(_lint_source(file, line, spec, params))
    if "user_turn" not in seen:
        problems.append(
            Problem(
                file,
                doc.line(("sources",)),
                "no user_turn source: add {name: user_turn, tier: volatile} so the speaker's words reach the model",
            )
        )
    if recipe.personas is not None:
        have = available_personas(recipe)
        for i, persona_id in enumerate(recipe.personas):
            if persona_id not in have:
                problems.append(
                    Problem(
                        file,
                        doc.line(("personas", i)),
                        f"persona {persona_id!r} not found in {persona_dir(recipe)}"
                        f"{_did_you_mean(persona_id, have)} (have: {', '.join(have) or 'none'})",
                    )
                )
                continue
            try:
                persona = load_persona(persona_dir(recipe) / f"{persona_id}.yaml")
            except RecipeError as exc:
                problems.extend(exc.problems)
            else:
                if adapters:
                    problems.extend(_adapter_base_problems(recipe, persona))
    try:
        backends = backends_for(recipe)
    except RecipeError as exc:
        problems.extend(exc.problems)
    else:
        if recipe.backend not in backends:
            problems.append(
                Problem(
                    file,
                    doc.line(("backend", "<value>")),
                    f"unknown backend {recipe.backend!r}{_did_you_mean(recipe.backend, backends)}; "
                    f"name one of {', '.join(backends)} or add it to backends.yaml beside the recipe",
                )
            )
    return problems


def persona_adapter_problems(persona: Persona, base: Any = None, backend: str | None = None) -> list[Problem]:
    """Adapters a persona names that the registry lacks, of the wrong kind, or made for another base model.

    `base` is the backend's model (a `BaseModelRef`), when known; `backend` its name, for the message.
    """
    from turnflow.adapters import AdapterError, AdapterRegistry

    registry = AdapterRegistry()
    file = str(persona.path or persona.persona)
    voice, skills = persona.adapter_refs
    wanted: list[tuple[tuple[Any, ...], str, str]] = []
    if voice is not None:
        wanted.append((("voice", "adapter", "<value>"), voice[0], "voice"))
    wanted += [(("skills", i, "adapter", "<value>"), s[0], "skill") for i, s in enumerate(skills)]
    problems = []
    for loc, adapter_id, role in wanted:
        try:
            manifest = registry.get(adapter_id, base)
        except AdapterError as exc:
            message = str(exc)
            if base is not None and backend:
                message = message.replace("the backend's model", f"backend {backend!r}'s model")
            problems.append(Problem(file, persona.line_of(*loc), message))
            continue
        if role == "voice" and manifest.kind != "voice":
            problems.append(Problem(file, persona.line_of(*loc),
                                    f"adapter {adapter_id!r} is a {manifest.kind} adapter; voice needs kind voice"))
        if role == "skill" and manifest.format != "lora":
            problems.append(Problem(file, persona.line_of(*loc),
                                    f"adapter {adapter_id!r} is a TTS voice profile; a skill is a LoRA adapter"))
    return problems


def _adapter_base_problems(recipe: Recipe, persona: Persona) -> list[Problem]:
    """A persona's adapter problems against the recipe's backend model (embedded backends: the GGUF is known)."""
    if not persona.adapter_refs[0] and not persona.adapter_refs[1]:
        return []
    base = None
    try:
        spec = backends_for(recipe).get(recipe.backend)
    except RecipeError:
        spec = None
    if spec is not None and spec.kind == "embedded":
        from turnflow.adapters import AdapterError, resolve_base

        try:
            base = resolve_base(spec.model or "generated:tiny")[0]
        except AdapterError:
            base = None
    return persona_adapter_problems(persona, base, recipe.backend)


def _lint_source(file: str, line: int, spec: SourceSpec, params: list[str]) -> list[Problem]:
    """Warnings about tiers and cache keys that would make a prompt go stale or break the prefix."""
    problems = []
    per_turn = [p for p in params if p in SOURCE_INPUTS and SOURCE_INPUTS[p].per_turn]
    if spec.tier != "volatile" and per_turn:
        problems.append(
            Problem(
                file,
                line,
                f"source {spec.name!r} is {spec.tier} but depends on {', '.join(per_turn)}, which change every "
                f"turn; declare it volatile",
                "warning",
            )
        )
    if spec.cached:
        uncovered = sorted(
            {
                p
                for p in params
                if p in SOURCE_INPUTS
                and not SOURCE_INPUTS[p].per_turn
                and not set(SOURCE_INPUTS[p].covered_by) <= set(spec.cache_key)
            }
        )
        if uncovered:
            problems.append(
                Problem(
                    file,
                    line,
                    f"source {spec.name!r} depends on {', '.join(uncovered)} but its cache_key "
                    f"{list(spec.cache_key)} does not cover it; its cached result may be stale or shared wrongly",
                    "warning",
                )
            )
    return problems
