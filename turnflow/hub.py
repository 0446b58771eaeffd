"""Voice and skill adapters on the Hugging Face Hub: publish, search, preview and pull, license and attribution kept.

A published adapter is one Hub model repo holding, from one commit:

    README.md              the model card (`huggingface_hub.ModelCard`): license, base_model, base_model_relation,
                           library_name, tags, and a `turnflow:` block (kind, format, sha256, authors, derived_from)
    turnflow-adapter.json  the manifest: kind, format, file, sha256, base model, license, authors, derived_from,
                           and what preview.wav says
    <adapter file>         the LoRA GGUF or the TTS voice profile (YAML/JSON)
    preview.wav            a sentence in that voice: a voice profile spoken by the TTS bridge; a LoRA's reply,
                           written by the base model under the adapter, spoken in the persona's TTS voice

Pulled files go into the Hugging Face cache layout under the registry's `hub/` folder, pinned to the commit
sha the revision resolved to; the registry id is `hf://OWNER/NAME@SHA`. The Hub is reached at `HF_ENDPOINT`
(read on every call), never when `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from turnflow.adapters import (
    ACCEPTED,
    LORA_SUFFIXES,
    PREVIEW_SUFFIXES,
    PROFILE_SUFFIXES,
    AdapterError,
    AdapterFacts,
    AdapterManifest,
    AdapterRegistry,
    FrozenModel,
    check_spdx,
    file_sha256,
    load_profile,
)

HUB_MANIFEST = "turnflow-adapter.json"
CARD = "README.md"
PREVIEW = "preview.wav"
LIBRARY_NAME = "turnflow"
PREVIEW_SENTENCE = "Hello, this is my voice. It is good to meet you."
"""What a voice profile adapter's preview.wav says."""
PREVIEW_PROMPT = "Introduce yourself in one short sentence."
"""What a LoRA adapter is asked, under the adapter, for its preview; the reply is what preview.wav says."""
REPO_METADATA = (CARD, ".gitattributes")
"""Files a repo may hold besides the accepted file types: the card (parsed as YAML + text) and git attributes."""
ALLOWED_SUFFIXES = LORA_SUFFIXES + PROFILE_SUFFIXES + PREVIEW_SUFFIXES
_REF = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")

# The Hub's own license ids (lower case); anything else goes into the card as `other` with `license_name`.
_HUB_LICENSES = {
    "Apache-2.0": "apache-2.0", "MIT": "mit", "BSD-2-Clause": "bsd-2-clause", "BSD-3-Clause": "bsd-3-clause",
    "CC0-1.0": "cc0-1.0", "CC-BY-4.0": "cc-by-4.0", "CC-BY-SA-4.0": "cc-by-sa-4.0", "CC-BY-NC-4.0": "cc-by-nc-4.0",
    "CC-BY-NC-SA-4.0": "cc-by-nc-sa-4.0", "GPL-3.0-only": "gpl-3.0", "LGPL-3.0-only": "lgpl-3.0",
    "AGPL-3.0-only": "agpl-3.0", "MPL-2.0": "mpl-2.0", "OpenRAIL-M": "openrail", "Unlicense": "unlicense",
    "Gemma": "gemma", "Llama-3.1": "llama3.1", "Llama-3.2": "llama3.2", "Other": "other",
}


class HubError(AdapterError):
    """A publish, search, preview or pull that cannot be done; the message says why and what would be right."""


class HubUnreachable(HubError):
    """The Hub cannot be reached (offline mode, or no network)."""


class PreviewSpec(FrozenModel):
    """What preview.wav says and who speaks it."""

    text: str
    spoken_by: str
    """The TTS engine and voice, e.g. `espeak-ng en-us+f3 pitch 70`."""
    prompt: str | None = None
    """For a LoRA: what the base model was asked, under the adapter, to write `text`."""


class HubManifest(AdapterFacts):
    """`turnflow-adapter.json`: what a published adapter is, whose work it is and under what license."""

    schema_version: int = 1
    preview: PreviewSpec | None = None


# --------------------------------------------------------------------------------------------- reaching the Hub


