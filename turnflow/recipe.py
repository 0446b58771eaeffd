"""The recipe, persona and backend schema: YAML in, typed models out, every problem as `FILE:LINE: message`.

A recipe declares one kind of turn (its sources with tier and cache keys, its backend, its speech
bridges); a persona declares one identity. Loading keeps line numbers so that every problem points at
the line to fix, and validation collects all problems of a file instead of stopping at the first.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import importlib.util
import inspect
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from turnflow.dependencies import CACHE_KEYS, SOURCE_INPUTS

TIERS: tuple[str, ...] = ("invariant", "semi_stable", "volatile")
Tier = Literal["invariant", "semi_stable", "volatile"]

# --------------------------------------------------------------------------------------------- models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _FromFile(_Strict):
    """A model loaded from a YAML file: it remembers the file and a digest of its content."""

    _path: Path | None = PrivateAttr(default=None)
    _digest: str = PrivateAttr(default="")
    _document: Any = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        """The file it was loaded from."""
        return self._path

    @property
    def digest(self) -> str:
        """SHA-256 of the file's canonical content: changes whenever the content does."""
        return self._digest


class SourceSpec(_Strict):
    """One section of the prompt: which function renders it, its tier, and the keys its result is cached under."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tier: Tier
    cache_key: tuple[str, ...] = ()
    fn: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def cached(self) -> bool:
        """Whether the source's result is memoised in the composition cache."""
        return bool(self.cache_key)


class SpeechSpec(_Strict):
    """Speech bridges, used only where the model lacks the modality."""

    stt: str | dict[str, Any] = "pocketsphinx"
    tts: str | dict[str, Any] = "espeak-ng"
    describe: str | dict[str, Any] | None = None


class CacheSpec(_Strict):
    """Composition cache settings."""

    ttl_s: float = Field(default=300.0, gt=0)


class BudgetSpec(_Strict):
    """Prompt budget: history is compacted in large blocks when the prompt would exceed it."""

    max_prompt_tokens: int = Field(default=32000, gt=0)


class GenerationSpec(_Strict):
    """Sampling settings for the reply."""

    max_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.7, ge=0)
    seed: int | None = None


class MediaSpec(_Strict):
    """Limits and clean-up for incoming audio."""

    max_audio_s: float = Field(default=60.0, gt=0)
    trim_silence: bool = True


class RoutingSpec(_Strict):
    """Which persona answers in a shared room: the one named in the utterance, else the last one addressed."""

    rule: Literal["named_else_last"] = "named_else_last"
    default: str | None = None
    end_of_turn_silence_ms: int = Field(default=700, ge=100)


class Recipe(_FromFile):
    """One kind of turn."""

    recipe: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    version: int | str = 1
    description: str = ""
    backend: str = "local"
    personas: tuple[str, ...] | None = None
    rules: str = ""
    sources: tuple[SourceSpec, ...]
    speech: SpeechSpec = SpeechSpec()
    cache: CacheSpec = CacheSpec()
    budget: BudgetSpec = BudgetSpec()
    generation: GenerationSpec = GenerationSpec()
    media: MediaSpec = MediaSpec()
    routing: RoutingSpec = RoutingSpec()

    @property
    def folder(self) -> Path:
        """The recipe's folder: personas and the user's own source modules are found beside it."""
        return self._path.parent if self._path else Path.cwd()


class Tool(_Strict):
    """An OpenAI function tool definition."""

    type: Literal["function"] = "function"
    function: ToolFunction


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


Tool.model_rebuild()


class TtsProfile(_Strict):
    """How the TTS bridge speaks this persona."""

    engine: str = "espeak-ng"
    voice: str = "en-us"
    pitch: int | None = None
    rate_wpm: int | None = None
    speed: float | None = None
    model: str | None = None
    url: str | None = None


class VoiceSpec(_Strict):
    """The persona's voice: an adapter from the registry (a LoRA for its base model, or a TTS voice profile)
    and the TTS profile the bridge speaks with (a voice-profile adapter overrides it)."""

    adapter: str | None = None
    scale: float = Field(default=1.0, ge=0, le=2)
    tts: TtsProfile = TtsProfile()


