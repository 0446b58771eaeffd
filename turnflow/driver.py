"""Building the turn DAG: one Hamilton node per recipe source around the fixed nodes, one driver per profile.

Each source becomes a fresh function whose parameters are the DAG values its implementation names
(Hamilton style) plus what caching needs; it is tagged with its tier and cache keys, memoised in the
composition cache under those keys, and checked against its tier's promise whenever it renders anew.
Drivers are built once per (recipe content, capability profile) and cached in-process.
"""

from __future__ import annotations

import ast
import contextvars
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from hamilton import ad_hoc_utils, driver
from hamilton.function_modifiers import group, inject, source, tag
from hamilton.lifecycle import api as lifecycle
from hamilton.node import DependencyType

from turnflow.cache import CacheKey, CompositionCache, Violation
from turnflow.dataflows import turn as turn_dataflow
from turnflow.dataflows import voice as voice_dataflow
from turnflow.dependencies import scopes_of
from turnflow.nodes.prompt import SourceOutput, canonical_text
from turnflow.nodes.text import CanonicalMessages, sha256_text
from turnflow.recipe import (
    Recipe,
    SourceSpec,
    code_digest,
    recipe_identity,
    resolve_source_fn,
    source_parameters,
    source_params,
)

# A failed turn is reported once, as a TurnError; Hamilton's own error banner is for its logs, not stderr.
logging.getLogger("hamilton").addHandler(logging.NullHandler())

#: Node timings of the turn running in this context (the driver is shared, the turn is not).
_node_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("node_timings", default=None)


class NodeTimer(lifecycle.NodeExecutionHook):
    """Times every node of the running turn, in milliseconds."""

    def __init__(self) -> None:
        self._started: contextvars.ContextVar[dict[str, float]] = contextvars.ContextVar("node_started")

    def run_before_node_execution(self, *, node_name: str, **_: Any) -> None:
        started = self._started.get(None)
        if started is None:
            started = {}
            self._started.set(started)
        started[node_name] = time.perf_counter()

    def run_after_node_execution(self, *, node_name: str, **_: Any) -> None:
        timings = _node_timings.get()
        started = self._started.get({})
        if timings is not None and node_name in started:
            timings[node_name] = (time.perf_counter() - started.pop(node_name)) * 1000


def collect_node_timings() -> tuple[dict[str, float], contextvars.Token[dict[str, float] | None]]:
    """Start collecting node timings for one turn; returns the dict that fills and the token to reset."""
    timings: dict[str, float] = {}
    return timings, _node_timings.set(timings)


def stop_collecting(token: contextvars.Token[dict[str, float] | None]) -> None:
    """Stop collecting node timings."""
    _node_timings.reset(token)


def _validate_output(name: str, value: Any) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if isinstance(value, CanonicalMessages):  # made message by message from the store's history
        return value
    if isinstance(value, list | tuple) and all(isinstance(m, dict) and "role" in m for m in value):
        return [dict(m) for m in value]
    raise TypeError(
        f"source {name!r} returned {type(value).__name__}; a source returns text (str) "
        f"or a list of chat messages (dicts with 'role' and 'content')"
    )