def hub_endpoint() -> str:
    """The Hub's URL: `$HF_ENDPOINT`, else huggingface.co (read on every call, so tests and users can point it)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` forbids reaching the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _api(token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token)


def _unreachable_types() -> tuple[type[BaseException], ...]:
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    transports: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):  # huggingface_hub 2 speaks through its own fork, httpx2
        try:
            transports.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return (OfflineModeIsEnabled, *transports, ConnectionError, TimeoutError)


def _unreachable(what: str, exc: BaseException | None = None) -> HubUnreachable:
    why = "HF_HUB_OFFLINE is set" if hub_offline() else f"{type(exc).__name__}: {exc}" if exc else "no network"
    return HubUnreachable(f"the Hugging Face Hub is unreachable at {hub_endpoint()} ({why}); {what}")


def _check_online(what: str) -> None:
    if hub_offline():
        raise _unreachable(what)


def _hub_error(repo: str, exc: BaseException) -> HubError:
    """A Hub HTTP error as one sentence for people."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return HubError(f"{repo}: the repo is gated; accept its terms on the Hub and log in (HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo}: no such revision on the Hub ({exc})")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{repo}: no such repo on the Hub, or it is private and no token was given (HF_TOKEN)")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"{repo}: the Hub refused: {exc}")
    return HubError(f"{repo}: {type(exc).__name__}: {exc}")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`OWNER/NAME[@REV]` or `hf://OWNER/NAME[@REV]` as (repo id, revision or None)."""
    match = _REF.match(ref.strip())
    if not match:
        raise HubError(f"{ref!r} is not a Hub repo: write OWNER/NAME, OWNER/NAME@REVISION or hf://OWNER/NAME@SHA")
    return match["repo"], match["rev"]


# --------------------------------------------------------------------------------------------- the card


def hub_license(license: str | None) -> dict[str, str]:
    """Card fields for an SPDX license: the Hub's id, or `other` with `license_name`."""
    if not license:
        return {}
    known = _HUB_LICENSES.get(license)
    if known:
        return {"license": known}
    return {"license": "other", "license_name": license}


def license_from_card(data: dict[str, Any]) -> str | None:
    """The SPDX id of a card's license (`other` + `license_name` gives the name)."""
    value = data.get("license")
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        return None
    if value == "other" and isinstance(data.get("license_name"), str):
        value = data["license_name"]
    by_hub = {hub: spdx for spdx, hub in _HUB_LICENSES.items()}
    value = by_hub.get(value.lower(), value)
    try:
        return check_spdx(value)
    except AdapterError:
        return value


def card_tags(manifest: HubManifest) -> list[str]:
    """The card's tags: turnflow, turnflow-voice or turnflow-skill, and lora / gguf / tts-profile as they apply."""
    tags = ["turnflow", f"turnflow-{manifest.kind}"]
    if manifest.format == "lora":
        tags += ["lora", "gguf"]
    else:
        tags += ["tts-profile"]
    return tags


