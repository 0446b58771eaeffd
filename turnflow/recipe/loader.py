"""Turnflow files read as YAML that keeps line numbers, parsed into the schema, and found beside a recipe."""

from __future__ import annotations

import importlib.resources
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from turnflow.recipe.errors import Problem, RecipeError, _did_you_mean, _pydantic_problems
from turnflow.recipe.schema import _SCHEMAS, BackendsFile, BackendSpec, Persona, Recipe

# --------------------------------------------------------------------------------------------- YAML with lines


@dataclass
class _Document:
    path: Path
    data: Any
    lines: dict[tuple[Any, ...], int]

    def line(self, loc: Iterable[Any]) -> int:
        """The line of the deepest part of `loc` that exists in the file (1-based)."""
        key = tuple(loc)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), 1)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        self.key, self.first, self.again = key, first, again


MAX_FILE_BYTES = 1_000_000
"""The largest turnflow file; long texts (glossaries, documents) belong in a file a source reads."""


def _index_lines(node: yaml.Node | None, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    if node is None:
        return
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.value in seen:
                raise _DuplicateKey(key_node.value, seen[key_node.value], line)
            seen[key_node.value] = line
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            out[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, out)
            # a value's own line, for errors about the value rather than the key
            out.setdefault(child + ("<value>",), value_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), out)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: 10x faster on big prompts


MAX_YAML_VALUES = 200_000
"""The most values a turnflow file may expand to (aliases included): a few lines of `*alias` cannot become
billions of values."""


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (each shared node counted once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts as nothing more
        children: list[Any] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _alias_bomb(label: str, text: str) -> RecipeError:
    last = 1
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent) and event.start_mark is not None:
            last = event.start_mark.line + 1
    return RecipeError([Problem(label, last, f"the file expands to more than {MAX_YAML_VALUES:,} values through "
                                             "YAML aliases (*name); write the values out or use fewer aliases")])


