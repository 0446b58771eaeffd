"""Persona adapters: the registry, paging LoRAs into a real llama-server, the salt, voice fingerprints, bad input.

Everything runs against the real embedded llama-server with generated LoRA adapters (random weights);
the registry is real files under a throw-away `$TURNFLOW_HOME`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import yaml
from conftest import RECIPE, copy_recipe_folder, without_adapters
from stubs import speaking_model

from turnflow.adapters import AdapterError, AdapterRegistry
from turnflow.modelgen import ensure_lora, ensure_text_model
from turnflow.nodes.fingerprint import SAME_VOICE, fingerprint_distance
from turnflow.session import Session, TurnError

pytestmark = pytest.mark.server


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turnflow.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TURNFLOW_HOME": str(home)})


def _persona(folder: Path, persona_id: str, *, voice: str | None = None, skills: list[dict[str, Any]] | None = None,
             like: str = "maya", name: str | None = None) -> None:
    """A persona beside the recipe: a copy of an example with its own id and adapters."""
    data = yaml.safe_load((folder / "personas" / f"{like}.yaml").read_text())
    data["persona"] = persona_id
    data["name"] = name or data["name"]
    data["voice"] = {**data["voice"], "adapter": voice} if voice else {"tts": data["voice"]["tts"]}
    data["skills"] = skills or []
    (folder / "personas" / f"{persona_id}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _recipe(tmp_path: Path, *, generation: str = "", backend: str = "", personas: str = "") -> Path:
    recipe = copy_recipe_folder(tmp_path)
    text = recipe.read_text()
    if generation:
        text = text.replace("generation:\n  max_tokens: 48\n  temperature: 0.8\n", generation)
    served = f"personas: [{personas}]\n" if personas else ""  # by default the recipe serves any persona
    text = text.replace("personas: [maya, helper, teacher, codereview]\n", served)
    if backend:
        text = text.replace("backend: local\n", f"backend: {backend}\n")
    recipe.write_text(text)
    return recipe


# ------------------------------------------------------------------ the registry and its CLI


def test_cli_adds_lists_shows_and_removes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    added = _cli("adapters", "add", "generated:tiny/river", "--kind", "voice", "--license", "apache-2.0",
                 "--author", "Ada", home=home)
    assert added.returncode == 0, added.stderr
    assert "added river (voice lora" in added.stdout and "license Apache-2.0" in added.stdout
    listing = json.loads(_cli("adapters", "list", "--json", home=home).stdout)
    assert [(m["id"], m["kind"], m["format"], m["license"], m["authors"]) for m in listing] == [
        ("river", "voice", "lora", "Apache-2.0", ["Ada"])]
    manifest = listing[0]
    assert manifest["base_model"]["architecture"] == "llama"
    assert manifest["base_model"]["digest"] == AdapterRegistry(home / "adapters").get("river").base_model.digest
    shown = _cli("adapters", "show", "river", home=home).stdout
    assert "license:   Apache-2.0" in shown and "authors:   Ada" in shown and "generated:tiny/river" in shown
    assert _cli("adapters", "remove", "river", home=home).returncode == 0
    assert json.loads(_cli("adapters", "list", "--json", home=home).stdout) == []
    missing = _cli("adapters", "show", "river", home=home)
    assert missing.returncode == 1 and "unknown adapter 'river'" in missing.stderr


def test_a_voice_profile_is_an_adapter_the_tts_bridge_speaks_with(home: Path, tmp_path: Path) -> None:
    profile = tmp_path / "low-voice.yaml"
    profile.write_text("engine: espeak-ng\nvoice: en-us+m1\npitch: 20\nrate_wpm: 140\n")
    registry = AdapterRegistry()
    manifest = registry.add(profile, kind="voice", adapter_id="low-voice", license="CC-BY-4.0", authors=["Sam"])
    assert manifest.format == "tts-profile" and manifest.base_model is None
    recipe = _recipe(tmp_path)
    _persona(recipe.parent, "deep", voice="low-voice")
    with Session(recipe, state_dir=tmp_path / "state") as session:
        result = session.turn(persona="deep", room="r", text="Say something.", audio_sink=lambda _: None)
    report = result.report
    assert report["adapters"]["voice"] == "low-voice" and report["adapters"]["skills"] == []
    assert all(entry["scale"] == 0 for entry in report["adapters"]["lora"])  # no LoRA applied
    assert report["adapters"]["licenses"] == {"low-voice": "CC-BY-4.0"}
    fingerprint = report["speech"]["voice_fingerprint"]
    assert fingerprint["f0_hz"] < 100, fingerprint  # espeak-ng's en-us+m1 at pitch 20 is a low voice


# ------------------------------------------------------------------ what the prompt says is applied


def _active_adapters(result: Any) -> str:
    """The `active_adapters` section of a turn's prompt (its line of the system message)."""
    system = result.prompt.messages[0]["content"]
    return next(line for line in system.splitlines() if line.startswith("Active adapters:"))


