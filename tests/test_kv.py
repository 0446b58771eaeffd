"""KV memory and KV paging on a real llama-server: bytes per token, personas outnumbering slots, bad files,
concurrent turns."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import copy_recipe_folder

from turnflow.kv import QWEN3_4B, KvShape, reference_arithmetic
from turnflow.modelgen import ensure_text_model
from turnflow.recipe import BackendSpec
from turnflow.server import EmbeddedServer
from turnflow.session import Session

pytestmark = pytest.mark.server

NAMES = ["Ada", "Bea", "Cal", "Dov", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kai", "Lia", "Max", "Nia"]


def _recipe_with_personas(tmp_path: Path, count: int, backend: str, spec: str) -> Path:
    """The example recipe with `count` personas without adapters (distinct names and prompts) and a backend."""
    recipe = copy_recipe_folder(tmp_path)
    text = recipe.read_text().replace("personas: [maya, helper, teacher, codereview]\n", "")
    recipe.write_text(text.replace("backend: local\n", f"backend: {backend}\n"))
    examples = ["maya", "helper", "teacher", "codereview"]
    for i in range(count):
        data = yaml.safe_load((recipe.parent / "personas" / f"{examples[i % 4]}.yaml").read_text())
        old_name = data["name"]
        data.update(persona=f"p{i}", name=NAMES[i], skills=[])
        data["system_prompt"] = data["system_prompt"].replace(old_name, NAMES[i])
        data["voice"].pop("adapter", None)
        (recipe.parent / "personas" / f"p{i}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (recipe.parent / "backends.yaml").write_text(f"backends:\n  {backend}:\n{spec}")
    return recipe


def _spec(slots: int, **extra: Any) -> str:
    lines = {"kind": "embedded", "model": "generated:tiny", "slots": slots, "ctx_per_slot": 32768, **extra}
    return "".join(f"    {k}: {v}\n" for k, v in lines.items())


def test_a_models_kv_shape_is_read_once_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from turnflow import model_facts

    model = tmp_path / "copy.gguf"  # a file of its own: no record of it exists yet
    shutil.copy(ensure_text_model("tiny"), model)  # under the size whose header facts are recorded anyway
    monkeypatch.setenv("TURNFLOW_MODELS", str(tmp_path / "models"))  # its record goes there, not to the shared cache
    read = KvShape.recorded(model)
    assert read == KvShape.of(model) and read.n_head_kv == (2, 2)
    assert model_facts.recorded(model, "kv_shape") is not None
    from turnflow.adapters import base_model_ref

    assert model_facts.recorded(model, "gguf_facts") is None
    assert base_model_ref(model).architecture == "llama"
    assert model_facts.recorded(model, "gguf_facts") is not None  # a base model's is recorded, whatever its size
    model_facts._MEMORY.clear()  # as a new process: the record on disk, not this process's memory

    def no_header(path: Path) -> KvShape:
        raise AssertionError("the header was read again")

    monkeypatch.setattr(KvShape, "of", classmethod(lambda cls, path: no_header(path)))
    assert KvShape.recorded(model) == read
    with model.open("ab") as handle:  # a changed file is read again
        handle.write(b"\0")
    with pytest.raises(AssertionError, match="read again"):
        KvShape.recorded(model)


def test_kv_bytes_per_token_come_from_the_model_file(home: Path, tmp_path: Path) -> None:
    tiny, bench = KvShape.of(ensure_text_model("tiny")), KvShape.of(ensure_text_model("bench"))
    assert tiny.bytes_per_token("f16") == 2 * 2 * 2 * 16 * 2  # layers x KV heads x (K + V) x head dim x 2 bytes
    assert bench.bytes_per_token("f16") == 8 * 4 * 2 * 64 * 2
    assert bench.bytes_per_token("q8_0") == pytest.approx(8192 * 34 / 64)
    assert QWEN3_4B.bytes_per_token("f16") == 144 * 1024
    numbers = reference_arithmetic(6, 8192)["by_cache_type"]
    print("\nQwen3-4B-class, 6 personas x 8k tokens:", numbers)
    assert numbers["q8_0"]["kv_gb_sized"] < numbers["f16"]["kv_gb_sized"] < numbers["f16"]["kv_gb_full_slots"]
    # a slot the server saves holds about bytes_per_token per token (plus the tokens themselves)
    spec = BackendSpec.model_validate(yaml.safe_load(_spec(1).replace("    ", "")))
    server = EmbeddedServer("bytes", spec)
    url = server.up()
    try:
        text = "measure the cache " * 200  # well inside the first pool (4096 tokens for one slot)
        answer = httpx.post(url + "/completion", json={"prompt": text, "n_predict": 1, "id_slot": 0,
                                                        "cache_prompt": True}, timeout=60).json()
        assert answer["timings"]["prompt_n"] > 1000
        saved = httpx.post(url + "/slots/0?action=save", json={"filename": "measure.bin"}, timeout=60).json()
    finally:
        server.down()
    measured = saved["n_written"] / saved["n_saved"]
    print(f"saved {saved['n_saved']} tokens in {saved['n_written']} bytes: {measured:.1f} B/token "
          f"(model file says {tiny.bytes_per_token():.0f} of KV)")
    assert tiny.bytes_per_token() <= measured <= tiny.bytes_per_token() + 32


def test_eight_personas_on_two_slots_page_their_kv_to_disk(home: Path, tmp_path: Path) -> None:
    recipe = _recipe_with_personas(tmp_path, 8, "two-slots", _spec(2, cache_ram_mb=0))
    reports = _rounds(recipe, tmp_path, personas=8, rounds=4, text="Round {}, what is next?")
    print("\npersona turn slot processed/prompt source restore_ms saved_bytes")
    for r in reports:
        kv, llm = r["kv"], r["llm"]
        print(f"{r['persona']:3s} {r['turn']:2d} {llm['slot']} {llm['prompt_tokens_processed']:6d}/"
              f"{llm['prompt_tokens']:6d} {kv['source']:10s} {kv['restore_ms']} {kv['saved_bytes']}")
    steady = [r for r in reports if r["turn"] >= 3]
    assert len(steady) == 16
    for r in steady:
        llm = r["llm"]
        assert r["kv"]["source"] in ("disk", "slot"), r["kv"]
        assert llm["prompt_tokens_cached"] >= 0.9 * llm["prompt_tokens"], (r["persona"], r["turn"], llm)
    restores = [r["kv"]["restore_ms"] for r in steady if r["kv"]["source"] == "disk"]
    for r in steady:  # paging is the server's file I/O: reported apart, never counted as turnflow's own work
        timings = r["timings_ms"]
        assert (timings["kv_page"] > 0) == (r["kv"]["source"] == "disk" or r["kv"]["saved_bytes"] > 0), r["kv"]
        assert timings["kv_page"] == 0.0 or abs(timings["kv_page"] - timings["nodes"]["kv"]) <= 0.01  # both rounded
        assert timings["turnflow"] < timings["total"] - timings["model"] - timings["kv_page"] + 0.05
        assert 0 < timings["turnflow_before_model"] <= timings["turnflow"]  # the paging (before the request) left out
    print(f"restores: {len(restores)}, median {sorted(restores)[len(restores) // 2]:.1f} ms; "
          f"pool {reports[-1]['kv']['pool_tokens']} tokens x {reports[-1]['kv']['bytes_per_token']} B")
    assert reports[-1]["kv"]["bytes_per_token"] == 256.0
    peak = _peak_tokens_in_slots(reports)
    assert peak <= reports[-1]["kv"]["pool_tokens"] <= 1.25 * peak, (reports[-1]["kv"]["pool_tokens"], peak)


def _rounds(recipe: Path, tmp_path: Path, *, personas: int, rounds: int, text: str) -> list[dict[str, Any]]:
    """Every persona `p0`.. speaks once a round, each in its own room; the turns' reports, in order."""
    reports: list[dict[str, Any]] = []
    with Session(recipe, state_dir=tmp_path / "state") as session:
        try:
            for round_no in range(rounds):
                for i in range(personas):
                    reports.append(session.turn(persona=f"p{i}", room=f"room-{i}", text=text.format(round_no)).report)
        finally:
            session.backend.server.down()
    return reports