def make_source_node(recipe: Recipe, spec: SourceSpec, profile: dict[str, str]) -> Callable[..., SourceOutput]:
    """A fresh Hamilton node function for one recipe source, for one capability profile."""
    impl = resolve_source_fn(recipe, spec)
    impl_params = source_parameters(impl, spec)
    needs = [*spec.cache_key, "persona_id", "room_id", "composition_cache"]
    if spec.tier == "semi_stable":
        needs.append("compaction_epoch")
    params = impl_params + [p for p in dict.fromkeys(needs) if p not in impl_params]
    ttl_s = recipe.cache.ttl_s
    # what a source renders may follow the profile, and its code and data files (an edit is never served stale)
    namespace = "|".join([recipe.digest, ",".join(f"{k}={v}" for k, v in sorted(profile.items())),
                          code_digest(recipe, spec)])
    user_defined = spec.fn is not None
    bound = source_params(recipe, spec)
    shared = not _per_message(spec)  # entries under a key that changes with every message stay in this process

    fields = tuple(spec.cache_key)
    volatile = spec.tier == "volatile"
    key_spec = (recipe.recipe, namespace, spec.name, fields)
    last_hit: list[Any] = [None, None, None]  # the last hit's key, value and output: served again as they are

    def render(**kwargs: Any) -> SourceOutput:
        cache: CompositionCache | None = kwargs["composition_cache"]
        if cache is None:  # caching off (the naive baseline)
            value = _validate_output(spec.name, impl(**{p: kwargs[p] for p in impl_params}, **bound))
            return SourceOutput(spec.name, spec.tier, value, "off", user_defined)
        key = None
        if spec.cached:
            values = tuple([kwargs[f] for f in fields])
            key = cache.key_of(key_spec, values, kwargs["persona_id"], kwargs["room_id"], local=not shared)
            hit, value = cache.get(key, shared=shared)
            if hit:
                known_key, known_value, output = last_hit
                if known_key == key and known_value is value:
                    return output  # type: ignore[no-any-return]
                output = SourceOutput(spec.name, spec.tier, value, "hit", user_defined)
                last_hit[:] = [key, value, output]
                return output
        value = _validate_output(spec.name, impl(**{p: kwargs[p] for p in impl_params}, **bound))
        if key is not None:
            cache.set(key, value, ttl_s, shared=shared)
        if volatile:  # no promise to check: its canonical text is made only if asked for
            return SourceOutput(spec.name, spec.tier, value, "miss" if key else "off", user_defined)
        text = canonical_text(value)
        violations = _check_tier(cache, spec, key, kwargs, text, namespace, shared)
        return SourceOutput(
            spec.name, spec.tier, value, "miss" if key else "off", user_defined, tuple(v.as_dict() for v in violations),
            known_canonical=text,
        )

    render.__name__ = render.__qualname__ = spec.name
    render.__module__ = __name__
    summary = (inspect.getdoc(impl) or "").split("\n")[0]
    render.__doc__ = summary or f"Section {spec.name!r} of the prompt."
    render.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, annotation=Any) for p in params],
        return_annotation=SourceOutput,
    )
    render.__annotations__ = {**{p: Any for p in params}, "return": SourceOutput}
    tags = {
        "tier": spec.tier,
        "cache_key": ",".join(spec.cache_key) or "none",
        "source": "user" if user_defined else "builtin",
        "source_fn": spec.fn or f"turnflow.nodes.sources:{spec.name}",
    }
    return tag(**tags)(render)


def _check_tier(
    cache: CompositionCache, spec: SourceSpec, key: CacheKey | None, values: dict[str, Any], text: str,
    namespace: str, shared: bool,
) -> list[Violation]:
    """Record a fresh rendering (its canonical `text`) in the ledger and report a broken tier promise. `shared`: the
    record is seen by other processes (else it stays in this one, and is compared as text, never hashed)."""
    if spec.tier == "volatile":
        return []
    scope = str(key) if key else f"{namespace}|{values['persona_id']}|{values['room_id']}"
    digest = sha256_text(text) if shared else None
    found: list[Violation | None] = []
    if spec.tier == "invariant":
        found.append(cache.check_invariant(spec.name, scope, text, digest=digest, shared=shared))
    else:
        # a key that changes with every message is never rendered under again: the stream's record is what counts
        found.append(cache.check_invariant(spec.name, scope, text, digest=digest) if key and shared else None)
        stream_scope = f"{namespace}|{values['persona_id']}|{values['room_id']}|{values['compaction_epoch']}"
        found.append(cache.check_semi_stable(spec.name, stream_scope, text, digest=digest, shared=shared))
    return [v for v in found if v is not None]


def _per_message(spec: SourceSpec) -> bool:
    """Whether the source's cache key changes with every message of the room (its entries stay in-process)."""
    return any("messages" in scopes_of(key) for key in spec.cache_key)


def _sections_node(names: list[str]) -> Callable[..., dict[str, SourceOutput]]:
    @inject(parts=group(**{name: source(name) for name in names}))
    def sections(parts: dict[str, SourceOutput]) -> dict[str, SourceOutput]:
        """Every source's output this turn, by source name."""
        return dict(parts)

    return sections


ASSEMBLIES = ("stable_first", "naive", "unordered", "append_only")
"""How a turn's prompt is put together: turnflow's stable-first order, or one of the benchmark's baselines."""

_ROUTES = {"route_audio_in": ("native", "stt"), "route_audio_out": ("native", "tts"),
           "route_images_in": ("native", "describe"), "assembly": ASSEMBLIES, "slot_pinning": ("on", "off")}
"""The profile's keys and values: every combination is a route the turn DAG may be built for."""

_GENERATED_INPUTS = ("composition_cache", "agent_history")
"""Inputs only the generated source nodes take."""