def test_active_adapters_renders_exactly_what_is_applied(home: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry()
    profile = tmp_path / "calm-voice.yaml"
    profile.write_text("engine: espeak-ng\nvoice: en-us+m3\npitch: 40\n")
    registry.add(profile, kind="voice", adapter_id="calm-voice", license="CC0-1.0")
    recipe = _recipe(tmp_path, generation="generation:\n  max_tokens: 8\n  temperature: 0\n")  # the prompt matters
    without_adapters(recipe, "helper")
    _persona(recipe.parent, "calm", voice="calm-voice", skills=[{"adapter": "code-review", "scale": 1.25}])
    with Session(recipe, state_dir=tmp_path / "state") as session:
        results = {p: session.turn(persona=p, room=f"aa-{p}", text="Morning.") for p in ("helper", "maya", "calm")}
    rendered = {p: _active_adapters(r) for p, r in results.items()}
    print("\n" + "\n".join(f"{p}: {line}" for p, line in rendered.items()))
    assert rendered["helper"] == "Active adapters: none."
    assert rendered["maya"] == ("Active adapters: voice maya-voice (LoRA at 1.00); skill standup-facilitation "
                                "(LoRA at 0.60); skill incident-comms (LoRA at 0.30).")
    assert rendered["calm"] == ("Active adapters: voice calm-voice (TTS voice profile); "
                                "skill code-review (LoRA at 1.25).")
    # ... and that is what the requests carried: the same ids and scales, nothing for the persona without adapters
    for persona_id, result in results.items():
        report = result.report["adapters"]
        applied = sorted(entry["scale"] for entry in report["lora"] or [] if entry["scale"] > 0)
        assert applied == {"helper": [], "maya": [0.3, 0.6, 1.0], "calm": [1.25]}[persona_id], report
        named = [report["voice"]] if report["voice"] else []
        named += [f"{s['id']} (LoRA at {s['scale']:.2f})" for s in report["skills"]]
        assert all(name in rendered[persona_id] for name in named)
        others = set(registry.ids()) - {report["voice"], *(s["id"] for s in report["skills"])}
        assert not any(f" {other} (" in rendered[persona_id] for other in others)  # nothing else


# ------------------------------------------------------------------ a model server of the user's own


def test_a_server_of_your_own_without_an_adapter_fails_the_turn_before_the_model_call(home: Path,
                                                                                      tmp_path: Path) -> None:
    registry = AdapterRegistry()

    def registry_file(adapter_id: str) -> Path:
        return registry.path(registry.get(adapter_id))

    copied = tmp_path / "review.gguf"  # the registry's file under another name: known by its sha256
    shutil.copyfile(registry_file("code-review"), copied)
    stranger = ensure_lora("tiny", "not-in-the-registry")  # a file the registry does not know
    loaded = [
        registry_file("maya-voice"), registry_file("standup-facilitation"),
        Path("/srv/loras") / registry_file("helper-voice").name,  # on the server's machine: known by its name
        copied, stranger,
    ]  # everything maya needs but incident-comms
    recipe = _recipe(tmp_path)
    _persona(recipe.parent, "maya-lite", voice="maya-voice", skills=[{"adapter": "standup-facilitation", "scale": 0.6}])
    with speaking_model(loaded_adapters=loaded) as (url, requests):
        (recipe.parent / "backends.yaml").write_text(f"backends:\n  own:\n    kind: openai\n    url: {url}\n")
        with Session(recipe, backend="own", state_dir=tmp_path / "state") as session:
            first = session.turn(persona="maya-lite", room="r", text="Morning.", audio_sink=lambda _: None)
            history = session.store.history("r")
            calls = len(requests)
            with pytest.raises(TurnError) as info:
                session.turn(persona="maya", room="r", text="Anything blocked?", audio_sink=lambda _: None)
            assert len(requests) == calls  # failed before the model call
            assert session.store.history("r") == history
            after = session.turn(persona="maya-lite", room="r", text="Thanks.", audio_sink=lambda _: None)
    message = str(info.value)
    print("\n" + message)
    assert "history unchanged" in message and "has not loaded adapter(s) incident-comms (" in message, message
    assert registry_file("incident-comms").name in message  # the file to load
    assert "--lora" in message and "maya-voice" not in message.split("(it has:")[0]
    adapters = first.report["adapters"]
    assert adapters["resident"] == ["maya-voice", "standup-facilitation", "helper-voice", "code-review",
                                    stranger.name]
    assert adapters["lora"] == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.6}, {"id": 2, "scale": 0.0},
                                {"id": 3, "scale": 0.0}, {"id": 4, "scale": 0.0}]
    assert requests[0]["lora"] == adapters["lora"]
    assert after.report["turn"] == first.report["turn"] + 1  # the failed turn left no trace