def _peak_tokens_in_slots(reports: list[dict[str, Any]]) -> int:
    """The most tokens the slots held at once: each slot holds its last turn's prompt and reply."""
    held: dict[int, int] = {}
    peak = 0
    for r in reports:
        llm = r["llm"]
        held[llm["slot"]] = (llm["prompt_tokens"] or 0) + (llm["completion_tokens"] or 0)
        peak = max(peak, sum(held.values()))
    return peak


def test_a_pool_grown_twice_keeps_kv_restored_by_the_first_growth(home: Path, tmp_path: Path) -> None:
    """One persona per slot, the pool grown at each new persona's first turn: a slot whose KV the first growth
    restored (and no turn has used since) is saved again by the next growth. llama-server's `/slots` reports no
    prompt for such a slot, so asking it which slots hold KV lost them (measured on Gemma: every persona re-read
    its whole prompt on its second turn)."""
    recipe = _recipe_with_personas(tmp_path, 3, "one-each", _spec(3, cache_ram_mb=0))
    reports = _rounds(recipe, tmp_path, personas=3, rounds=2, text="Round {}?")
    pools = [r["kv"]["pool_tokens"] for r in reports]
    assert pools[0] < pools[1] < pools[2], pools  # grown at the second and the third persona's first turn
    second = reports[3:]
    print(f"\npools {pools}; second round processed {[r['llm']['prompt_tokens_processed'] for r in second]} "
          f"of {[r['llm']['prompt_tokens'] for r in second]}")
    assert [r["kv"]["source"] for r in second] == ["slot"] * 3
    assert all(r["llm"]["prompt_tokens_processed"] < r["llm"]["prompt_tokens"] / 4 for r in second)


