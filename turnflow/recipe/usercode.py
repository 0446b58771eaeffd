"""Source functions: the user's `module:function` imported from beside the recipe (or a built-in), its
parameters checked, and the files its output follows digested."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from turnflow.dependencies import SOURCE_INPUTS
from turnflow.paths import file_stamp
from turnflow.recipe.errors import _did_you_mean
from turnflow.recipe.schema import Recipe, SourceSpec


def _import_from(folder: Path, module_name: str) -> ModuleType:
    """Import `module_name`, looking in the recipe's folder first (a module there that changed is imported anew)."""
    local = folder / (module_name.replace(".", "/") + ".py")
    if local.exists():
        version = file_digest(local)[:12]
        unique = f"turnflow_user_{abs(hash(str(local)))}_{module_name.replace('.', '_')}_{version}"
        if unique in sys.modules:
            return sys.modules[unique]
        spec = importlib.util.spec_from_file_location(unique, local)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
        return module
    return importlib.import_module(module_name)


_FILE_DIGESTS: dict[str, tuple[int, int, str]] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read again only when its size or modification time changed."""
    import hashlib

    stat = path.stat()
    known = _FILE_DIGESTS.get(str(path))
    if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _FILE_DIGESTS[str(path)] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


def source_params(recipe: Recipe, spec: SourceSpec) -> dict[str, Any]:
    """A source's `params`, with relative paths of files beside the recipe made absolute."""
    params = dict(spec.params)
    for name, value in params.items():
        if isinstance(value, str) and value and not Path(value).is_absolute() and "\n" not in value:
            candidate = recipe.folder / value
            if candidate.is_file():
                params[name] = str(candidate)
    return params


_IDENTITIES: dict[int, tuple[Recipe, tuple[str, str]]] = {}


def recipe_identity(recipe: Recipe) -> tuple[str, str]:
    """A loaded recipe's digest and folder, worked out once per recipe object (a turn asks for them several times,
    and a pydantic model's private attributes and a path's parent are not free)."""
    found = _IDENTITIES.get(id(recipe))
    if found is not None and found[0] is recipe:
        return found[1]
    identity = (recipe.digest, str(recipe.folder))
    if len(_IDENTITIES) >= 256:
        _IDENTITIES.clear()
    _IDENTITIES[id(recipe)] = (recipe, identity)
    return identity


_SOURCE_FILES: dict[tuple[str, str, str], list[Path]] = {}


def source_files(recipe: Recipe, spec: SourceSpec) -> list[Path]:
    """The files a source's output follows: its own module (for `fn` sources) and the files its params name
    (found once per recipe content and folder; `code_digest` checks them each time)."""
    key = (*recipe_identity(recipe), spec.name)
    known = _SOURCE_FILES.get(key)
    if known is None:
        known = _SOURCE_FILES[key] = _find_source_files(recipe, spec)
    return known


def _find_source_files(recipe: Recipe, spec: SourceSpec) -> list[Path]:
    files = []
    if spec.fn:
        module_name = spec.fn.partition(":")[0]
        local = recipe.folder / (module_name.replace(".", "/") + ".py")
        if local.exists():
            files.append(local)
        elif module_name and module_name.partition(".")[0] != "turnflow":  # turnflow's own code is not the user's
            try:  # the module's own file (its parent packages are imported to find it, as running it would)
                found = importlib.util.find_spec(module_name)
            except (ImportError, ValueError):
                found = None
            origin = getattr(found, "origin", None) if found else None
            if origin and origin.endswith(".py") and "site-packages" not in origin:
                files.append(Path(origin))
    files += [Path(v) for v in source_params(recipe, spec).values() if isinstance(v, str) and Path(v).is_file()]
    return files


