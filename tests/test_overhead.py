"""What keeps turnflow's own work per turn small: the turn plan, the store's incremental room reads, the digests
of texts that extend earlier ones, and the in-process tier of the composition cache. No model server."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path

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