def _read_yaml(path: Path) -> _Document:
    label = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError([Problem(label, 1, "file not found")]) from None
    except OSError as exc:
        raise RecipeError([Problem(label, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError([Problem(label, 1, f"the file is {len(raw) / 1e6:.1f} MB; turnflow files are at most "
                                             f"{MAX_FILE_BYTES / 1e6:.0f} MB: put long texts in a file a source "
                                             "reads (a user source with `params`)")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        hint = "it looks UTF-16 encoded; " if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise RecipeError([Problem(label, line, f"not UTF-8 text: byte {raw[exc.start]:#04x} cannot be decoded; "
                                                f"{hint}save the file as UTF-8")]) from None
    try:
        loader = _LOADER(text)  # parsed once: the nodes give the lines, the same nodes the values
        try:
            node = loader.get_single_node()
            if "*" in text and _expanded_size(node, {}) > MAX_YAML_VALUES:
                raise _alias_bomb(label, text)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        raise RecipeError([Problem(label, line, f"YAML syntax error: {what}; check indentation and quoting")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(label, 1, f"YAML error: {exc}")]) from None
    lines: dict[tuple[Any, ...], int] = {}
    try:
        _index_lines(node, (), lines)
    except _DuplicateKey as dup:
        raise RecipeError([Problem(label, dup.again, f"key {dup.key!r} appears twice (first on line {dup.first}); "
                                                     "YAML keeps only the last one: remove one of them")]) from None
    return _Document(path, data, lines)


def _canonical_digest(data: Any) -> str:
    import hashlib
    import json

    blob = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _parse(doc: _Document, what: str) -> BaseModel:
    model = _SCHEMAS[what]
    if not isinstance(doc.data, dict):
        got = "an empty file" if doc.data is None else f"a {type(doc.data).__name__}"
        raise RecipeError([Problem(str(doc.path), 1, f"a {what} file must be a mapping of keys, got {got}")])
    try:
        parsed = model.model_validate(doc.data)
    except ValidationError as exc:
        raise RecipeError(_pydantic_problems(doc, exc, what)) from None
    return parsed


# --------------------------------------------------------------------------------------------- loading


def load_persona(path: str | Path) -> Persona:
    """Load and check one persona file."""
    doc = _read_yaml(Path(path))
    persona = typing.cast(Persona, _parse(doc, "persona"))
    if persona.persona != doc.path.stem:
        raise RecipeError(
            [
                Problem(
                    str(doc.path),
                    doc.line(("persona", "<value>")),
                    f"persona id {persona.persona!r} differs from the file name {doc.path.name!r}; "
                    f"personas are found by file name, so name the file {persona.persona}.yaml or set "
                    f"persona: {doc.path.stem}",
                )
            ]
        )
    persona._path = doc.path
    persona._digest = _canonical_digest(doc.data)
    persona._document = doc
    return persona


def persona_dir(recipe: Recipe) -> Path:
    """Where a recipe's personas live: `personas/` beside it."""
    return recipe.folder / "personas"


def available_personas(recipe: Recipe) -> list[str]:
    """Ids of the personas beside the recipe."""
    folder = persona_dir(recipe)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_persona(recipe: Recipe, persona_id: str) -> Persona:
    """Load the persona `persona_id` from the recipe's `personas/` folder."""
    path = persona_dir(recipe) / f"{persona_id}.yaml"
    if not path.exists():
        have = available_personas(recipe)
        hint = _did_you_mean(persona_id, have)
        raise RecipeError(
            [
                Problem(
                    str(recipe.path or "<recipe>"),
                    1,
                    f"persona {persona_id!r} not found in {persona_dir(recipe)}{hint} "
                    f"(have: {', '.join(have) or 'none'})",
                )
            ]
        )
    return load_persona(path)


def load_backends(*paths: Path) -> dict[str, BackendSpec]:
    """Backends from the given files, later files overriding earlier ones by name; pools are checked against
    everything the files define."""
    merged: dict[str, BackendSpec] = {}
    origin: dict[str, _Document] = {}
    for path in paths:
        if path.exists():
            doc = _read_yaml(path)
            found = typing.cast(BackendsFile, _parse(doc, "backends")).backends
            merged.update(found)
            origin.update({name: doc for name in found})
    problems = [p for name in merged for p in _pool_problems(name, merged, origin[name])]
    if problems:
        raise RecipeError(problems)
    return merged


def _pool_problems(name: str, backends: dict[str, BackendSpec], doc: _Document) -> list[Problem]:
    """A pool must name at least one member, each a backend that is not itself a pool; members are only for pools."""
    spec = backends[name]
    where = ("backends", name)
    if spec.kind != "pool":
        if spec.members:
            return [Problem(str(doc.path), doc.line(where + ("members",)),
                            f"backend {name!r} has members but is kind {spec.kind}; a backend with members "
                            f"is `kind: pool`")]
        return []
    if not spec.members:
        return [Problem(str(doc.path), doc.line(where + ("kind",)),
                        f"pool {name!r} has no members; add `members: [a, b]` naming embedded or URL backends")]
    problems = []
    for i, member in enumerate(spec.members):
        line = doc.line(where + ("members", i))
        if member not in backends:
            others = [n for n, s in backends.items() if s.kind != "pool"]
            problems.append(Problem(str(doc.path), line,
                                    f"pool {name!r}: unknown member {member!r}{_did_you_mean(member, others)}; "
                                    f"a member is a backend defined in backends.yaml "
                                    f"(have: {', '.join(others) or 'none'})"))
        elif backends[member].kind == "pool":
            problems.append(Problem(str(doc.path), line,
                                    f"pool {name!r}: member {member!r} is itself a pool; pools do not nest, list "
                                    f"{member!r}'s members ({', '.join(backends[member].members)}) instead"))
    if len(set(spec.members)) < len(spec.members):
        problems.append(Problem(str(doc.path), doc.line(where + ("members",)),
                                f"pool {name!r} names a member twice; list each backend once"))
    return problems


def default_backends_path() -> Path:
    """The embedded defaults' backends.yaml (shipped inside the package)."""
    return Path(str(importlib.resources.files("turnflow.recipes") / "backends.yaml"))


def backends_for(recipe: Recipe) -> dict[str, BackendSpec]:
    """The backends a recipe can name: the embedded defaults, then `backends.yaml` beside the recipe."""
    return load_backends(default_backends_path(), recipe.folder / "backends.yaml")


def load_recipe(path: str | Path, *, check: bool = True) -> Recipe:
    """Load a recipe; with `check`, also resolve its sources, personas and backend, raising every problem at once."""
    doc = _read_yaml(Path(path))
    recipe = typing.cast(Recipe, _parse(doc, "recipe"))
    recipe._path = doc.path.resolve()
    recipe._digest = _canonical_digest(doc.data)
    if check:
        from turnflow.recipe.lints import _check_recipe

        problems = [p for p in _check_recipe(recipe, doc, adapters=False) if p.severity == "error"]
        if problems:
            raise RecipeError(problems)
    return recipe