class SkillSpec(_Strict):
    """A skill adapter (a LoRA from the registry) and the scale it is applied at, 0 to 2."""

    adapter: str
    scale: float = Field(default=1.0, ge=0, le=2)


class Persona(_FromFile):
    """One identity."""

    persona: str = Field(pattern=r"^[A-Za-z0-9][\w-]*$")
    name: str
    version: int | str
    description: str = ""
    system_prompt: str
    tools: tuple[Tool, ...] = ()
    voice: VoiceSpec = VoiceSpec()
    skills: tuple[SkillSpec, ...] = ()

    @property
    def adapter_refs(self) -> tuple[tuple[str, float] | None, tuple[tuple[str, float], ...]]:
        """(voice adapter id and scale or None, skill adapter ids and scales), as the registry resolves them."""
        voice = (self.voice.adapter, self.voice.scale) if self.voice.adapter else None
        return voice, tuple((s.adapter, s.scale) for s in self.skills)

    def line_of(self, *loc: str | int) -> int:
        """The line in the persona's file of a key (e.g. `line_of("skills", 0, "adapter")`)."""
        return self._document.line(loc) if self._document else 1


class AffinitySpec(_Strict):
    """How each request names its persona@room for a router in front of several model servers."""

    user: bool = True
    """Send the affinity key as the OpenAI `user` field (vLLM production-stack, llm-d and SGLang read it)."""
    header: str | None = Field(default="x-session-id", pattern=r"^[A-Za-z0-9-]+$")
    """Send it in this HTTP header too (the vLLM production-stack session router's `--session-key`); null: none."""


class BackendSpec(_Strict):
    """A model server a recipe can name: started by turnflow (`embedded`), reached by URL (`openai`), or a
    `pool` of those, over which personas are placed by rendezvous hashing."""

    kind: Literal["embedded", "openai", "pool"] = "openai"
    members: tuple[str, ...] = ()
    """A pool's backends (names in backends.yaml, each embedded or reached by URL)."""
    recheck_s: float = Field(default=5.0, ge=0)
    """A pool member that failed is skipped this long before a turn tries it again."""
    affinity: AffinitySpec = Field(default_factory=AffinitySpec)
    url: str | None = None
    model: str | None = None
    mmproj: str | None = None
    api_key_env: str | None = None
    slots: int = Field(default=4, gt=0, le=1024)
    ctx_per_slot: int = Field(default=32768, gt=0, le=16_777_216)
    """The most context one slot may need; the KV pool is sized to what the slots use, up to slots x this."""
    kv_unified: bool = True
    """One KV pool shared by the slots (`--kv-unified`), sized from need, instead of slots x ctx_per_slot."""
    kv_budget_tokens: int | None = Field(default=None, gt=0, le=1 << 40)
    """A fixed KV pool size in tokens; when the slots need more, idle personas' KV is paged out to disk."""
    kv_budget_mb: float | None = Field(default=None, gt=0)
    """The same as a memory budget in MB (converted with the model's KV bytes per token)."""
    kv_cache_type: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"] = "f16"
    """The KV cache's data type (`-ctk`/`-ctv`): q8_0 halves the memory of f16."""
    cache_ram_mb: int | None = Field(default=None, ge=0)
    """llama-server's host prompt cache (`--cache-ram`) in MiB; default twice the KV pool, at most 8192; 0 off."""
    kv_paging: bool | None = None
    """Save a slot's KV to disk before another persona takes it and restore it when its persona returns
    (default: on for embedded servers, off for servers reached by URL)."""
    kv_disk_budget_mb: float = Field(default=4096.0, gt=0)
    """Disk space for saved KV files; least recently used ones go first."""
    lora: tuple[str, ...] = ()
    """LoRA files loaded at start-up whatever the personas need (each request lists them, at scale 0 unless used)."""
    max_resident_adapters: int = Field(default=8, ge=1, le=4096)
    """How many LoRA adapters an embedded server holds at once; others are paged in (least recently used out)."""
    extra_args: tuple[str, ...] = ()
    capabilities: dict[str, bool] = Field(default_factory=dict)
    request_defaults: dict[str, Any] = Field(default_factory=dict)


class BackendsFile(_Strict):
    backends: dict[str, BackendSpec]