@functools.cache
def reserved_node_names() -> frozenset[str]:
    """The names the turn DAG's own nodes and inputs take (every route), which a recipe's source may not take.

    Exact: the DAG is built for every route (64 of them, ~0.4 s); `is_reserved` asks this only for a name the
    dataflows' code declares at all."""
    names: set[str] = set(_GENERATED_INPUTS)
    for values in itertools.product(*_ROUTES.values()):
        config = dict(zip(_ROUTES, values, strict=True))
        built = driver.Builder().with_modules(turn_dataflow, voice_dataflow).with_config(config)
        names.update(v.name for v in built.build().list_available_variables())
    return frozenset(names)


@functools.cache
def declared_names() -> frozenset[str]:
    """Every name the dataflows' code could give a node or an input, read from their source without building the
    DAG: the public functions' names (and the node name before a `__` variant suffix), their parameters, and the
    strings and keywords in their decorators, with the profile's keys and the generated nodes' inputs. A superset
    of `reserved_node_names()` (a test checks it)."""
    names: set[str] = {*_ROUTES, *_GENERATED_INPUTS}
    for module in (turn_dataflow, voice_dataflow):
        for node in ast.parse(inspect.getsource(module)).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            names.update((node.name, node.name.split("__")[0]))
            names.update(a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs))
            for decorator in node.decorator_list:
                for part in ast.walk(decorator):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        names.add(part.value)
                    elif isinstance(part, ast.keyword) and part.arg:
                        names.add(part.arg)
    return frozenset(names)


def is_reserved(name: str) -> bool:
    """Whether a recipe's source may not take `name` (a node or input of the turn DAG on some route)."""
    return name in declared_names() and name in reserved_node_names()


class TurnDriver:
    """A built turn DAG and the plan that runs it each turn.

    Hamilton builds the graph (config, decorators, the recipe's source nodes), validates it and draws it. A turn
    runs the same nodes in the same order every time, so the order for a set of requested outputs is worked out
    once; each node is then called with its dependencies' values and timed. Hamilton's own `execute` walks the
    graph again on every call, which for this DAG costs about as much as everything else turnflow does in a
    turn (see `benchmarks/turn_overhead.py`); `execute(..., via_hamilton=True)` runs a turn through it instead,
    and the tests check that both give the same outputs.
    """

    def __init__(self, hamilton: driver.Driver):
        self.hamilton = hamilton
        """The Hamilton driver (for drawing, listing and validating the graph)."""
        self._nodes = {n.name: n for n in hamilton.graph.get_nodes()}
        self._config = dict(hamilton.graph.config)
        """The profile the graph was built for: nodes may take its values as inputs, as with Hamilton."""
        self._plans: dict[tuple[str, ...], Callable[[dict[str, Any], dict[str, float]], dict[str, Any]]] = {}

    def list_available_variables(self) -> list[Any]:
        """The graph's nodes and inputs (Hamilton's `HamiltonNode`s)."""
        return self.hamilton.list_available_variables()

    def execute(self, final_vars: list[str], inputs: dict[str, Any], *, via_hamilton: bool = False) -> dict[str, Any]:
        """The requested outputs of one turn run on `inputs`; node times go where `collect_node_timings` says."""
        if via_hamilton:
            return self.hamilton.execute(final_vars, inputs=inputs)  # type: ignore[no-any-return]
        run = self._plans.get(tuple(final_vars))
        if run is None:
            run = self._plans[tuple(final_vars)] = _compile(self._plan(final_vars), final_vars, self._config)
        timings = _node_timings.get()
        return run(inputs, {} if timings is None else timings)

    def _plan(self, final_vars: list[str]) -> list[_Step]:
        """The nodes the outputs need, each after its dependencies (a depth-first walk, as Hamilton's)."""
        unknown = [name for name in final_vars if name not in self._nodes]
        if unknown:
            raise ValueError(f"unknown nodes {unknown} requested")
        order: list[_Step] = []
        required: set[str] = set()
        placed: set[str] = set()

        def visit(name: str) -> None:
            if name in placed:
                return
            placed.add(name)
            node = self._nodes[name]
            for dependency in node.dependencies:
                if node.input_types[dependency.name][1] == DependencyType.REQUIRED:
                    required.add(dependency.name)
                visit(dependency.name)
            dependencies = tuple(d.name for d in node.dependencies)
            order.append(_Step(name, None if node.user_defined else node.callable, dependencies))

        for name in final_vars:
            visit(name)
        return [step._replace(required=step.name in required) for step in order]