def model_card(manifest: HubManifest) -> Any:
    """The repo's model card (`huggingface_hub.ModelCard`), made with `ModelCardData`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = manifest.base_model
    license_fields: dict[str, Any] = hub_license(manifest.license)
    data = ModelCardData(
        **license_fields,
        base_model=base.hub_id if base and base.hub_id else None,
        library_name=LIBRARY_NAME,
        tags=card_tags(manifest),
        base_model_relation="adapter" if base and base.hub_id else None,
        turnflow={
            "id": manifest.id, "kind": manifest.kind, "format": manifest.format, "file": manifest.file,
            "sha256": manifest.sha256, "authors": list(manifest.authors), "derived_from": list(manifest.derived_from),
            **({"base_architecture": base.architecture, "base_digest": base.digest} if base else {}),
        },
    )
    what = "a LoRA adapter (GGUF) for llama.cpp" if manifest.format == "lora" else "a TTS voice profile"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {manifest.id}", "",
        f"A turnflow **{manifest.kind}** adapter: {what}.", "",
        f"- **Authors:** {', '.join(manifest.authors) or 'not given'}",
        f"- **License:** {manifest.license or 'not given'}",
        f"- **Derived from:** {', '.join(manifest.derived_from) or 'nothing declared'}",
    ]
    if base:
        lines.append(f"- **Base model:** {base.hub_id or base.name or base.architecture} "
                     f"({base.architecture}, GGUF sha256 `{base.digest}`)")
    else:
        lines.append("- **Base model:** any (the TTS bridge speaks with it)")
    lines += [f"- **File:** `{manifest.file}` (sha256 `{manifest.sha256}`, {manifest.size_bytes} bytes)", ""]
    if manifest.preview:
        lines += [
            "## Preview", "",
            f"`{PREVIEW}` says: \u201c{manifest.preview.text}\u201d, spoken by {manifest.preview.spoken_by}"
            + (f"; the text is the base model's reply under the adapter to \u201c{manifest.preview.prompt}\u201d."
               if manifest.preview.prompt else "."), "",
        ]
    lines += [
        "## Use", "",
        "```bash",
        "turnflow adapters preview OWNER/NAME          # license, attribution and preview.wav, no weights",
        "turnflow adapters pull OWNER/NAME             # prints the id to name in a persona: hf://OWNER/NAME@SHA",
        "```", "",
    ]
    return ModelCard("\n".join(lines))


# --------------------------------------------------------------------------------------------- publish


@dataclass
class Bundle:
    """The files of one published adapter, written to a folder: exactly what is uploaded."""

    folder: Path
    manifest: HubManifest
    files: list[str] = field(default_factory=list)


def make_bundle(
    adapter_id: str, out: Path, *, registry: AdapterRegistry | None = None, base: str | None = None,
    persona: str | None = None,
) -> Bundle:
    """Write the repo's files for `adapter_id` into `out`: adapter file, manifest, preview.wav, model card."""
    registry = registry or AdapterRegistry()
    local = _variant(registry, adapter_id, base)
    source = registry.verified_path(local)
    out.mkdir(parents=True, exist_ok=True)
    # the file goes up under the adapter's name (a registry file may be named by its hash)
    name = re.sub(r"[^\w.-]+", "-", local.id.removeprefix("hf://").split("@")[0].split("/")[-1]) + source.suffix.lower()
    shutil.copyfile(source, out / name)
    preview = write_preview(local, source, out / PREVIEW, base=base, persona=persona)
    manifest = HubManifest(
        id=local.id, kind=local.kind, format=local.format,
        file=name, sha256=local.sha256, size_bytes=local.size_bytes, base_model=local.base_model,
        license=local.license, authors=local.authors, derived_from=local.derived_from,
        source=local.source, preview=preview,
    )
    (out / HUB_MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    model_card(manifest).save(out / CARD)
    return Bundle(out, manifest, sorted([name, HUB_MANIFEST, PREVIEW, CARD]))


def _variant(registry: AdapterRegistry, adapter_id: str, base: str | None) -> AdapterManifest:
    variants = registry.variants(adapter_id)
    if base is None:
        if len(variants) > 1:
            have = ", ".join(m.base_model.short for m in variants if m.base_model)
            raise HubError(f"adapter {adapter_id!r} has {len(variants)} variants ({have}); say which with --base")
        return variants[0]
    from turnflow.adapters import resolve_base

    return registry.get(adapter_id, resolve_base(base)[0])


def publish(
    adapter_id: str, repo: str, *, private: bool = False, token: str | None = None, dry_run: bool = False,
    out: Path | None = None, registry: AdapterRegistry | None = None, base: str | None = None,
    persona: str | None = None,
) -> tuple[Bundle, str | None]:
    """Publish an adapter as `repo` in one commit (or, with `dry_run`, write that commit's files to `out`).

    Returns the bundle and the commit sha (None for a dry run)."""
    repo_id, revision = parse_ref(repo)
    if revision:
        raise HubError(f"--repo {repo!r}: name the repo without a revision (OWNER/NAME); publishing makes a commit")
    if dry_run:
        if out is None:
            raise HubError("--dry-run writes what would be uploaded to a folder: give it with --out DIR")
        if out.exists() and any(out.iterdir()):
            raise HubError(f"--out {out}: the folder is not empty; give an empty or new folder")
        return make_bundle(adapter_id, out, registry=registry, base=base, persona=persona), None
    _check_online("publishing needs it; --dry-run --out DIR writes the files without it")
    from huggingface_hub import CommitOperationAdd

    api = _api(token)
    with tempfile.TemporaryDirectory(prefix="turnflow-publish-") as folder:
        bundle = make_bundle(adapter_id, out or Path(folder) / "bundle", registry=registry, base=base,
                             persona=persona)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.create_commit(
                repo_id,
                operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(bundle.folder / name))
                            for name in bundle.files],
                commit_message=f"turnflow: publish {bundle.manifest.kind} adapter {bundle.manifest.id}",
                repo_type="model",
            )
        except _unreachable_types() as exc:
            raise _unreachable("publishing needs it", exc) from None
        except Exception as exc:
            raise _hub_error(repo_id, exc) from None
    return bundle, str(info.oid)


