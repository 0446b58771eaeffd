"""The recipe, persona and backend schema: the typed models a turnflow file is validated into."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

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
        private = self.__pydantic_private__  # read directly: pydantic's attribute lookup for it is slow
        return private["_digest"] if private else ""


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


STT_BRIDGES = ("pocketsphinx", "whisper")
TTS_BRIDGES = ("espeak-ng", "espeak", "piper")
HTTP_BRIDGE_KEYS: dict[str, tuple[str, ...]] = {
    "stt": ("url", "model", "api_key", "timeout", "language"),
    "tts": ("url", "model", "api_key", "timeout"),
    "describe": ("url", "model", "api_key", "timeout"),
}


def _bridge(kind: str, value: Any, names: tuple[str, ...]) -> Any:
    """A bridge named by the recipe: one of `names`, or an HTTP engine (`{url: ..., model: ...}`)."""
    allowed = HTTP_BRIDGE_KEYS[kind]
    http = "{url: ..., model: ...}"
    if isinstance(value, str):
        if value not in names:
            choices = ", ".join(repr(n) for n in names)
            raise ValueError(f"unknown {kind} bridge {value!r}; use {choices + ' or ' if choices else ''}{http}")
        return value
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"the {kind} bridge does not take {unknown}; its keys are {', '.join(allowed)}")
    if not isinstance(value.get("url"), str) or not value["url"]:
        raise ValueError(f"an HTTP {kind} bridge needs a 'url' (an OpenAI-compatible server), got {value.get('url')!r}")
    return value


class SpeechSpec(_Strict):
    """Speech bridges, used only where the model lacks the modality."""

    stt: str | dict[str, Any] = "pocketsphinx"
    tts: str | dict[str, Any] = "espeak-ng"
    describe: str | dict[str, Any] | None = None

    @field_validator("stt")
    @classmethod
    def _known_stt(cls, value: Any) -> Any:
        return _bridge("stt", value, STT_BRIDGES)

    @field_validator("tts")
    @classmethod
    def _known_tts(cls, value: Any) -> Any:
        return _bridge("tts", value, TTS_BRIDGES)

    @field_validator("describe")
    @classmethod
    def _known_describe(cls, value: Any) -> Any:
        return None if value in (None, "none") else _bridge("describe", value, ())


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
    stop_at_speakers: bool = False
    """End a reply where the model starts a line of someone in the room (`\nName:`), and drop a speaker label
    (`Name:`) it opens with: a base model continues a room's transcript instead of answering in it."""


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


_SCHEMAS: dict[str, type[BaseModel]] = {"recipe": Recipe, "persona": Persona, "backends": BackendsFile}
