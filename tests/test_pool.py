"""Backend pools: rendezvous placement, fallback when a member is down and the way home, affinity keys for the
routers in front of model servers, pool errors in backends.yaml, `turnflow server up --backend POOL`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from conftest import copy_recipe_folder, without_adapters
from stubs import recording_model

from turnflow.placement import home_member, placement_key, rank_members
from turnflow.recipe import RecipeError, default_backends_path, load_backends
from turnflow.server import EmbeddedServer
from turnflow.session import Session

PERSONAS = ["maya", "helper", "teacher", "codereview"]
IDS = [f"persona-{i}" for i in range(4000)]


def _homes(members: list[str], digest: str = "set-0") -> dict[str, str]:
    return {p: home_member(members, placement_key(p, digest)) for p in IDS}


# ------------------------------------------------------------------ placement


def test_adding_a_member_moves_only_the_personas_it_now_ranks_first_for() -> None:
    three, four = _homes(["a", "b", "c"]), _homes(["a", "b", "c", "d"])
    moved = [p for p in IDS if three[p] != four[p]]
    fraction = len(moved) / len(IDS)
    modulo = sum(int(p.rsplit("-", 1)[1]) % 3 != int(p.rsplit("-", 1)[1]) % 4 for p in IDS) / len(IDS)
    print(f"\nmoved when a 4th member joins: rendezvous {fraction:.3f} (ideal 0.25), modulo hashing {modulo:.3f}")
    assert all(four[p] == "d" for p in moved)  # nobody moves between the old members
    assert 0.22 < fraction < 0.28
    shares = {m: sum(h == m for h in three.values()) / len(IDS) for m in "abc"}
    assert all(0.30 < share < 0.37 for share in shares.values()), shares


def test_removing_a_member_moves_only_its_personas_each_to_its_next_ranked_member() -> None:
    three, two = _homes(["a", "b", "c"]), _homes(["a", "b"])
    moved = [p for p in IDS if three[p] != two[p]]
    assert moved and all(three[p] == "c" for p in moved)
    assert all(two[p] == rank_members(["a", "b", "c"], placement_key(p, "set-0"))[1] for p in moved)
    assert len(moved) == sum(h == "c" for h in three.values())


def test_the_adapter_set_is_part_of_the_placement() -> None:
    before, after = _homes(["a", "b", "c"], "set-0"), _homes(["a", "b", "c"], "set-1")
    changed = sum(before[p] != after[p] for p in IDS) / len(IDS)
    assert 0.55 < changed < 0.78  # a new adapter set is a new key: placed afresh (2/3 land elsewhere)


def test_placement_is_the_same_in_another_process() -> None:
    script = textwrap.dedent("""
        import json, sys
        from turnflow.placement import home_member, placement_key
        ids = [f"persona-{i}" for i in range(4000)]
        print(json.dumps({p: home_member(["a", "b", "c"], placement_key(p, "set-0")) for p in ids}))
    """)
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(done.stdout) == _homes(["a", "b", "c"])


# ------------------------------------------------------------------ pools in backends.yaml


def _write_backends(recipe: Path, backends: dict[str, dict[str, object]]) -> Path:
    path = recipe.parent / "backends.yaml"
    path.write_text(yaml.safe_dump({"backends": backends}, sort_keys=False))
    return path


@pytest.mark.parametrize("pool, expected", [
    ({"kind": "pool", "members": ["local", "lokal"]},
     "pool 'gpus': unknown member 'lokal' (did you mean 'local'?); a member is a backend defined in backends.yaml"),
    ({"kind": "pool", "members": ["local", "inner"]},
     "pool 'gpus': member 'inner' is itself a pool; pools do not nest, list 'inner''s members (local, local-audio)"),
    ({"kind": "pool"}, "pool 'gpus' has no members; add `members: [a, b]`"),
    ({"kind": "openai", "url": "http://x", "members": ["local"]},
     "backend 'gpus' has members but is kind openai; a backend with members is `kind: pool`"),
    ({"kind": "pool", "members": ["local", "local"]}, "pool 'gpus' names a member twice"),
])
def test_a_bad_pool_is_named_with_its_file_line_and_fix(tmp_path: Path, pool: dict[str, object], expected: str) -> None:
    recipe = copy_recipe_folder(tmp_path)
    path = _write_backends(recipe, {"inner": {"kind": "pool", "members": ["local", "local-audio"]}, "gpus": pool})
    with pytest.raises(RecipeError) as refused:
        load_backends(default_backends_path(), path)
    assert expected in str(refused.value)
    line = "members" if "members" in pool else "kind"
    want_line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                     if text.strip().startswith(line) and i > 4)
    assert str(refused.value).startswith(f"{path}:")
    done = subprocess.run([sys.executable, "-m", "turnflow.cli", "validate", str(path)], capture_output=True, text=True)
    said = done.stdout + done.stderr
    print("\n" + said.strip())
    assert done.returncode != 0 and "Traceback" not in said
    assert said.startswith(f"{path}:") and expected in said
    assert int(said.split(":")[1]) >= want_line


def test_the_pool_bench_summary_gives_the_fraction_a_new_member_takes_over(tmp_path: Path) -> None:
    from turnflow.bench_pool import moved_on_add, placed_homes, pool_summary

    recipe = _url_recipe(tmp_path)
    members = [f"member-{i}" for i in range(4)]
    _write_backends(recipe, {
        **{m: {"kind": "openai", "url": f"http://127.0.0.1:9/{m}"} for m in members},  # placed, never asked
        "three": {"kind": "pool", "members": members[:3]},
        "four": {"kind": "pool", "members": members},
    })
    before = placed_homes(recipe, "three", PERSONAS, tmp_path / "state")
    after = placed_homes(recipe, "four", PERSONAS, tmp_path / "state")
    moved = moved_on_add(before, after, members[:3])
    summary = pool_summary({"backends": 3}, {}, {}, moved)
    fraction = summary["moved_fraction_on_add"]
    print(f"\nmoved on add: {summary['moved_on_add']}")
    assert isinstance(fraction, float) and 0.0 <= fraction <= 1.0
    assert fraction == len(moved["personas_moved"]) / len(PERSONAS)
    assert moved["only_to_the_new_member"] and moved["new_member"] == "member-3"
    assert set(before.values()) <= set(members[:3])
    # the same builder over the 4,000 ids placed directly: about a quarter move, all to the new member
    three, four = _homes(members[:3]), _homes(members)
    many = moved_on_add(three, four, members[:3])
    assert 0.22 < pool_summary({}, {}, {}, many)["moved_fraction_on_add"] < 0.28
    assert many["only_to_the_new_member"] and 0.22 < many["synthetic_10000"] < 0.28


# ------------------------------------------------------------------ affinity


def _url_recipe(tmp_path: Path) -> Path:
    recipe = copy_recipe_folder(tmp_path)
    for persona in PERSONAS:
        without_adapters(recipe, persona)
    return recipe


def test_every_request_carries_the_affinity_key(tmp_path: Path) -> None:
    recipe = _url_recipe(tmp_path)
    with recording_model() as (url, seen), recording_model() as (other_url, other_seen):
        _write_backends(recipe, {
            "router": {"kind": "openai", "url": url},
            "custom": {"kind": "openai", "url": other_url, "affinity": {"user": False, "header": "x-routing-key"}},
        })
        with Session(recipe, backend="router", state_dir=tmp_path / "state") as session:
            first = session.turn(persona="maya", room="standup", text="hi")
            session.turn(persona="maya", room="standup", text="again")
            session.turn(persona="helper", room="standup", text="and you?")
        with Session(recipe, backend="custom", state_dir=tmp_path / "state2") as session:
            session.turn(persona="maya", room="standup", text="hi")
    chats = [r for r in seen if r["path"].endswith("/chat/completions")]
    assert [r["body"]["user"] for r in chats] == ["maya@standup", "maya@standup", "helper@standup"]
    assert [r["headers"]["x-session-id"] for r in chats] == ["maya@standup", "maya@standup", "helper@standup"]
    assert first.report["llm"]["affinity_key"] == "maya@standup"
    (custom,) = [r for r in other_seen if r["path"].endswith("/chat/completions")]
    assert "user" not in custom["body"] and "x-session-id" not in custom["headers"]
    assert custom["headers"]["x-routing-key"] == "maya@standup"


# ------------------------------------------------------------------ a pool of URL members


def test_a_pool_sends_each_persona_home_falls_back_when_its_member_dies_and_returns(tmp_path: Path) -> None:
    recipe = _url_recipe(tmp_path)
    servers = {name: ExitStack() for name in ("east", "west")}
    with servers["east"], servers["west"]:
        urls, seen = {}, {}
        for name, stack in servers.items():
            urls[name], seen[name] = stack.enter_context(recording_model(f"From {name}."))
        _write_backends(recipe, {
            "east": {"kind": "openai", "url": urls["east"]},
            "west": {"kind": "openai", "url": urls["west"]},
            "pods": {"kind": "pool", "members": ["east", "west"], "recheck_s": 0.5},
        })
        with Session(recipe, backend="pods", state_dir=tmp_path / "state") as session:
            homes = {p: session.route(p)[0][0] for p in PERSONAS}
            reports = [session.turn(persona=p, room=f"r-{p}", text="first").report for p in PERSONAS]
            assert [(r["llm"]["backend"], r["route"]["placement"], r["llm"]["pool"]) for r in reports] == [
                (homes[p], "home", "pods") for p in PERSONAS]
            assert [r["reply"] for r in reports] == [f"From {homes[p]}." for p in PERSONAS]
            victim = homes["maya"]
            survivor = "west" if victim == "east" else "east"
            servers[victim].close()  # the member's server is gone (it was connected: the turn itself fails)
            moved = session.turn(persona="maya", room="r-maya", text="second")
            stayed = [session.turn(persona=p, room=f"r-{p}", text="second").report
                      for p in PERSONAS if homes[p] == survivor]
            assert (moved.report["llm"]["backend"], moved.report["route"]["placement"]) == (survivor, "fallback")
            assert moved.report["turn"] == 2
            assert all(r["route"]["placement"] == "home" for r in stayed)
            assert victim in session.pool.down()
            history = session.store.history("r-maya")
            assert [m.text for m in history] == ["first", f"From {victim}.", "second", f"From {survivor}."]
            to_survivor = [r for r in seen[survivor] if r["path"].endswith("/chat/completions")]
            sent = next(r for r in to_survivor if r["headers"]["x-session-id"] == "maya@r-maya")
            assert f"From {victim}." in json.dumps(sent["body"]["messages"])  # the history went along

            # the member comes back (same address): after recheck_s its personas go home
            with recording_model(f"From {victim} again.", port=int(urls[victim].rsplit(":", 1)[1].split("/")[0])):
                time.sleep(0.6)
                back = session.turn(persona="maya", room="r-maya", text="third")
            assert (back.report["llm"]["backend"], back.report["route"]["placement"]) == (victim, "home")
            assert back.reply == f"From {victim} again." and back.report["turn"] == 3


# ------------------------------------------------------------------ real embedded members


@pytest.mark.server
def test_embedded_members_started_together_fall_back_with_history_and_come_home(home: Path, tmp_path: Path) -> None:
    recipe = _url_recipe(tmp_path)
    member = {"kind": "embedded", "model": "generated:tiny", "slots": 2, "ctx_per_slot": 8192}
    path = _write_backends(recipe, {"a": member, "b": dict(member),
                                    "duo": {"kind": "pool", "members": ["a", "b"], "recheck_s": 1.0}})
    specs = load_backends(path)
    cli = [sys.executable, "-m", "turnflow.cli", "server"]
    try:
        up = subprocess.run([*cli, "up", "--recipe", str(recipe), "--backend", "duo"], capture_output=True,
                            text=True, timeout=300)
        assert up.returncode == 0, up.stderr
        assert [line.split(":")[0] for line in up.stdout.splitlines()] == ["a", "b"]
        with Session(recipe, backend="duo", state_dir=tmp_path / "state") as session:
            homes = {p: session.route(p)[0][0] for p in PERSONAS}
            persona = "maya"
            victim = homes[persona]
            survivor = "b" if victim == "a" else "a"
            first = session.turn(persona=persona, room="standup", text="Good morning.")
            assert (first.report["llm"]["backend"], first.report["route"]["placement"]) == (victim, "home")

            pid = EmbeddedServer(victim, specs[victim]).status()["pid"]
            os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while EmbeddedServer(victim, specs[victim]).status()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)

            started = time.perf_counter()
            second = session.turn(persona=persona, room="standup", text="Where were we?")
            fallback_ms = (time.perf_counter() - started) * 1000
            report = second.report
            assert (report["llm"]["backend"], report["route"]["placement"]) == (survivor, "fallback")
            assert report["turn"] == 2
            before = session.store.history("standup")[:2]  # turn 1, as committed on the member that died
            said = [m["content"] for m in second.prompt.messages if m["role"] == "user"]
            replied = [m["content"] for m in second.prompt.messages if m["role"] == "assistant"]
            assert before[0].content in said and replied == [before[1].content]  # history intact on the fallback
            assert report["llm"]["prompt_tokens_processed"] > 0.9 * report["llm"]["prompt_tokens"]  # warmed there
            third = session.turn(persona=persona, room="standup", text="Still with me?")
            assert third.report["llm"]["backend"] == survivor
            assert third.report["llm"]["prompt_tokens_cached"] > 0.8 * third.report["llm"]["prompt_tokens"]  # once

            again = subprocess.run([*cli, "up", "--recipe", str(recipe), "--backend", "duo"], capture_output=True,
                                   text=True, timeout=300)
            assert again.returncode == 0, again.stderr
            time.sleep(1.1)  # recheck_s
            back = session.turn(persona=persona, room="standup", text="Back home?")
            assert (back.report["llm"]["backend"], back.report["route"]["placement"]) == (victim, "home")
            assert back.report["turn"] == 4
            history = session.store.history("standup")
        assert [m.turn for m in history] == [1, 1, 2, 2, 3, 3, 4, 4]
        print(f"\nfallback turn {fallback_ms:.0f} ms (member {victim} killed -> {survivor}); "
              f"processed {report['llm']['prompt_tokens_processed']}/{report['llm']['prompt_tokens']} there, "
              f"then {third.report['llm']['prompt_tokens_processed']}; home again: "
              f"{back.report['llm']['prompt_tokens_processed']}/{back.report['llm']['prompt_tokens']}")
    finally:
        down = subprocess.run([*cli, "down", "--recipe", str(recipe), "--backend", "duo"], capture_output=True,
                              text=True, timeout=120)
        print(down.stdout)