# --------------------------------------------------------------------------------------------- the preview


def write_preview(
    local: AdapterManifest, source: Path, out: Path, *, base: str | None = None, persona: str | None = None,
) -> PreviewSpec:
    """Write preview.wav for an adapter: a voice profile speaks a fixed sentence; a LoRA's reply is spoken."""
    import soundfile as sf

    from turnflow.nodes.speech import TtsVoice, make_tts

    if local.format == "tts-profile":
        profile = load_profile(source)
        text, prompt = PREVIEW_SENTENCE, None
    else:
        profile = _persona_tts(local.id, persona)
        text, prompt = _lora_reply(local, source, base), PREVIEW_PROMPT
    engine: str | dict[str, Any] = profile.get("engine", "espeak-ng")
    if profile.get("url"):  # an OpenAI-compatible /v1/audio/speech server
        engine = {"url": profile["url"], **({"model": profile["model"]} if profile.get("model") else {})}
    voice = TtsVoice(voice=profile.get("voice", "en-us"), pitch=profile.get("pitch"),
                     rate_wpm=profile.get("rate_wpm"), model=profile.get("model"), speed=profile.get("speed"))
    audio = make_tts(engine).synthesize(text, voice)
    sf.write(str(out), audio.samples, audio.sample_rate, subtype="PCM_16")
    spoken_by = " ".join(str(x) for x in (
        profile.get("url") or profile.get("engine", "espeak-ng"), voice.voice,
        f"pitch {voice.pitch}" if voice.pitch is not None else "",
        f"{voice.rate_wpm} wpm" if voice.rate_wpm is not None else "",
    ) if x)
    return PreviewSpec(text=text, spoken_by=spoken_by, prompt=prompt)


def _persona_tts(adapter_id: str, persona: str | None) -> dict[str, Any]:
    """The TTS profile a LoRA's preview is spoken in: `--persona`'s, else an example persona wearing the adapter."""
    from turnflow.recipe import Persona, RecipeError, load_persona

    candidates: list[Path] = []
    if persona:
        path = Path(os.path.expanduser(persona))
        candidates = [path] if path.suffix in (".yaml", ".yml") else [
            Path("personas") / f"{persona}.yaml", _examples() / f"{persona}.yaml"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise HubError(f"--persona {persona!r}: no persona file at {', '.join(map(str, candidates))}")
        try:
            return load_persona(found).voice.tts.model_dump(exclude_none=True)
        except RecipeError as exc:
            raise HubError(f"--persona {found}: {exc}") from None
    for path in sorted(_examples().glob("*.yaml")):
        try:
            example: Persona = load_persona(path)
        except RecipeError:
            continue
        if example.voice.adapter == adapter_id:
            return example.voice.tts.model_dump(exclude_none=True)
    from turnflow.recipe import TtsProfile

    return TtsProfile().model_dump(exclude_none=True)


def _examples() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("turnflow.recipes") / "personas"))


def _lora_reply(local: AdapterManifest, lora: Path, base: str | None) -> str:
    """The base model's reply, under the adapter at scale 1, to PREVIEW_PROMPT (an embedded llama-server), cut at
    the turn markers of the chat template the server applies (a base model such as Gemma 3 270M runs on past them)."""
    from turnflow.backend import template_stops
    from turnflow.nodes.llm import ChatClient
    from turnflow.recipe import BackendSpec
    from turnflow.server import EmbeddedServer

    model, defaults = _base_for_preview(local, base)
    spec = BackendSpec(kind="embedded", model=str(model), slots=1, ctx_per_slot=2048, lora=(str(lora),),
                       max_resident_adapters=1, request_defaults=defaults)
    server = EmbeddedServer("adapter-preview", spec)
    try:
        client = ChatClient(server.up())
        try:
            template = str((client.get_json("/props", root=True) or {}).get("chat_template") or "")
            reply = client.stream([{"role": "user", "content": PREVIEW_PROMPT}], max_tokens=40, temperature=0,
                                  seed=0, lora=[{"id": 0, "scale": 1.0}], extra=defaults,
                                  stop=template_stops(template) or None).drain()
        finally:
            client.close()
    finally:
        server.down()
    text = " ".join(reply.text.split())
    return text if text.strip(" .?!") else PREVIEW_SENTENCE