# ------------------------------------------------------------------ adapters change replies, and only theirs


def test_a_skill_adapter_changes_the_reply_and_removing_it_restores_it(home: Path, tmp_path: Path) -> None:
    AdapterRegistry().add("generated:tiny/terse", kind="skill", adapter_id="terse")
    recipe = _recipe(tmp_path, generation="generation:\n  max_tokens: 24\n  temperature: 0\n  seed: 7\n")
    replies: dict[str, str] = {}
    for label, skills in (("without", []), ("with", [{"adapter": "terse", "scale": 1.0}]), ("removed", [])):
        _persona(recipe.parent, "quinn", skills=skills)
        with Session(recipe, state_dir=tmp_path / f"state-{label}") as session:
            result = session.turn(persona="quinn", room="r", text="What is on the board today?")
        replies[label] = result.reply
        lora = {entry["id"]: entry["scale"] for entry in result.report["adapters"]["lora"]}
        applied = [entry["scale"] for entry in result.report["adapters"]["lora"] if entry["scale"] > 0]
        assert applied == ([1.0] if skills else []), lora
        if label == "with":
            with_result = result
    print("\nreplies:", json.dumps(replies, indent=1))
    assert replies["with"] != replies["without"]
    assert replies["removed"] == replies["without"]
    # the difference is the adapter's, not the salt's: the same messages without the LoRA (computed afresh:
    # no cached prompt, whose KV the server would reuse whatever the LoRA) give another reply
    with Session(recipe, state_dir=tmp_path / "state-with") as session:
        zeros = [{"id": entry["id"], "scale": 0.0} for entry in with_result.report["adapters"]["lora"]]
        again = session.backend.client.stream(
            with_result.prompt.messages, max_tokens=24, temperature=0, seed=7, lora=zeros,
            extra={**session.backend.spec.request_defaults, "cache_prompt": False},
        ).drain()
    print("same messages, no LoRA:", again.text, again.server_timings.get("cache_n"))
    assert again.text != replies["with"]