def test_the_pool_is_sized_from_what_the_slots_use(home: Path, tmp_path: Path) -> None:
    spec = BackendSpec.model_validate(yaml.safe_load(_spec(4).replace("    ", "")))
    assert EmbeddedServer("sizing", spec).pool_tokens() == 4096  # one slot's worth before anything is known
    assert EmbeddedServer("sizing", spec).pool_tokens(needed=40_000) == 46_080  # 1.15 x, rounded up to 256
    assert EmbeddedServer("sizing", spec).pool_tokens(needed=200_000) == 4 * 32768  # never past slots x ctx
    recipe = _recipe_with_personas(tmp_path, 3, "two-slots", _spec(2, cache_ram_mb=0))
    reports = _rounds(recipe, tmp_path, personas=3, rounds=2, text="Round {}?")
    peak = _peak_tokens_in_slots(reports)
    pools = [r["kv"]["pool_tokens"] for r in reports]
    print(f"\npool by turn {pools}; tokens in slots at peak {peak}; allocated / used {max(pools) / peak:.3f}")
    assert max(pools) <= 1.25 * peak
    assert pools == sorted(pools) and pools[-1] >= peak  # grown on demand, never shrunk under what is held
    assert [r["kv"]["source"] for r in reports[3:]] == ["disk"] * 3  # growing the pool lost no one's KV


def test_the_pool_grows_before_a_turn_could_fill_it(home: Path) -> None:
    """A turn's KV need is an estimate, and llama-server purges an idle slot's whole KV when a request finds the
    pool full: so the pool grows while a margin past the need is still free, not once the need exceeds it."""
    spec = BackendSpec.model_validate(yaml.safe_load(_spec(2, cache_ram_mb=0).replace("    ", "")))
    server = EmbeddedServer("edge", spec)
    server.up()
    try:
        first = server.lease([], slot=0, pool_needed=100)
        first.release()
        near = server.lease([], slot=0, pool_needed=first.pool_tokens - 64)  # fits, but by less than the margin
        near.release()
    finally:
        server.down()
    print(f"\npool {first.pool_tokens} -> {near.pool_tokens} for a need of {first.pool_tokens - 64} tokens")
    assert first.pool_tokens == 4096  # one slot's worth to start with
    assert near.pool_tokens > first.pool_tokens and near.resized


