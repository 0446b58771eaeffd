"""The conversation store's guarantees, on SQLite and on a real PostgreSQL server: one transaction per turn, unique
turn numbers per room under concurrent writers in several processes, a failed turn leaves nothing; and the setting
that picks the store (`TURNFLOW_STORE`), with its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import copy_recipe_folder, without_adapters
from stubs import echo_model

from turnflow.store import ConversationStore, Participant, StoreError, open_store

ANN = Participant("ann", "person", "Ann")
MAYA = Participant("maya", "persona", "Maya")


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "rooms.sqlite3")
    server = request.getfixturevalue("postgres_url")
    return _fresh_database(server)


def _fresh_database(server: str) -> str:
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(location: str) -> Iterator[ConversationStore]:
    opened = ConversationStore(location)
    try:
        yield opened
    finally:
        opened.close()


def test_the_store_kind_follows_the_location(store: ConversationStore, location: str) -> None:
    assert store.kind == ("postgresql" if location.startswith("postgresql://") else "sqlite")


def test_a_turn_commits_both_messages_together(store: ConversationStore) -> None:
    first = store.commit_turn("standup", 1, ANN, "ann: morning", "morning", MAYA, "Morning Ann.")
    second = store.commit_turn("standup", 2, ANN, [{"type": "text", "text": "ann: board?"}], "board?", MAYA, "Ready.")
    assert (first, second) == (1, 2)
    history = store.history("standup")
    assert [(m.turn, m.speaker, m.text) for m in history] == [
        (1, "ann", "morning"), (1, "maya", "Morning Ann."), (2, "ann", "board?"), (2, "maya", "Ready.")]
    assert history[2].content == [{"type": "text", "text": "ann: board?"}]  # the bytes the model saw, kept
    room = store.room("standup")
    assert room.last_turn == 2
    assert [p.participant for p in room.participants] == ["ann", "maya"]
    assert room.history_tail_msg_ids == ",".join(str(m.id) for m in history[-2:])


def test_a_messages_preface_is_for_the_persona_that_answered_it(store: ConversationStore, location: str) -> None:
    from turnflow.nodes.sources import conversation_history

    helper = Participant("helper", "persona", "Helper")
    store.commit_turn("r", 1, ANN, "Current time: 09:00.\n\nann: morning", "morning", MAYA, "Morning Ann.",
                      preface="Current time: 09:00.")
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    heard = [{"type": "text", "text": "Notes: 42.\n\n"}, {"type": "text", "text": "ann: "}, audio]
    store.commit_turn("r", 2, ANN, heard, "", helper, "Noted.", preface="Notes: 42.")
    store.add_message("r", 3, ANN, "ann: bye", "bye")
    store.close()
    reopened = ConversationStore(location)  # another process: what the database holds
    try:
        messages = reopened.room("r").messages
        participants = list(reopened.room("r").participants)
    finally:
        reopened.close()
    assert [m.preface for m in messages] == ["Current time: 09:00.", "", "Notes: 42.", "", ""]

    def seen(persona: str, hears: bool = True) -> list[object]:
        return [m["content"] for m in conversation_history(messages, persona, hears, participants, 0)]

    assert seen("maya") == ["Current time: 09:00.\n\nann: morning", "Morning Ann.", heard[1:], "Helper: Noted.",
                            "ann: bye"]
    assert seen("helper") == ["ann: morning", "Maya: Morning Ann.", heard, "Noted.", "ann: bye"]
    assert seen("teacher", hears=False) == [
        "ann: morning", "Maya: Morning Ann.", [heard[1], {"type": "text", "text": "[voice message]"}],
        "Helper: Noted.", "ann: bye"]


def test_a_sqlite_store_made_before_prefaces_opens_with_its_history_as_it_was(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "rooms.sqlite3"
    with closing(ConversationStore(str(path))) as old:
        old.commit_turn("r", 1, ANN, "Current time: 09:00.\n\nann: hi", "hi", MAYA, "Hello.")
    with closing(sqlite3.connect(path)) as db:  # the table as it was before the column
        db.execute("ALTER TABLE messages DROP COLUMN preface")
        db.commit()
    with closing(ConversationStore(str(path))) as store:
        store.commit_turn("r", 2, ANN, "Current time: 09:01.\n\nann: again", "again", MAYA, "Yes.",
                          preface="Current time: 09:01.")
        history = store.history("r")
    assert [m.preface for m in history] == ["", "", "Current time: 09:01.", ""]
    assert history[0].as_seen_by("helper")["content"] == "Current time: 09:00.\n\nann: hi"  # as it always was
    assert history[2].as_seen_by("helper")["content"] == "ann: again"


def test_a_failed_turn_leaves_nothing(store: ConversationStore) -> None:
    store.commit_turn("standup", 1, ANN, "ann: hi", "hi", MAYA, "Hello.")
    before = store.room("standup")
    ben = Participant("ben", "person", "Ben")
    with pytest.raises(TypeError):  # the user's content cannot be stored: raised inside the turn's transaction
        store.commit_turn("standup", 2, ben, [{"type": "input_audio", "data": object()}], "x", MAYA, "reply")
    with pytest.raises(TypeError):  # the same in a room that did not exist yet
        store.commit_turn("new-room", 1, ben, [{"bad": object()}], "x", MAYA, "reply")
    after = store.room("standup")
    assert [m.id for m in after.messages] == [m.id for m in before.messages]
    assert after.participants == before.participants  # ben's join was rolled back with the turn
    assert after.participants_version == before.participants_version
    assert store.room("new-room").participants == [] and store.history("new-room") == []
    assert store.commit_turn("standup", 2, ANN, "ann: again", "again", MAYA, "Yes.") == 2  # number 2 still free


def test_compaction_and_interruption_notes_behave_the_same(store: ConversationStore) -> None:
    for n in range(1, 6):
        store.commit_turn("r", n, ANN, f"ann: {n}", str(n), MAYA, f"reply {n}")
    assert store.compact("r", keep=4) == 6
    room = store.room("r")
    assert [m.text for m in room.messages] == ["4", "reply 4", "5", "reply 5"]
    assert room.compaction_epoch == 1 and len(store.history("r")) == 10
    assert store.last_turn_of("r", "maya", "persona") == 5
    note_id = store.add_message("r", 5, MAYA, "[interrupted]", "[interrupted]")
    assert store.room("r").messages[-1].id == note_id


def test_slots_are_claimed_by_one_turn_at_a_time(location: str) -> None:
    """Four stores (four connections, as four workers would have) claim the two slots of one backend at once."""
    stores = [ConversationStore(location) for _ in range(4)]
    holding: dict[int, str] = {}
    overlaps: list[tuple[int, str, str]] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def worker(i: int) -> None:
        try:
            for n in range(6):
                claim = stores[i].claim_slot("pod@x", 2, f"p{i}", paging=True, wait_s=60)
                with guard:
                    if claim.slot in holding:
                        overlaps.append((claim.slot, holding[claim.slot], f"p{i}"))
                    holding[claim.slot] = f"p{i}"
                time.sleep(0.005)
                with guard:
                    holding.pop(claim.slot, None)
                claim.persona_id, claim.tokens = f"p{i}", 100 + n
                stores[i].release_slot(claim)
        except BaseException as exc:  # named by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    owners = stores[0].slot_owners("pod@x", 2)
    for opened in stores:
        opened.close()
    assert not errors, errors
    assert not overlaps, overlaps
    assert sorted(o.slot for o in owners) == [0, 1] and not any(o.busy for o in owners)


def test_two_processes_fifty_turns_each_in_one_room(location: str) -> None:
    script = textwrap.dedent("""
        import sys
        from turnflow.store import ConversationStore, Participant
        store = ConversationStore(sys.argv[1])
        me = sys.argv[2]
        for i in range(50):  # each turn expects turn 1: the store gives it the next free number
            store.commit_turn("shared", 1, Participant(me, "person", me), f"{me} {i}", f"{me} {i}",
                              Participant("maya", "persona", "Maya"), f"reply to {me} {i}")
        store.close()
    """)
    ConversationStore(location).close()  # the schema exists before both start
    workers = [subprocess.Popen([sys.executable, "-c", script, location, who]) for who in ("ann", "ben")]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    with closing(ConversationStore(location)) as store:
        history = store.history("shared")
    turns = [m.turn for m in history]
    assert len(history) == 200
    assert sorted(set(turns)) == list(range(1, 101))  # 100 turns, each number once, none missing
    assert all(turns.count(n) == 2 for n in range(1, 101))
    said = [m.text for m in history if m.speaker_kind == "person"]
    assert sorted(said) == sorted(f"{w} {i}" for w in ("ann", "ben") for i in range(50))  # every message once
    for n in range(1, 101):  # a turn's two messages are adjacent and belong together
        pair = [m for m in history if m.turn == n]
        assert pair[1].text == f"reply to {pair[0].text}"


def test_a_session_keeps_its_rooms_in_the_store_turnflow_store_names(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = _fresh_database(postgres_url)
    monkeypatch.setenv("TURNFLOW_STORE", database)
    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")
    from turnflow.session import Session

    with echo_model("Stored in the shared database.") as url:
        (recipe.parent / "backends.yaml").write_text(f"backends:\n  echo:\n    kind: openai\n    url: {url}\n")
        for worker in ("one", "two"):  # two workers, each with its own state folder, one room
            with Session(recipe, backend="echo", state_dir=tmp_path / worker) as session:
                assert session.store.kind == "postgresql"
                result = session.turn(persona="maya", room="standup", speaker="ann", text=f"hello from {worker}")
                assert result.report["turn"] == (1 if worker == "one" else 2)
    assert not (tmp_path / "one" / "rooms.sqlite3").exists()
    with closing(ConversationStore(database)) as store:
        history = store.history("standup")
    assert [m.text for m in history] == ["hello from one", "Stored in the shared database.",
                                         "hello from two", "Stored in the shared database."]


def test_a_bad_store_setting_says_what_is_wrong_and_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StoreError) as refused:
        open_store("postgresql://turnflow:secret@127.0.0.1:1/nowhere", default=tmp_path / "x.sqlite3")
    message = str(refused.value)
    print("\n" + message)
    assert message.startswith("TURNFLOW_STORE=postgresql://turnflow:***@127.0.0.1:1/nowhere: cannot connect")
    assert "secret" not in message and "postgresql://USER" in message
    with pytest.raises(StoreError, match="unknown store 'mysql'; use a SQLite file path or postgresql://"):
        open_store("mysql://db/rooms", default=tmp_path / "x.sqlite3")
    # the CLI prints it as one line, without a traceback
    recipe = copy_recipe_folder(tmp_path)
    env = {"TURNFLOW_STORE": "postgresql://turnflow@127.0.0.1:1/nowhere"}
    monkeypatch.setenv("TURNFLOW_STORE", env["TURNFLOW_STORE"])
    done = subprocess.run([sys.executable, "-m", "turnflow.cli", "run", str(recipe), "--persona", "maya",
                           "--text", "hi"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("turnflow: TURNFLOW_STORE=postgresql://turnflow@127.0.0.1:1/nowhere: cannot connect")
    assert "Traceback" not in done.stderr