def test_the_salt_keeps_two_adapter_sets_from_sharing_kv(home: Path, tmp_path: Path) -> None:
    """Two personas identical but for their adapter share at most the salt's tokens, host prompt cache on.

    Measured on our llama-server: a slot that ran set B, asked for a prompt that set A computed earlier,
    restores A's KV from the host prompt cache and serves it under B. The salt is what prevents it.
    """
    registry = AdapterRegistry()
    files = [registry.path(registry.add(f"generated:tiny/{name}", kind="skill", adapter_id=name))
             for name in ("tone-a", "tone-b")]
    recipe = _recipe(tmp_path)
    (recipe.parent / "backends.yaml").write_text(  # both adapters loaded from the start: no page-in restarts
        "backends:\n  one-slot:\n    kind: embedded\n    model: generated:tiny\n    slots: 1\n    ctx_per_slot: 32768\n"
        f"    lora: [{files[0]}, {files[1]}]\n"
    )
    _persona(recipe.parent, "twin-a", skills=[{"adapter": "tone-a", "scale": 1.0}], name="Twin")
    _persona(recipe.parent, "twin-b", skills=[{"adapter": "tone-b", "scale": 1.0}], name="Twin")
    with Session(recipe, backend="one-slot", state_dir=tmp_path / "state") as session:
        try:
            first = session.turn(persona="twin-a", room="r-a", text="Hello.")
            set_b = [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
            client, defaults = session.backend.client, session.backend.spec.request_defaults
            # something else runs under set B on the slot; twin-a's prompt goes to the host prompt cache
            client.stream([{"role": "user", "content": "unrelated " * 200}], max_tokens=4, temperature=0,
                          id_slot=0, lora=set_b, extra=defaults).drain()
            second = session.turn(persona="twin-b", room="r-b", text="Hello.")
            # without the salt: twin-a's very prompt asked for under set B gets set A's KV back
            unsalted = client.stream(first.prompt.messages, max_tokens=4, temperature=0, id_slot=0, lora=set_b,
                                     extra=defaults).drain()
        finally:
            session.backend.server.down()
    print(f"\ntwin-b's first turn: {second.report['llm']['prompt_tokens_cached']} of "
          f"{second.report['llm']['prompt_tokens']} tokens cached; twin-a's prompt under set B: "
          f"{unsalted.prompt_tokens_cached} cached. Salts {first.report['adapters']['salt']} "
          f"{second.report['adapters']['salt']}")
    assert first.report["adapters"]["salt"] != second.report["adapters"]["salt"]
    assert second.report["llm"]["prompt_tokens_cached"] <= 32
    assert unsalted.prompt_tokens_cached > 0.9 * first.report["llm"]["prompt_tokens"]  # the check can fail


# ------------------------------------------------------------------ paging: 12 adapters, 8 resident


def test_six_personas_with_twelve_adapters_page_in_and_stay_warm(home: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry()
    recipe = _recipe(tmp_path, backend="paged")
    (recipe.parent / "backends.yaml").write_text(
        "backends:\n  paged:\n    kind: embedded\n    model: generated:tiny\n    slots: 6\n    ctx_per_slot: 20480\n"
        "    max_resident_adapters: 8\n"
    )
    personas = [f"p{i}" for i in range(6)]
    for persona_id in personas:
        registry.add(f"generated:tiny/{persona_id}-voice", kind="voice", adapter_id=f"{persona_id}-voice")
        registry.add(f"generated:tiny/{persona_id}-skill", kind="skill", adapter_id=f"{persona_id}-skill")
        _persona(recipe.parent, persona_id, voice=f"{persona_id}-voice",
                 skills=[{"adapter": f"{persona_id}-skill", "scale": 0.8}])
    # three personas talk every round, the other three take turns in the fourth seat: 4 x 2 adapters resident
    order = [p for round_no in range(9) for p in (*personas[:3], personas[3 + round_no % 3])]
    reports: list[dict[str, Any]] = []
    with Session(recipe, backend="paged", state_dir=tmp_path / "state") as session:
        try:
            for n, persona_id in enumerate(order):
                reports.append(session.turn(persona=persona_id, room=f"room-{persona_id}",
                                            text=f"Question {n}: anything new?").report)
        finally:
            session.backend.server.down()
    print("\npersona turn  paged_in                  page_ms  processed/prompt  resident")
    for r in reports:
        a, llm = r["adapters"], r["llm"]
        print(f"{r['persona']:7s} {r['turn']:4d}  {','.join(a['paged_in']) or '-':24s} {a['page_ms']:8.1f}  "
              f"{llm['prompt_tokens_processed']:6d}/{llm['prompt_tokens']:6d}  {len(a['resident'])}")
    assert len(reports) == len(order) and all(r["reply"] for r in reports)
    paged = [r for r in reports if r["adapters"]["paged_in"]]
    assert paged and all(r["adapters"]["page_ms"] > 0 for r in paged)
    assert all(len(r["adapters"]["resident"]) <= 8 for r in reports)
    for r in reports:  # the request lists every resident adapter, the persona's two at their scales
        scales = sorted(entry["scale"] for entry in r["adapters"]["lora"])
        assert len(scales) == len(r["adapters"]["resident"]) and scales[-2:] == [0.8, 1.0], r["adapters"]
    steady = [r for r in reports if r["turn"] >= 3]
    resident_steady = [r for r in steady if not r["adapters"]["paged_in"]]
    assert {r["persona"] for r in resident_steady} >= set(personas[:3])
    for r in resident_steady:
        llm = r["llm"]
        assert llm["prompt_tokens_cached"] / llm["prompt_tokens"] >= 0.95, (r["persona"], r["turn"], llm)
    hit = sum(r["llm"]["prompt_tokens_cached"] for r in steady) / sum(r["llm"]["prompt_tokens"] for r in steady)
    print(f"steady-state hit ratio over all turns (paged or not): {hit:.3f}; page-ins: {len(paged)}, "
          f"median page-in {sorted(r['adapters']['page_ms'] for r in paged)[len(paged) // 2]:.0f} ms")


# ------------------------------------------------------------------ voice identity


def test_voice_fingerprints_tell_the_example_personas_apart(home: Path, tmp_path: Path) -> None:
    fingerprints: dict[tuple[str, int], dict[str, Any]] = {}
    for session_no in range(2):
        with Session(RECIPE, state_dir=tmp_path / f"session-{session_no}") as session:
            for persona_id in ("maya", "helper", "teacher", "codereview"):
                result = session.turn(persona=persona_id, room=f"fp-{session_no}", text="Tell me something.",
                                      audio_sink=lambda _: None)
                fingerprints[(persona_id, session_no)] = result.report["speech"]["voice_fingerprint"]
    personas = ("maya", "helper", "teacher", "codereview")
    same = {p: fingerprint_distance(fingerprints[(p, 0)], fingerprints[(p, 1)]) for p in personas}
    apart = {(a, b): min(fingerprint_distance(fingerprints[(a, i)], fingerprints[(b, j)])
                         for i in range(2) for j in range(2)) for a, b in itertools.combinations(personas, 2)}
    print("\nsame persona, two sessions:", {p: round(d, 2) for p, d in same.items()})
    print("two personas (closest pair of their turns):", {f"{a}/{b}": round(d, 2) for (a, b), d in apart.items()})
    print("median F0:", {p: fingerprints[(p, 0)]["f0_hz"] for p in personas}, "threshold", SAME_VOICE)
    assert all(d < SAME_VOICE for d in same.values())
    assert all(d > SAME_VOICE for d in apart.values())


# ------------------------------------------------------------------ bad input


def test_validate_names_the_line_of_an_unknown_adapter_and_a_bad_scale(home: Path, tmp_path: Path) -> None:
    recipe = copy_recipe_folder(tmp_path)
    helper = recipe.parent / "personas" / "helper.yaml"
    helper.write_text(helper.read_text().replace("adapter: helper-voice", "adapter: helper-voyce"))
    teacher = recipe.parent / "personas" / "teacher.yaml"
    teacher.write_text(teacher.read_text().replace("{adapter: socratic-tutoring, scale: 0.7}",
                                                   "{adapter: socratic-tutoring, scale: 3.5}"))
    result = _cli("validate", str(recipe.parent), home=home)

    def line_of(path: Path, words: str) -> int:
        return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if words in line)

    assert result.returncode == 1
    assert (f"{helper}:{line_of(helper, 'helper-voyce')}: unknown adapter 'helper-voyce' "
            f"(did you mean 'helper-voice'?)") in result.stdout
    assert f"{teacher}:{line_of(teacher, 'scale: 3.5')}: scale: 3.5 is out of range" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_names_both_models_when_an_adapter_is_for_another_base(home: Path, tmp_path: Path) -> None:
    other_base = tmp_path / "other-base.gguf"
    shutil.copyfile(ensure_text_model("tiny"), other_base)
    with open(other_base, "ab") as handle:
        handle.write(b"\0" * 32)  # another file (digest), same architecture and shapes
    AdapterRegistry().add("generated:tiny/elsewhere", kind="skill", adapter_id="elsewhere", base=other_base)
    recipe = _recipe(tmp_path, personas="maya, far")
    _persona(recipe.parent, "far", skills=[{"adapter": "elsewhere", "scale": 1.0}])
    result = _cli("validate", str(recipe), home=home)
    assert result.returncode == 1
    problem = next(line for line in result.stdout.splitlines() if "elsewhere" in line)
    persona_file = recipe.parent / "personas" / "far.yaml"
    assert problem.startswith(f"{persona_file}:")
    assert "is made for llama@" in problem and "not for backend 'local''s model llama@" in problem, problem


def test_a_tampered_adapter_file_is_refused_and_history_untouched(home: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry()
    registry.add("generated:tiny/fragile", kind="skill", adapter_id="fragile")
    recipe = _recipe(tmp_path)
    _persona(recipe.parent, "fragile-persona", skills=[{"adapter": "fragile", "scale": 1.0}])
    with Session(recipe, state_dir=tmp_path / "state") as session:
        session.turn(persona="fragile-persona", room="r", text="first")
        before = session.store.history("r")
        path = registry.path(registry.get("fragile"))
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(TurnError) as info:
            session.turn(persona="fragile-persona", room="r", text="second")
        assert session.store.history("r") == before
    message = str(info.value)
    assert "history unchanged" in message and "sha256" in message and "refused" in message, message


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pkl", ".safetensors"])
def test_pickles_and_raw_tensors_are_refused(tmp_path: Path, suffix: str) -> None:
    weights = tmp_path / f"adapter{suffix}"
    weights.write_bytes(b"\x80\x04K\x01.")  # a pickle of 1: never opened, refused by its kind
    result = _cli("adapters", "add", str(weights), "--kind", "skill", "--base", "generated:tiny", home=tmp_path / "h")
    assert result.returncode == 1
    assert "refused" in result.stderr and "Accepted: a LoRA adapter in GGUF (.gguf)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_lora_for_another_architecture_is_refused_naming_both(tmp_path: Path) -> None:
    lora = tmp_path / "qwen-lora.gguf"
    writer = gguf.GGUFWriter(lora, "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(AdapterError) as info:
        AdapterRegistry(tmp_path / "registry").add(lora, kind="skill", base="generated:tiny")
    assert "'qwen2' architecture" in str(info.value) and "is 'llama'" in str(info.value)
    result = _cli("adapters", "add", str(lora), "--kind", "skill", "--base", "generated:tiny", home=tmp_path / "h")
    assert result.returncode == 1 and "qwen2" in result.stderr and "llama" in result.stderr