def _files(folder: Path, persona: str) -> list[Path]:
    return sorted(p for p in folder.glob(f"kv-*-{persona}-*.bin"))


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "other-adapter-set"])
def test_a_bad_kv_file_is_never_restored(home: Path, tmp_path: Path, damage: str) -> None:
    recipe = _recipe_with_personas(tmp_path, 2, "one-slot", _spec(1, cache_ram_mb=0))
    with Session(recipe, state_dir=tmp_path / "state") as session:
        try:
            session.turn(persona="p0", room="r0", text="first")
            session.turn(persona="p1", room="r1", text="first")  # takes the slot: p0's KV goes to disk
            folder = session.backend.kv_files.folder
            (saved,) = _files(folder, "p0")
            if damage == "corrupt":
                data = bytearray(saved.read_bytes())
                data[len(data) // 2] ^= 0xFF
                saved.write_bytes(bytes(data))
            elif damage == "truncated":
                saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
            else:  # p0 now runs with a skill adapter: the saved KV belongs to another adapter set
                from turnflow.adapters import AdapterRegistry

                AdapterRegistry().add("generated:tiny/kv-skill", kind="skill", adapter_id="kv-skill")
                path = recipe.parent / "personas" / "p0.yaml"
                data_yaml = yaml.safe_load(path.read_text())
                data_yaml["skills"] = [{"adapter": "kv-skill", "scale": 1.0}]
                path.write_text(yaml.safe_dump(data_yaml, sort_keys=False))
                session._personas.pop("p0")  # as a new process would, read the edited persona again
            again = session.turn(persona="p0", room="r0", text="second")
            untouched = session.turn(persona="p1", room="r1", text="second")
        finally:
            session.backend.server.down()
    kv = again.report["kv"]
    print(f"\n{damage}: {kv}")
    assert kv["source"] == "recomputed"
    assert again.report["llm"]["prompt_tokens_processed"] > 0.9 * again.report["llm"]["prompt_tokens"]
    reason = kv["not_restored"]
    expected = {"corrupt": "bytes changed", "truncated": "truncated", "other-adapter-set": "no saved KV"}[damage]
    assert expected in reason, reason
    assert untouched.report["kv"]["source"] == "disk"  # the other persona's good file still restores
    assert again.report["reply"] and again.report["turn"] == 2


def test_fourteen_personas_take_concurrent_turns_without_cross_talk(home: Path, tmp_path: Path) -> None:
    recipe = _recipe_with_personas(tmp_path, 14, "four-slots", _spec(4, cache_ram_mb=0))
    errors: list[BaseException] = []
    results: dict[str, list[dict[str, Any]]] = {f"p{i}": [] for i in range(14)}
    with Session(recipe, state_dir=tmp_path / "state") as session:
        assert session.backend.kv_paging  # connected once before the threads start

        def talk(i: int) -> None:
            try:
                for n in range(5):
                    result = session.turn(persona=f"p{i}", room=f"room-{i}", speaker=f"user{i}",
                                          text=f"Message {n} for {NAMES[i]}.")
                    results[f"p{i}"].append(result.report)
            except BaseException as exc:  # the assertion below names it
                errors.append(exc)

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(14)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=900)
            histories = {i: session.store.history(f"room-{i}") for i in range(14)}
            owners = session.store.slot_owners(session.backend.key, 4, now=0)
        finally:
            session.backend.server.down()
    assert not errors, errors
    for i in range(14):
        history = histories[i]
        assert len(history) == 10, [m.text for m in history]
        assert [m.turn for m in history] == [n for n in range(1, 6) for _ in (0, 1)]
        assert {m.speaker for m in history} == {f"p{i}", f"user{i}"}
        assert [m.text for m in history if m.speaker == f"user{i}"] == [
            f"Message {n} for {NAMES[i]}." for n in range(5)]
        assert [r["turn"] for r in results[f"p{i}"]] == [1, 2, 3, 4, 5]
    assert not any(o.busy for o in owners)
    held = [o.persona_id for o in owners if o.persona_id]
    assert len(held) == len(set(held))  # no persona's KV in two slots
    sources = [r["kv"]["source"] for rs in results.values() for r in rs]
    print("\nkv sources over 70 concurrent turns:", {s: sources.count(s) for s in set(sources)})


def test_turns_on_many_threads_note_the_kv_they_hold_at_once(home: Path) -> None:
    """Each turn notes the KV its server's slots hold; the turns of one process do so from several threads."""
    server = EmbeddedServer("usage-race", BackendSpec(kind="embedded", model="generated:tiny", slots=4))
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def note(offset: int) -> None:
        start.wait()
        try:
            for step in range(40):
                server.note_usage(1000 + 100 * (8 * step + offset))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=note, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert server._peak_tokens() >= (1000 + 100 * (8 * 39 + 7)) / 1.05  # the peak is kept within 5 %


def test_a_budgeted_pool_pages_out_before_a_turn_could_fill_it(tmp_path: Path) -> None:
    """The budgeted pool's choice: an idle slot is paged out when this turn's estimated need and what the other
    slots hold fit the pool by less than the margin (llama-server would otherwise purge an idle slot unsaved)."""
    from turnflow.kv import KvFiles, page_out_idle
    from turnflow.store import SlotClaim, SlotOwner

    class Store:  # what page_out_idle asks of the store: which idle slot it may take (here: none, so no I/O)
        def __init__(self) -> None:
            self.asked: list[int] = []

        def take_idle_slot(self, backend: str, total_slots: int, slot: int) -> None:
            self.asked.append(slot)

    idle = SlotOwner(1, "maya", "set", "prefix", tokens=3000, last_used=1.0, busy=False)
    claim = SlotClaim("b", 2, 0, "token", None, own=True, others=[idle])
    files = KvFiles(tmp_path)
    roomy, tight = Store(), Store()
    page_out_idle("http://127.0.0.1:9", roomy, claim, 700, 4096, files, model="m")  # 3700 and the margin fit
    page_out_idle("http://127.0.0.1:9", tight, claim, 1000, 4096, files, model="m")  # 4000 fits, not with margin
    assert roomy.asked == [] and tight.asked == [1]