def code_digest(recipe: Recipe, spec: SourceSpec | None = None) -> str:
    """Digest of the files the recipe's sources (or one source) follow: edits to them are never served stale."""
    import hashlib

    found = (*recipe_identity(recipe), spec.name if spec is not None else None)
    files = _CODE_FILES.get(found)
    if files is None:
        specs = [spec] if spec is not None else list(recipe.sources)
        files = _CODE_FILES[found] = [(s.name, p) for s in specs for p in source_files(recipe, s)]
    if not files:
        return ""
    stamps = tuple((name, str(p), *file_stamp(p)) for name, p in files)  # a turn checks files, not their bytes
    known = _CODE_DIGESTS.get(stamps)
    if known is None:
        parts = [f"{name}:{p}:{file_digest(p)}" for name, p in files]
        known = _CODE_DIGESTS[stamps] = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return known


_CODE_DIGESTS: dict[tuple[Any, ...], str] = {}
_CODE_FILES: dict[tuple[str, str, str | None], list[tuple[str, Path]]] = {}


def resolve_source_fn(recipe: Recipe, spec: SourceSpec) -> Callable[..., Any]:
    """The function that renders `spec`: the user's `fn`, else the built-in of that name."""
    if spec.fn:
        module_name, _, attr = spec.fn.partition(":")
        try:
            module = _import_from(recipe.folder, module_name)
        except Exception as exc:  # any import-time failure of user code is reported, not raised
            raise LookupError(
                f"cannot import {spec.fn!r}: {type(exc).__name__}: {exc} "
                f"(looked for {module_name}.py in {recipe.folder}, then on the Python path)"
            ) from None
        fn = getattr(module, attr, None)
        if fn is None:
            have = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
            raise LookupError(f"{module_name!r} has no function {attr!r}{_did_you_mean(attr, have)}")
        return typing.cast(Callable[..., Any], fn)
    from turnflow.nodes.sources import BUILTIN_SOURCES

    if spec.name not in BUILTIN_SOURCES:
        raise LookupError(
            f"unknown built-in source {spec.name!r}{_did_you_mean(spec.name, BUILTIN_SOURCES)}; "
            f"built-ins are {', '.join(sorted(BUILTIN_SOURCES))}, or give fn: module:function for your own"
        )
    return BUILTIN_SOURCES[spec.name]


def source_parameters(fn: Callable[..., Any], spec: SourceSpec) -> list[str]:
    """The DAG values `fn` depends on (its parameters not bound by the recipe's `params`), checked for shape."""
    if not callable(fn):
        raise TypeError(f"{spec.fn or spec.name} is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the parameters of {spec.fn or spec.name}: {exc}") from None
    names = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"{spec.fn or spec.name} takes *{param.name}; a source names each DAG value it needs "
                f"as a parameter ({', '.join(SOURCE_INPUTS)})"
            )
        if param.name in spec.params:
            continue
        if param.name not in SOURCE_INPUTS:
            if param.default is not inspect.Parameter.empty:
                continue
            raise TypeError(
                f"parameter {param.name!r} of {spec.fn or spec.name} is not a DAG value"
                f"{_did_you_mean(param.name, SOURCE_INPUTS)}; a source may take {', '.join(SOURCE_INPUTS)}, "
                f"or set it under params:"
            )
        names.append(param.name)
    unknown_params = [p for p in spec.params if p not in signature.parameters]
    if unknown_params:
        raise TypeError(f"params {unknown_params} are not parameters of {spec.fn or spec.name}")
    returns = signature.return_annotation
    if isinstance(returns, str):
        try:
            returns = typing.get_type_hints(fn).get("return", returns)
        except Exception:
            returns = inspect.Signature.empty
    if returns is not inspect.Signature.empty and not _returns_text_or_messages(returns):
        raise TypeError(
            f"{spec.fn or spec.name} is annotated to return {returns!r}; a source returns text (str) "
            f"or a list of chat messages (list[dict])"
        )
    return names


def _returns_text_or_messages(annotation: Any) -> bool:
    if annotation in (str, list, Any):
        return True
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return all(_returns_text_or_messages(a) for a in typing.get_args(annotation))
    return False