class _Step(NamedTuple):
    """One node of a turn's plan."""

    name: str
    fn: Callable[..., Any] | None
    """The node's function; None for an input."""
    dependencies: tuple[str, ...]
    required: bool = False
    """For an input: a node needs it (an optional one may be missing)."""


_MISSING = object()
"""An optional input the turn was not given (the node's default applies)."""


def _compile(
    plan: list[_Step], final_vars: list[str], config: dict[str, Any]
) -> Callable[[dict[str, Any], dict[str, float]], dict[str, Any]]:
    """The plan as one function of (inputs, timings): each input looked up once, each node called with its
    dependencies as keyword arguments held in local variables, timed from the end of the node before it.

    A plain loop over the steps builds a dict of arguments per node and looks each value up by name; in one
    straight-line function a turn runs far less of the interpreter, which matters because a turn starts with
    cold caches (it follows a wait for the model or a person).
    """
    local = {step.name: f"v{i}" for i, step in enumerate(plan)}
    names: dict[str, Any] = {"MISSING": _MISSING, "config": config, "ValueError": ValueError}
    body = ["def run(inputs, timings):", "    get = inputs.get"]
    maybe_missing: set[str] = set()
    for i, step in enumerate(plan):
        if step.fn is not None:
            continue
        var = local[step.name]
        if step.name in config:
            names[f"c{i}"] = config[step.name]
            body.append(f"    {var} = get({step.name!r}, c{i})")
        elif step.required:
            body += [f"    {var} = get({step.name!r}, MISSING)", f"    if {var} is MISSING:",
                     f"        raise ValueError('the turn DAG needs the input ' + {repr(repr(step.name))} "
                     "+ ', which was not given')"]
        else:
            body.append(f"    {var} = get({step.name!r}, MISSING)")
            maybe_missing.add(step.name)
    body.append("    t0 = pc()")
    for i, step in enumerate(plan):
        if step.fn is None:
            continue
        names[f"f{i}"] = step.fn
        fixed = ", ".join(f"{d}={local[d]}" for d in step.dependencies if d not in maybe_missing)
        optional = [d for d in step.dependencies if d in maybe_missing]
        if optional:  # an optional input left out: the node's default applies
            body.append("    kw = {}")
            for d in optional:
                body.append(f"    if {local[d]} is not MISSING: kw[{d!r}] = {local[d]}")
            fixed = f"{fixed}, **kw" if fixed else "**kw"
        body += [f"    {local[step.name]} = f{i}({fixed})",
                 "    t1 = pc()", f"    timings[{step.name!r}] = (t1 - t0) * 1000", "    t0 = t1"]
    body.append("    return {" + ", ".join(f"{n!r}: {local[n]}" for n in final_vars) + "}")
    names["pc"] = time.perf_counter
    lines = ["def make(" + ", ".join(names) + "):", *("    " + line for line in body), "    return run"]
    factory = "\n".join(lines) + "\n"
    scope: dict[str, Any] = {}
    exec(compile(factory, f"<turn plan: {', '.join(final_vars)}>", "exec"), scope)  # noqa: S102
    return scope["make"](**names)  # type: ignore[no-any-return]


_DRIVERS: dict[tuple[str, str, tuple[tuple[str, str], ...], str], TurnDriver] = {}


def build_driver(recipe: Recipe, profile: dict[str, str]) -> TurnDriver:
    """The turn DAG for `recipe` and a capability profile (cached)."""
    cache_key = (*recipe_identity(recipe), tuple(sorted(profile.items())), code_digest(recipe))
    built = _DRIVERS.get(cache_key)
    if built is not None:
        return built
    nodes = [make_source_node(recipe, spec, profile) for spec in recipe.sources]
    module = ad_hoc_utils.create_temporary_module(
        *nodes, _sections_node([s.name for s in recipe.sources]), module_name=_module_name(recipe, profile)
    )
    built = (
        driver.Builder()
        .with_modules(turn_dataflow, voice_dataflow, module)
        .with_config(dict(profile))
        .with_adapters(NodeTimer())
        .build()
    )
    turn_driver = _DRIVERS[cache_key] = TurnDriver(built)
    return turn_driver


def _module_name(recipe: Recipe, profile: dict[str, str]) -> str:
    import re
    import uuid

    return "recipe_" + re.sub(r"\W", "_", recipe.recipe) + "_" + uuid.uuid4().hex[:8]