def _base_for_preview(local: AdapterManifest, base: str | None) -> tuple[Path, dict[str, Any]]:
    """The base model GGUF a LoRA was made for (and its backend's request defaults), found by its sha256."""
    from turnflow.adapters import resolve_base
    from turnflow.recipe import default_backends_path, load_backends

    wanted = local.base_model
    assert wanted is not None
    if base is not None:
        ref, path = resolve_base(base)
        if ref.digest != wanted.digest:
            raise HubError(f"--base {base}: its sha256 is {ref.digest[:12]}, but {local.id!r} is made for "
                           f"{wanted.short}")
        return path, {}
    from turnflow.server import ServerError, resolve_model

    for spec in load_backends(default_backends_path(), Path("backends.yaml")).values():
        if spec.kind != "embedded":
            continue
        try:
            path = resolve_model(spec.model or "generated:tiny")
        except ServerError:
            continue
        if file_sha256(path) == wanted.digest:
            return path, dict(spec.request_defaults)
    raise HubError(
        f"adapter {local.id!r}: its preview is the base model's reply under the adapter, and the base model "
        f"{wanted.short} is not one of the embedded backends' models; give its GGUF file with --base"
    )


# --------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Found:
    """One adapter on the Hub, as `adapters search` lists it."""

    repo: str
    kind: str
    base_model: str
    license: str
    authors: tuple[str, ...]
    downloads: int

    def public(self) -> dict[str, Any]:
        """As JSON data."""
        return {"repo": self.repo, "kind": self.kind, "base_model": self.base_model, "license": self.license,
                "authors": list(self.authors), "downloads": self.downloads}


def search(query: str | None = None, *, kind: str | None = None, base: str | None = None,
           limit: int = 50) -> list[Found]:
    """turnflow adapters on the Hub: `HfApi.list_models` with the card tags as `filter`."""
    _check_online("search needs it (pulled adapters: turnflow adapters list)")
    if kind not in (None, "voice", "skill"):
        raise HubError(f"--kind {kind!r}: an adapter's kind is 'voice' or 'skill'")
    tags = ["turnflow"] + ([f"turnflow-{kind}"] if kind else [])
    if base and "/" in base:
        tags.append(f"base_model:adapter:{base}")
    try:
        models = list(_api().list_models(filter=tags, search=query or None, cardData=True, limit=limit))
    except _unreachable_types() as exc:
        raise _unreachable("search needs it (pulled adapters: turnflow adapters list)", exc) from None
    except Exception as exc:
        raise _hub_error("search", exc) from None
    found = []
    for model in models:
        data = _card_dict(getattr(model, "card_data", None))
        raw = data.get("turnflow")
        block: dict[str, Any] = raw if isinstance(raw, dict) else {}
        model_tags = set(model.tags or ())
        model_kind = "voice" if "turnflow-voice" in model_tags else "skill" if "turnflow-skill" in model_tags else "?"
        base_model = data.get("base_model") or ""
        if isinstance(base_model, list):
            base_model = ", ".join(map(str, base_model))
        if not base_model:
            digest = str(block.get("base_digest") or "")
            base_model = f"{block.get('base_architecture')}@{digest[:12]}" if digest else "any"
        if base and base not in (base_model, str(block.get("base_digest", ""))) and not (
                str(block.get("base_digest", "")).startswith(base)):
            continue
        license = license_from_card(data) or next(
            (t.split(":", 1)[1] for t in model_tags if t.startswith("license:")), "none")
        authors = tuple(str(a) for a in block.get("authors") or ()) or ((model.author,) if model.author else ())
        found.append(Found(model.id, model_kind, str(base_model), license, authors, int(model.downloads or 0)))
    return found


def _card_dict(card_data: Any) -> dict[str, Any]:
    if card_data is None:
        return {}
    if isinstance(card_data, dict):
        return card_data
    return dict(card_data.to_dict())


# --------------------------------------------------------------------------------------------- preview and pull


@dataclass
class Fetched:
    """A repo's card and manifest at one commit, read from the Hub or the cache."""

    repo: str
    revision: str
    """The commit sha the revision resolved to."""
    card: dict[str, Any]
    manifest: HubManifest
    license: str | None
    files: list[str]


def _download(repo: str, filename: str, revision: str, cache: Path, *, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache), endpoint=hub_endpoint(),
                                local_files_only=local_only))


