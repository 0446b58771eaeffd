"""What keeps turnflow's own work per turn small: the turn plan, the store's incremental room reads, the digests
of texts that extend earlier ones, and the in-process tier of the composition cache. No model server."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_recipe_folder
from test_prompt import NOW, seed_room

from turnflow.cache import CompositionCache
from turnflow.nodes.text import CanonicalMessages, TextDigests
from turnflow.session import Session
from turnflow.store import ConversationStore, Participant

ALICE = Participant("alice", "person", "Alice")
MAYA = Participant("maya", "persona", "Maya")


def test_the_turn_plan_gives_what_hamilton_gives(tmp_path: Path) -> None:
    with Session(copy_recipe_folder(tmp_path), state_dir=tmp_path / "state", composition_cache=False) as session:
        seed_room(session, "standup")
        dr = session.driver(connect=False)
        wanted = ["prompt", "composition_cache_stats", "tier_violations"]
        inputs = session._inputs("maya", "standup", "hello", "alice", NOW)
        by_hamilton = dr.execute(wanted, inputs=inputs, via_hamilton=True)
        inputs = session._inputs("maya", "standup", "hello", "alice", NOW)
        by_plan = dr.execute(wanted, inputs=inputs)
    assert by_plan == by_hamilton
    assert by_plan["prompt"].messages[-1]["content"].endswith("hello")


def test_the_turn_plan_times_each_node(tmp_path: Path) -> None:
    from turnflow.driver import collect_node_timings, stop_collecting

    with Session(copy_recipe_folder(tmp_path), state_dir=tmp_path / "state") as session:
        dr = session.driver(connect=False)
        timings, token = collect_node_timings()
        try:
            dr.execute(["prompt"], inputs=session._inputs("maya", "standup", "hello", "alice", NOW))
        finally:
            stop_collecting(token)
    assert {"prompt", "sections", "conversation_history", "persona_identity"} <= set(timings)
    assert all(ms >= 0 for ms in timings.values())


def test_text_digests_are_sha256_of_texts_that_extend_or_not() -> None:
    digests = TextDigests(capacity=4)
    rng = random.Random(7)
    text = "système " * 100
    for step in range(60):
        if step % 7 == 6:
            text = text[: rng.randrange(1, len(text))]  # not an extension: cut back
        elif step % 11 == 10:
            text = "另一个开头 " + text  # a new head
        else:
            text += rng.choice(["hello ", "naïve ", "\u2060", "\n", "x" * rng.randrange(1, 900)])
        assert digests.sha256(text) == (hashlib.sha256(text.encode()).hexdigest(), len(text.encode()))
    same = "abc" * 400
    assert digests.sha256(same) == digests.sha256(same) == (hashlib.sha256(same.encode()).hexdigest(), 1200)


def test_a_room_is_read_in_full_once_then_only_what_is_new(tmp_path: Path) -> None:
    path = tmp_path / "rooms.sqlite3"
    reader, writer = ConversationStore(path), ConversationStore(path)  # as two worker processes would
    try:
        writer.commit_turn("r", 1, ALICE, "alice: one", "one", MAYA, "reply one")
        first = reader.room("r")
        assert [m.text for m in first.messages] == ["one", "reply one"]
        writer.commit_turn("r", 2, ALICE, "alice: two", "two", MAYA, "reply two")
        writer.add_message("r", 2, MAYA, "[interrupted]", "[interrupted]")
        second = reader.room("r")
        assert [m.text for m in second.messages] == ["one", "reply one", "two", "reply two", "[interrupted]"]
        assert second.messages[0] is first.messages[0]  # decoded once, kept
        assert second.last_turn == 2
        assert second.history_tail_msg_ids == ",".join(str(m.id) for m in second.messages[-2:])

        writer.join("r", Participant("bob", "person", "Bob"))
        assert [p.participant for p in reader.room("r").participants] == ["alice", "maya", "bob"]

        writer.compact("r", keep=2)
        compacted = reader.room("r")
        assert [m.text for m in compacted.messages] == ["reply two", "[interrupted]"]
        assert compacted.last_turn == 2 and compacted.compaction_epoch == 1

        with sqlite3.connect(path) as db:  # anything but an append: the room is read again in full
            db.execute("DELETE FROM messages WHERE text = 'reply two'")
        assert [m.text for m in reader.room("r").messages] == ["[interrupted]"]
        writer.compact("r", keep=0)
        emptied = reader.room("r")
        assert emptied.messages == [] and emptied.last_turn == 2
    finally:
        reader.close()
        writer.close()


def test_a_room_no_one_else_wrote_to_is_not_read_again(tmp_path: Path) -> None:
    """After its own commit, a store knows the room without reading it (SQLite's data version says no other
    connection committed); a commit, join or compaction by anyone else is read as before."""
    path = tmp_path / "rooms.sqlite3"
    store, other = ConversationStore(path), ConversationStore(path)
    statements: list[str] = []
    store._engine._sqlite.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    try:
        store.commit_turn("r", 1, ALICE, [{"type": "text", "text": "alice: one"}], "one", MAYA, "reply one")
        first = store.room("r")  # never read before: read
        assert any(s.startswith("SELECT") for s in statements)
        statements.clear()
        turn = store.commit_turn("r", 2, ALICE, "alice: two", "two", MAYA, "reply two",
                                 present=["alice", "maya"])
        second = store.room("r")
        assert turn == 2
        assert not [s for s in statements if s.startswith("SELECT")], statements  # not even the room's last turn
        fresh = ConversationStore(path)
        try:
            assert second == fresh.room("r")  # what a reader of the file sees, decoded contents included
        finally:
            fresh.close()
        assert second.messages[:2] == first.messages and second.messages[0] is first.messages[0]
        assert [m.text for m in second.messages] == ["one", "reply one", "two", "reply two"]

        other.commit_turn("r", 3, ALICE, "alice: three", "three", MAYA, "reply three")  # another process
        statements.clear()
        assert [m.text for m in store.room("r").messages][-2:] == ["three", "reply three"]
        assert any(s.startswith("SELECT") for s in statements)
        assert store.commit_turn("r", 3, ALICE, "alice: again", "again", MAYA, "reply") == 4  # its turn 3 is taken

        other.join("r", Participant("bob", "person", "Bob"))
        assert [p.participant for p in store.room("r").participants] == ["alice", "maya", "bob"]
        store.join("r", Participant("cy", "person", "Cy"))  # its own join: read again too
        assert [p.participant for p in store.room("r").participants] == ["alice", "maya", "bob", "cy"]
        other.compact("r", keep=2)
        assert [m.text for m in store.room("r").messages] == ["again", "reply"]
        assert store.room("r").compaction_epoch == 1
    finally:
        store.close()
        other.close()


def test_the_history_is_canonical_once_per_message(tmp_path: Path) -> None:
    from turnflow.nodes.prompt import canonical_text
    from turnflow.nodes.sources import conversation_history

    store = ConversationStore(tmp_path / "rooms.sqlite3")
    try:
        for turn in range(1, 6):
            store.commit_turn("r", turn, ALICE, [{"type": "text", "text": f"alice: q{turn}"}], f"q{turn}", MAYA,
                              f"a{turn}")
        room = store.room("r")
        seen = conversation_history(room.messages, "maya", True, room.participants, room.history_start)
        plain = [m.as_seen_by("maya") for m in room.messages]
    finally:
        store.close()
    assert isinstance(seen, CanonicalMessages)
    assert list(seen) == plain
    assert canonical_text(seen) == canonical_text(plain)


def test_entries_of_keys_that_change_every_message_stay_in_the_process(tmp_path: Path) -> None:
    cache = CompositionCache(tmp_path / "cache")
    cache.set("entry:a", ["kept"], 60)
    cache.set("entry:b", ["history"], 60, shared=False)
    assert cache.get("entry:a") == (True, ["kept"])
    assert cache.get("entry:b", shared=False) == (True, ["history"])
    cache.close()
    other = CompositionCache(tmp_path / "cache")  # another process
    try:
        assert other.get("entry:a") == (True, ["kept"])
        assert other.get("entry:b", shared=False) == (False, None)
    finally:
        other.close()


def test_adapter_use_is_marked_without_rewriting_the_state_file(tmp_path: Path, monkeypatch: Any) -> None:
    """A turn notes its adapters' use in their markers' mtimes and its slot's adapter set in the slot's file; the
    state file is left alone. The least recently used adapter is the one a page-in evicts first."""
    import os
    import time

    from turnflow.recipe import BackendSpec
    from turnflow.server import EmbeddedServer, ServerState

    monkeypatch.setenv("TURNFLOW_HOME", str(tmp_path))
    server = EmbeddedServer("markers", BackendSpec(kind="embedded", model="generated:tiny"))
    state = ServerState("markers", os.getpid(), 1, "http://127.0.0.1:1", "d", time.time(), "log",
                        slot_sets={"0": [["a", 1.0]]}, adapter_used={"old": 5.0})
    server._write_state(state)
    before = server.state_file.stat().st_ino
    server._remember_use(["a"], 0, [("a", 1.0)])
    os.utime(server.used_dir / "a", (100.0, 100.0))  # `a` was used long ago
    server._remember_use(["b"], None, [])
    assert server.state_file.stat().st_ino == before  # nothing rewritten: the same set on slot 0, no slot for `b`
    used = server.adapter_last_used(["a", "b", "old", "never"], state)
    assert used["a"] == 100.0 and used["b"] > 100.0
    assert used["old"] == 5.0 and used["never"] == 0.0  # a state file from before the markers still counts
    assert min(used, key=used.__getitem__) == "never"
    slot_file = server.slot_sets_dir / "0"
    written = slot_file.stat()
    server._remember_use(["a"], 0, [("b", 1.0)])  # the slot's set changed: its file is rewritten in place
    assert server.state_file.stat().st_ino == before
    assert slot_file.stat().st_ino == written.st_ino and slot_file.stat().st_mtime_ns > written.st_mtime_ns
    assert server._slot_sets(server._read_state())["0"] == [["b", 1.0]]
    assert server.adapter_last_used(["a"])["a"] == 100.0  # marked once a second at most: not within the same one
    server._marked = {key: at - 1.0 for key, at in server._marked.items()}  # a second later
    server._remember_use(["a"], 0, [("b", 1.0)])
    again = server.adapter_last_used(["a", "b"])
    assert again["a"] >= again["b"] > 100.0  # `a` is the most recently used again


def test_a_slots_adapter_set_written_by_another_process_is_seen_however_soon(tmp_path: Path, monkeypatch: Any) -> None:
    """Two processes take turns on one slot with different adapter sets, faster than the clock ticks: each sees the
    other's write by the file's stamp (every write moves its mtime past the last one), so the file always holds the
    set of the slot's last turn; a torn file reads as no set; an older state file's sets still count."""
    import os
    import time

    from turnflow.recipe import BackendSpec
    from turnflow.server import EmbeddedServer, ServerState

    monkeypatch.setenv("TURNFLOW_HOME", str(tmp_path))
    spec = BackendSpec(kind="embedded", model="generated:tiny")
    one, two = EmbeddedServer("sets", spec), EmbeddedServer("sets", spec)  # two processes' views of one server
    state = ServerState("sets", os.getpid(), 1, "http://127.0.0.1:1", "d", time.time(), "log",
                        slot_sets={"1": [["old", 0.5]]})
    for _ in range(20):
        one._remember_use([], 0, [("a", 1.0)])
        assert one._slot_sets(None)["0"] == [["a", 1.0]]
        two._remember_use([], 0, [("b", 0.5)])
        assert one._slot_sets(None)["0"] == [["b", 0.5]]
    stamps = set()
    for pairs in ([("a", 1.0)], [("b", 0.5)]) * 3:  # back to back: every write leaves a stamp of its own
        one._remember_use([], 0, pairs)
        stamps.add(os.stat(one.slot_sets_dir / "0").st_mtime_ns)
    assert len(stamps) == 6
    (one.slot_sets_dir / "2").write_bytes(b'[["a", 1.')  # torn by a crash
    assert one._slot_sets(state) == {"0": [["b", 0.5]], "1": [["old", 0.5]]}


def test_another_process_event_is_seen_and_quiet_turns_read_no_epochs(tmp_path: Path) -> None:
    """A turn reads the epochs from the cache only when an event was published since it last did (by this or
    another process: the stamp file is replaced on every event)."""
    from turnflow import Event

    here, there = CompositionCache(tmp_path / "cache"), CompositionCache(tmp_path / "cache")
    reads: list[str] = []
    original = here._read

    def counted(key: str, default: Any = None) -> Any:
        reads.append(key)
        return original(key, default)

    here._read = counted  # type: ignore[method-assign]

    def key() -> str:
        here.begin_turn()
        return here.key("voice-chat", "digest", "persona_identity", {"persona_id": "maya"}, {"persona_id": "maya"})

    first = key()
    assert key() == first and key() == first
    quiet = len(reads)
    there.publish(Event.persona_changed("maya"))  # another process
    assert key() != first
    assert reads[quiet:] == ["epochs"]  # read once, after the event
    assert key() == key()
    assert reads[quiet:] == ["epochs"]
    there.publish(Event.persona_changed("alex"))  # an event about someone else: read, and the key stands
    second = key()
    assert second == key() and reads[quiet:] == ["epochs", "epochs"]
    here.close()
    there.close()


def test_the_slot_claim_counts_the_turn_and_the_commit_lets_it_go(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "store.db")
    first = store.claim_slot("local", 2, "maya", paging=True, reserve=900)
    first.persona_id, first.tokens = "maya", 700
    store.release_slot(first)
    claim = store.claim_slot("local", 2, "alex", paging=True, reserve=1200)
    assert claim.slot != first.slot and claim.others_tokens == 700
    owners = {o.slot: o for o in store.slot_owners("local", 2)}
    assert owners[claim.slot].busy and owners[claim.slot].tokens == 1200  # counted while the turn is in flight
    claim.persona_id, claim.tokens = "alex", 1100
    store.commit_turn("room", 1, ALICE, "hi", "hi", Participant("alex", "persona", "Alex"), "hello", release=claim)
    owners = {o.slot: o for o in store.slot_owners("local", 2)}
    assert not owners[claim.slot].busy and owners[claim.slot].persona_id == "alex"
    assert owners[claim.slot].tokens == 1100 and claim.released
    assert [m.text for m in store.room("room").messages] == ["hi", "hello"]
    again = store.claim_slot("local", 2, "alex", paging=True)
    store.release_slot(claim)  # already let go with the commit: the new claim on the slot keeps its hold
    assert again.slot == claim.slot and {o.slot: o for o in store.slot_owners("local", 2)}[again.slot].busy
    store.close()


def test_the_turn_plan_leaves_an_optional_input_to_its_default_and_names_a_missing_one() -> None:
    from hamilton import ad_hoc_utils, driver

    from turnflow.driver import TurnDriver, collect_node_timings, stop_collecting

    def scaled(x: int, factor: int = 2) -> int:
        return x * factor

    def total(scaled: int, x: int, mode: str) -> str:
        return f"{mode}:{scaled + x}"

    module = ad_hoc_utils.create_temporary_module(scaled, total, module_name="plan_inputs")
    dr = TurnDriver(driver.Builder().with_modules(module).with_config({"mode": "cfg"}).build())
    for inputs in ({"x": 3}, {"x": 3, "factor": 10}):
        timings, token = collect_node_timings()
        try:
            by_plan = dr.execute(["total"], inputs=dict(inputs))
        finally:
            stop_collecting(token)
        assert by_plan == dr.execute(["total"], inputs=dict(inputs), via_hamilton=True)
        assert set(timings) == {"scaled", "total"}
    assert dr.execute(["total"], inputs={"x": 3})["total"] == "cfg:9"
    assert dr.execute(["total"], inputs={"x": 3, "factor": 10})["total"] == "cfg:33"
    with pytest.raises(ValueError, match="needs the input 'x'"):
        dr.execute(["total"], inputs={"factor": 10})
