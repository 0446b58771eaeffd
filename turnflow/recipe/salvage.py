"""`turnflow validate`: every problem of a set of files at once, including those of the parts of a recipe
that did parse when the rest did not."""

from __future__ import annotations

import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from turnflow.recipe.errors import Problem, RecipeError
from turnflow.recipe.lints import _check_recipe, persona_adapter_problems
from turnflow.recipe.loader import _Document, _parse, _read_yaml, default_backends_path, load_backends, load_persona
from turnflow.recipe.schema import Recipe, SourceSpec


def validate_paths(paths: Iterable[str | Path]) -> list[Problem]:
    """Every problem (and warning) in the given recipe, persona and backends files, or folders of them."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")))
            files.extend(sorted((path / "personas").glob("*.yaml")))
        elif path.exists():
            files.append(path)
        else:
            problems.append(Problem(str(path), 1, "file not found"))
    for path in files:
        problems.extend(sorted(_validate_file(path), key=lambda p: (p.file != str(path), p.file, p.line)))
    return list(dict.fromkeys(problems))  # a persona's problem is found by its file and by each recipe using it


def _validate_file(path: Path) -> list[Problem]:
    try:
        doc = _read_yaml(path)
    except RecipeError as exc:
        return exc.problems
    data = doc.data if isinstance(doc.data, dict) else {}
    kind = next((k for k in ("recipe", "persona", "backends") if k in data), None)
    if kind is None:
        return [
            Problem(
                str(path),
                1,
                "not a turnflow file: a recipe starts with `recipe: <id>`, a persona with `persona: <id>`, "
                "a backends file with `backends:`",
            )
        ]
    try:
        if kind == "persona":
            return persona_adapter_problems(load_persona(path))
        if kind == "backends":
            load_backends(default_backends_path(), path)  # pools may name the embedded defaults
            return []
        recipe = typing.cast(Recipe, _parse(doc, "recipe"))
    except RecipeError as exc:
        return exc.problems + (_salvaged_problems(doc, exc.problems) if kind == "recipe" else [])
    recipe._path = path.resolve()
    return _check_recipe(recipe, doc)


def _salvaged_problems(doc: _Document, schema_problems: list[Problem]) -> list[Problem]:
    """Semantic problems of the parts of a recipe that did parse, so one run reports everything."""
    data = dict(doc.data)
    indexed: list[tuple[int, SourceSpec]] = []
    for i, item in enumerate(data.get("sources") or []):
        try:
            indexed.append((i, SourceSpec.model_validate(item)))
        except ValidationError:
            continue
    fields = set(Recipe.model_fields)
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields or key == "sources":
            continue
        try:
            Recipe.model_validate({"recipe": "x", "sources": [], **kept, key: value})
        except ValidationError:
            continue
        kept[key] = value
    try:
        recipe = Recipe.model_validate({"recipe": "salvaged", **kept, "sources": [s for _, s in indexed]})
    except ValidationError:
        return []
    recipe._path = doc.path.resolve()
    already = {(p.line, p.message) for p in schema_problems}
    found = _check_recipe(recipe, doc, indexed)
    if len(indexed) < len(data.get("sources") or []):  # a dropped source may be the missing user_turn
        found = [p for p in found if not p.message.startswith("no user_turn source")]
    return [p for p in found if (p.line, p.message) not in already]