def _resolve(repo: str, revision: str | None, cache: Path, *, allow_cache: bool) -> tuple[str, list[str], bool]:
    """(commit sha, the repo's files, whether it came from the cache) for `repo` at `revision`."""
    if not hub_offline():
        try:
            info = _api().model_info(repo, revision=revision)
        except _unreachable_types() as exc:
            if not allow_cache:
                raise _unreachable("previewing needs it", exc) from None
            reason: BaseException | None = exc
        except Exception as exc:
            raise _hub_error(f"{repo}@{revision or 'main'}", exc) from None
        else:
            resolved = str(info.sha)
            if not (revision and _SHA.match(revision)):  # as the HF cache records a branch: refs/<name> -> sha
                ref = _cache_folder(cache, repo) / "refs" / (revision or "main")
                ref.parent.mkdir(parents=True, exist_ok=True)
                ref.write_text(resolved)
            return resolved, sorted(s.rfilename for s in info.siblings or ()), False
    else:
        if not allow_cache:
            raise _unreachable("previewing needs it")
        reason = None
    folder = _cache_folder(cache, repo)
    sha: str | None = revision if revision and _SHA.match(revision) else None
    if sha is None:
        try:
            sha = (folder / "refs" / (revision or "main")).read_text().strip()
        except OSError:
            sha = next((p.name for p in (folder / "snapshots").glob(f"{revision}*")), None) if revision else None
    snapshot = folder / "snapshots" / (sha or "-")
    if not sha or not snapshot.is_dir():
        raise _unreachable(f"and {repo}@{revision or 'main'} is not in the cache ({cache}); pull it when online",
                           reason)
    files = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    return sha, files, True


def refuse_repo_files(repo: str, files: Iterable[str]) -> None:
    """Refuse a repo holding any file type but GGUF, JSON/YAML and WAV (its card and .gitattributes aside)."""
    bad = [f for f in files if f not in REPO_METADATA and Path(f).suffix.lower() not in ALLOWED_SUFFIXES]
    if bad:
        raise HubError(
            f"{repo}: refused, it holds {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: only GGUF, JSON/YAML "
            f"and WAV files are accepted (nothing that could be unpickled). Accepted: {ACCEPTED}"
        )


def fetch(repo_ref: str, *, cache: Path, allow_cache: bool) -> Fetched:
    """A repo's card and manifest at a revision (default main), pinned to the commit sha it resolved to."""
    from huggingface_hub import ModelCard

    repo, revision = parse_ref(repo_ref)
    sha, files, cached = _resolve(repo, revision, cache, allow_cache=allow_cache)
    refuse_repo_files(repo, files)
    for needed in (HUB_MANIFEST, CARD):
        if needed not in files:
            raise HubError(f"{repo}@{sha[:12]}: no {needed}; it is not a turnflow adapter repo "
                           f"(publish one with `turnflow adapters publish ID --repo {repo}`)")
    try:
        card_path = _download(repo, CARD, sha, cache, local_only=cached)
        manifest_path = _download(repo, HUB_MANIFEST, sha, cache, local_only=cached)
    except _unreachable_types() as exc:
        raise _unreachable("and the files are not in the cache", exc) from None
    except Exception as exc:
        raise _hub_error(f"{repo}@{sha[:12]}", exc) from None
    try:
        manifest = HubManifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        problems = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
        text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in problems)
        raise HubError(f"{repo}@{sha[:12]}: {HUB_MANIFEST} is not a turnflow adapter manifest: {text}") from None
    card = ModelCard.load(card_path, ignore_metadata_errors=True).data.to_dict()
    return Fetched(repo, sha, card, manifest, license_from_card(card), files)


def attribution(fetched: Fetched) -> list[str]:
    """License and attribution lines, as preview and pull print them."""
    m = fetched.manifest
    base = m.base_model
    return [
        f"{fetched.repo} @ {fetched.revision}",
        f"  kind:         {m.kind} {m.format} ({m.file}, {m.size_bytes} bytes, sha256 {m.sha256[:16]}…)",
        f"  license:      {fetched.license or 'NONE in the card'}",
        f"  authors:      {', '.join(m.authors) or 'not given'}",
        f"  derived from: {', '.join(m.derived_from) or 'nothing declared'}",
        f"  base model:   {(base.hub_id or base.short) if base else 'any (TTS voice profile)'}",
    ] + ([f"  preview says: \u201c{m.preview.text}\u201d ({m.preview.spoken_by})"] if m.preview else [])