# --------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file, with the line to fix."""

    file: str
    line: int
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.file}:{self.line}: {prefix}{self.message}"


class RecipeError(ValueError):
    """A recipe, persona or backends file that cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        node = yaml.compose(text, Loader=_LOADER)
        if "*" in text and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise _alias_bomb(label, text)
        data = yaml.load(text, Loader=_LOADER)
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


def _pydantic_problems(doc: _Document, exc: ValidationError, what: str) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind = err["type"]
        value = err.get("input")
        field = loc[-1] if loc else what
        if kind == "extra_forbidden":
            model_fields = _fields_at(what, loc[:-1])
            msg = f"unknown key {field!r}{_did_you_mean(str(field), model_fields)}"
            if model_fields:
                msg += f" (allowed: {', '.join(model_fields)})"
        elif kind == "missing":
            msg = f"missing required key {field!r} in {_where(what, loc[:-1])}"
        elif kind == "literal_error" and field == "tier":
            msg = f"unknown tier {value!r}{_did_you_mean(str(value), TIERS)}; a tier is one of {', '.join(TIERS)}"
        elif kind == "literal_error":
            msg = f"{field}: {value!r} is not allowed; {err['msg'].lower()}"
        elif kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
            msg = f"{field}: {value!r} is out of range ({err['msg'].lower()})"
        elif kind == "string_pattern_mismatch" and field == "fn":
            msg = f"fn {value!r} must be 'module:function' (a module beside the recipe or importable)"
        elif kind == "string_pattern_mismatch":
            msg = f"{field}: {value!r} is not a valid name (letters, digits, '_' or '-', not starting with a symbol)"
        elif kind in ("model_type", "dict_type"):
            msg = f"{_where(what, loc)} must be a mapping of keys, got {type(value).__name__}"
        elif kind in ("tuple_type", "list_type"):
            msg = f"{field} must be a list, got {type(value).__name__} {value!r}"
        else:
            msg = f"{field}: {err['msg']} (got {value!r})"
        line = doc.line(loc + ("<value>",)) if kind not in ("extra_forbidden", "missing") else doc.line(loc)
        problems.append(Problem(str(doc.path), line, msg))
    return problems


_SCHEMAS: dict[str, type[BaseModel]] = {"recipe": Recipe, "persona": Persona, "backends": BackendsFile}


def _model_at(what: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = _SCHEMAS[what]
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            if model is BackendsFile or what == "backends":
                model = BackendSpec
                continue
            return None
        model = _inner_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _fields_at(what: str, loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(what, loc)
    return list(model.model_fields) if model else []


def _where(what: str, loc: tuple[Any, ...]) -> str:
    if not loc:
        return f"the {what}"
    return " ".join(f"item {p}" if isinstance(p, int) else repr(p) for p in loc)


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
        problems = [p for p in _check_recipe(recipe, doc, adapters=False) if p.severity == "error"]
        if problems:
            raise RecipeError(problems)
    return recipe


# --------------------------------------------------------------------------------------------- source functions


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


def source_files(recipe: Recipe, spec: SourceSpec) -> list[Path]:
    """The files a source's output follows: its own module (for `fn` sources) and the files its params name."""
    files = []
    if spec.fn:
        module_name = spec.fn.partition(":")[0]
        local = recipe.folder / (module_name.replace(".", "/") + ".py")
        if local.exists():
            files.append(local)
        else:
            found = importlib.util.find_spec(module_name.split(".")[0]) if module_name else None
            origin = getattr(found, "origin", None) if found else None
            if origin and origin.endswith(".py") and "site-packages" not in origin:
                files.append(Path(origin))
    files += [Path(v) for v in source_params(recipe, spec).values() if isinstance(v, str) and Path(v).is_file()]
    return files


def code_digest(recipe: Recipe, spec: SourceSpec | None = None) -> str:
    """Digest of the files the recipe's sources (or one source) follow: edits to them are never served stale."""
    import hashlib

    specs = [spec] if spec is not None else list(recipe.sources)
    parts = [f"{s.name}:{p}:{file_digest(p)}" for s in specs for p in source_files(recipe, s)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else ""


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


# --------------------------------------------------------------------------------------------- checks


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
        from turnflow.driver import reserved_node_names

        if spec.name in reserved_node_names():
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