def preview(repo_ref: str, *, out: Path | None = None, registry: AdapterRegistry | None = None,
            play: bool = True) -> tuple[Fetched, Path, bool]:
    """Fetch only the card, the manifest and preview.wav; write it to `out` or play it.

    Returns what was fetched, where the WAV is, and whether it was played."""
    _check_online("previewing needs it")
    registry = registry or AdapterRegistry()
    fetched = fetch(repo_ref, cache=registry.hub_cache, allow_cache=False)
    if PREVIEW not in fetched.files:
        raise HubError(f"{fetched.repo}@{fetched.revision[:12]}: no {PREVIEW} in the repo")
    try:
        wav = _download(fetched.repo, PREVIEW, fetched.revision, registry.hub_cache, local_only=False)
    except _unreachable_types() as exc:
        raise _unreachable("previewing needs it", exc) from None
    except Exception as exc:
        raise _hub_error(fetched.repo, exc) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wav, out)
        return fetched, out, False
    player = next((shutil.which(p) for p in ("paplay", "aplay", "play") if shutil.which(p)), None) if play else None
    played = bool(player) and subprocess.run([str(player), str(wav)], check=False, capture_output=True,
                                             timeout=120).returncode == 0
    return fetched, wav, played


def pull(repo_ref: str, *, accept_unlicensed: bool = False, registry: AdapterRegistry | None = None) -> AdapterManifest:
    """Download an adapter at a revision into the registry's Hugging Face cache and add it as `hf://REPO@SHA`.

    Refuses a repo with other file types than GGUF, JSON/YAML and WAV, a card without a license (unless
    `accept_unlicensed`), and a file whose sha256 is not the manifest's. Works offline from the cache."""
    registry = registry or AdapterRegistry()
    cache = registry.hub_cache
    fetched = fetch(repo_ref, cache=cache, allow_cache=True)
    repo, sha, m = fetched.repo, fetched.revision, fetched.manifest
    if not fetched.license and not accept_unlicensed:
        raise HubError(f"{repo}@{sha[:12]}: its model card names no license, so you may not be allowed to use it; "
                       f"refused (ask the authors for one, or pass --accept-unlicensed if you know you may)")
    name = Path(m.file)
    if name.name != m.file or m.file in REPO_METADATA or m.file not in fetched.files:
        raise HubError(f"{repo}@{sha[:12]}: {HUB_MANIFEST} names file {m.file!r}, which is not a file of the repo")
    from turnflow.adapters import refuse_unsafe

    refuse_unsafe(name)
    cached = not _online_for(cache, repo, sha, m.file)
    try:
        path = _download(repo, m.file, sha, cache, local_only=cached)
    except _unreachable_types() as exc:
        raise _unreachable(f"and {m.file} at {sha[:12]} is not in the cache", exc) from None
    except Exception as exc:
        raise _hub_error(f"{repo}@{sha[:12]}", exc) from None
    actual = file_sha256(path)
    if actual != m.sha256:
        _evict(path)
        raise HubError(f"{repo}@{sha[:12]}: {m.file} has sha256 {actual[:16]}…, but {HUB_MANIFEST} says "
                       f"{m.sha256[:16]}…; refused and removed from the cache, nothing added")
    return registry.add(
        path, kind=m.kind, adapter_id=f"hf://{repo}@{sha}", license=fetched.license, authors=m.authors,
        base=m.base_model, derived_from=m.derived_from, revision=sha, source_label=f"hf://{repo}",
        copy=False, expected_sha256=m.sha256,
    )


def _online_for(cache: Path, repo: str, sha: str, filename: str) -> bool:
    """Whether to ask the Hub for a file: not when offline, nor when the pinned snapshot already has it."""
    if hub_offline():
        return False
    return not (_cache_folder(cache, repo) / "snapshots" / sha / filename).exists()


def _cache_folder(cache: Path, repo: str) -> Path:
    """A model repo's folder in the Hugging Face cache layout."""
    return cache / f"models--{repo.replace('/', '--')}"


def _evict(path: Path) -> None:
    """Remove a refused file from the cache (its snapshot link and the blob it points to)."""
    blob = path.resolve()
    for target in (path, blob):
        try:
            target.unlink()
        except OSError:
            pass
