"""The conversation store: one history per room, shared by the personas in it, in SQLite or PostgreSQL.

A turn is atomic: the speaker's message and the persona's reply are committed in one transaction, so
a failed turn leaves the room exactly as it was. Messages keep the bytes the model saw, so a persona's
history only ever grows by appending, and the model server's KV cache of it stays valid.

SQLite (one file) is the embedded default; PostgreSQL (`TURNFLOW_STORE=postgresql://...`) is for several
workers sharing rooms. The store's queries are the same for both; an engine per database opens the connection,
creates the schema and makes transactions: SQLite's take the database's write lock, PostgreSQL's take an
advisory lock on what they change (one room, or one backend's slots), so writers of different rooms do not wait
for each other and writers of one room commit one at a time, whichever process they run in.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import sqlite3
import threading
import time
import typing
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from turnflow.nodes.text import canonical_json, without_preface

Content = str | list[dict[str, Any]]

STORE_ENV = "TURNFLOW_STORE"
"""Where the conversation store is: a SQLite file path, or a `postgresql://` URL shared by several workers."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    room_id TEXT PRIMARY KEY,
    created_at {real} NOT NULL,
    participants_version INTEGER NOT NULL DEFAULT 0,
    history_floor_id INTEGER NOT NULL DEFAULT 0,
    compaction_epoch INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS participants (
    room_id TEXT NOT NULL REFERENCES rooms(room_id),
    participant TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('person', 'persona')),
    display_name TEXT NOT NULL,
    joined_at {real} NOT NULL,
    seq INTEGER NOT NULL,
    joined_after INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, participant)
);
CREATE TABLE IF NOT EXISTS messages (
    id {id},
    room_id TEXT NOT NULL REFERENCES rooms(room_id),
    turn INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    speaker_kind TEXT NOT NULL CHECK (speaker_kind IN ('person', 'persona')),
    display_name TEXT NOT NULL,
    content TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at {real} NOT NULL,
    preface TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room_id, id);
CREATE INDEX IF NOT EXISTS messages_by_turn ON messages (room_id, turn);
CREATE TABLE IF NOT EXISTS slot_owners (
    backend TEXT NOT NULL,
    total_slots INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    persona_id TEXT,
    adapters TEXT NOT NULL DEFAULT '',
    prefix TEXT NOT NULL DEFAULT '',
    tokens INTEGER NOT NULL DEFAULT 0,
    last_used {real} NOT NULL DEFAULT 0,
    busy_token TEXT,
    busy_until {real} NOT NULL DEFAULT 0,
    PRIMARY KEY (backend, total_slots, slot)
);
CREATE TABLE IF NOT EXISTS transcripts (
    message_id BIGINT PRIMARY KEY,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slot_assignments (
    backend TEXT NOT NULL,
    total_slots INTEGER NOT NULL,
    persona_id TEXT NOT NULL,
    slot INTEGER NOT NULL,
    PRIMARY KEY (backend, total_slots, persona_id)
);
"""


_TOKENS: tuple[str, itertools.count[int]] = ("", itertools.count())


def _draw_tokens() -> None:
    """A new random part for this process's hold tokens (at import, and in a forked child: it shares the parent's)."""
    global _TOKENS
    _TOKENS = (f"{secrets.token_hex(8)}{os.getpid():x}", itertools.count())


_draw_tokens()
os.register_at_fork(after_in_child=_draw_tokens)


def _hold_token() -> str:
    """A token no other hold of any process has: a random 64-bit value drawn once per process, the pid, and a count
    (a slot is claimed every turn: no random bytes read for each)."""
    prefix, counter = _TOKENS
    return f"{prefix}-{next(counter):x}"


class StoreError(RuntimeError):
    """The conversation store cannot be opened; the message names the setting and how to fix it."""


class _Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Any: ...


class _Db(Protocol):
    """A connection running the store's queries (`?` parameters)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> _Cursor: ...


class _Engine:
    """A database the store runs on: the connection, the schema, and transactions."""

    db: _Db
    location: str

    def transaction(self, *scopes: str) -> Any:
        """A write transaction over `scopes` (`room:ID`, `slots:BACKEND`): writers of one scope commit one at a
        time (a transaction over several takes them in the order given: rooms before slots)."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        """A read transaction: every read inside sees the same committed state."""
        raise NotImplementedError

    def data_version(self) -> int | None:
        """A number that changes whenever another connection commits (this one's own commits leave it as is);
        None when the database cannot tell (every read then goes to the database)."""
        return None

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError


class _SqliteEngine(_Engine):
    """One SQLite file (WAL): every write transaction takes the database's write lock."""

    def __init__(self, path: Path):
        self.location = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        # ids only grow (no message is ever deleted), so the rowid serves without AUTOINCREMENT's extra table write
        db.executescript(_SCHEMA.format(id="INTEGER PRIMARY KEY", real="REAL"))
        columns = {row[1] for row in db.execute("PRAGMA table_info(participants)")}
        if "joined_after" not in columns:  # a store made before joins became history events
            db.execute("ALTER TABLE participants ADD COLUMN joined_after INTEGER NOT NULL DEFAULT 0")
        if "preface" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}:  # made before prefaces
            db.execute("ALTER TABLE messages ADD COLUMN preface TEXT NOT NULL DEFAULT ''")
        self._sqlite = db
        self.db = typing.cast(_Db, db)

    @contextmanager
    def transaction(self, *scopes: str) -> Iterator[_Db]:
        self._sqlite.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self._sqlite.execute("ROLLBACK")
            raise
        self._sqlite.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[_Db]:
        self._sqlite.execute("BEGIN DEFERRED")
        try:
            yield self.db
        finally:
            self._sqlite.execute("COMMIT")

    def data_version(self) -> int | None:
        return int(self._sqlite.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self._sqlite.close()


class _PostgresDb:
    """A psycopg connection taking the store's `?` parameters."""

    def __init__(self, connection: Any):
        self.connection = connection

    def execute(self, sql: str, parameters: Any = ()) -> _Cursor:
        return typing.cast(_Cursor, self.connection.execute(sql.replace("?", "%s"), parameters))


class _PostgresEngine(_Engine):
    """A PostgreSQL database (psycopg 3): write transactions take an advisory lock on their scope, so turn numbers
    and slot claims are decided by one writer at a time across every process sharing the database."""

    def __init__(self, url: str):
        self.location = _redacted(url)
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                f"{STORE_ENV}={self.location}: PostgreSQL needs psycopg 3; install it with "
                f"`pip install 'turnflow[postgres]'`"
            ) from None
        try:
            connection = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(
                f"{STORE_ENV}={self.location}: cannot connect to PostgreSQL ({reason}); expected "
                f"postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or ?host=/socket/dir) of a running server"
            ) from None
        self._connection = connection
        self.db = _PostgresDb(connection)
        with self.transaction("schema") as db:  # two workers starting at once create the tables once
            for statement in _SCHEMA.format(id="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                                            real="DOUBLE PRECISION").split(";"):
                if statement.strip():
                    db.execute(statement)
            if not db.execute(  # a database made before prefaces (ALTER locks the table: only when needed)
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'messages' AND column_name = 'preface'"
            ).fetchone():
                db.execute("ALTER TABLE messages ADD COLUMN preface TEXT NOT NULL DEFAULT ''")

    @contextmanager
    def transaction(self, *scopes: str) -> Iterator[_Db]:
        with self._connection.transaction():
            for scope in scopes:
                self.db.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (scope,))
            yield self.db

    @contextmanager
    def snapshot(self) -> Iterator[_Db]:
        with self._connection.transaction():
            self.db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield self.db

    def close(self) -> None:
        self._connection.close()


def _redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def is_postgres_url(location: str | Path) -> bool:
    """Whether a store location is a PostgreSQL URL rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path | None = None, *, default: str | Path) -> ConversationStore:
    """The conversation store at `location`, else at `$TURNFLOW_STORE`, else the SQLite file `default`."""
    chosen = location or os.environ.get(STORE_ENV) or default
    if isinstance(chosen, str) and "://" in chosen and not is_postgres_url(chosen):
        scheme = chosen.split("://", 1)[0]
        raise StoreError(
            f"{STORE_ENV}={_redacted(chosen)}: unknown store {scheme!r}; use a SQLite file path or "
            f"postgresql://USER@HOST:PORT/DATABASE"
        )
    return ConversationStore(chosen)


@dataclass(frozen=True)
class SlotOwner:
    """Whose KV a slot holds: the persona, its adapter-set digest and prefix digest, and how many tokens."""

    slot: int
    persona_id: str | None
    adapters: str
    prefix: str
    tokens: int
    last_used: float
    busy: bool


@dataclass
class SlotClaim:
    """A turn's hold on one slot of a backend: which slot, whose KV it held, and what it holds after the turn."""

    backend: str
    total_slots: int
    slot: int
    token: str
    previous: SlotOwner | None
    """Who held the slot's KV before this turn (None: nobody, or this persona itself)."""
    own: bool
    """The slot held this persona's KV already."""
    others: list[SlotOwner] = field(default_factory=list)
    """The backend's other slots as they were when the claim was made."""
    persona_id: str | None = None
    adapters: str = ""
    prefix: str = ""
    tokens: int = 0
    """Set by the turn: the persona's KV the slot holds once the turn is done (left empty when it failed)."""
    released: bool = False
    """The slot was let go (by `release_slot`, or by `commit_turn` with the turn's messages)."""

    @property
    def others_tokens(self) -> int:
        """Tokens of KV the backend's other slots held when the claim was made (turns in flight included)."""
        return sum(o.tokens for o in self.others)


@dataclass(frozen=True)
class Participant:
    """Someone in a room: a person or a persona."""

    participant: str
    kind: Literal["person", "persona"]
    display_name: str
    joined_after: int = field(default=0, compare=False)
    """The id of the room's newest message when they joined (0: before any message)."""


@dataclass(frozen=True)
class StoredMessage:
    """One message of a room's history, with the exact content the model saw when it was new."""

    id: int
    turn: int
    speaker: str
    speaker_kind: Literal["person", "persona"]
    display_name: str
    content: Content
    text: str
    preface: str = ""
    """The volatile text sections (the time, say) the persona that answered this person's message saw in front of
    it; they are part of `content`. Everyone else sees the message without them."""
    _lines: dict[tuple[str, bool], tuple[dict[str, Any], str]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def unheard_audio(self) -> dict[str, Any] | None:
        """The `input_audio` of a person's message heard by a model itself, with nothing written down of it (no
        text, no transcript): what a model that does not hear needs transcribed. None for any other message."""
        if self.speaker_kind != "person" or self.text or not isinstance(self.content, list):
            return None
        return next((part["input_audio"] for part in self.content if part.get("type") == "input_audio"), None)

    def seen_line(
        self, persona_id: str, *, hears: bool = True, transcript: Callable[[StoredMessage], str] | None = None,
        answered: bool = False,
    ) -> tuple[dict[str, Any], str]:
        """`as_seen_by` and that message's canonical JSON line, made once per persona (a message never changes).

        `transcript` gives the words of audio no model wrote down (see `unheard_audio`), for a model that does
        not hear; it is asked once, when the persona first sees the message. `answered`: whether `persona_id`
        answered this message (the reply of the same turn is its)."""
        found = self._lines.get((persona_id, hears))
        if found is None:
            words = transcript(self) if transcript is not None and not hears and self.unheard_audio else None
            message = self.as_seen_by(persona_id, hears=hears, transcript=words, answered=answered)
            found = self._lines[(persona_id, hears)] = (message, canonical_json(message) + "\n")
        return dict(found[0]), found[1]

    def as_seen_by(
        self, persona_id: str, *, hears: bool = True, transcript: str | None = None, answered: bool = False,
    ) -> dict[str, Any]:
        """This message as a chat message for `persona_id`: its own words as assistant, others' as user.

        A person's message keeps its `preface` (that turn's volatile sections) for the persona that `answered` it,
        exactly as it was sent, so that persona's history only appends; every other persona sees what was said.
        For a model that does not hear, past audio parts become text: the words said (the STT bridge's transcript,
        or `transcript`: of audio another persona's model heard itself), else `[voice message]`.
        """
        if self.speaker_kind == "persona" and self.speaker == persona_id:
            return {"role": "assistant", "content": self.content}
        if self.speaker_kind == "persona":
            return {"role": "user", "content": f"{self.display_name}: {self.text}"}
        content = self.content if answered else without_preface(self.content, self.preface)
        if hears or not isinstance(content, list):
            return {"role": "user", "content": content}
        words = self.text or transcript
        spoken = f"[voice message: {words}]" if words else "[voice message]"
        parts = [
            {"type": "text", "text": spoken} if part.get("type") == "input_audio" else part for part in content
        ]
        return {"role": "user", "content": parts}


@dataclass(frozen=True)
class UserContent:
    """What the speaker said this turn: text, and media parts when the model hears or sees directly."""

    text: str
    parts: tuple[dict[str, Any], ...] = ()
    transcript: str | None = None

    def as_message(self, speaker: str) -> dict[str, Any]:
        """The user message for this turn; the speaker is named unless it is the anonymous `user`."""
        label = "" if speaker == "user" else f"{speaker}: "
        if not self.parts:
            return {"role": "user", "content": label + self.text}
        text_parts = [{"type": "text", "text": label + self.text}] if (label or self.text) else []
        return {"role": "user", "content": text_parts + list(self.parts)}


@dataclass
class _KnownRoom:
    """What the store last read of a room: its visible messages (from `floor` on) and its participants."""

    floor: int
    messages: list[StoredMessage] = field(default_factory=list)
    participants: tuple[Participant, ...] | None = None
    participants_version: int = -1
    epoch: int = 0
    last_turn: int = 0
    """The highest turn number among the messages."""
    current_at: int | None = None
    """The database's data version at which this is all of the room (this store's own commits applied to it);
    None when the room must be read again."""

    @property
    def last_id(self) -> int:
        """The id of the newest message read (0: none)."""
        return self.messages[-1].id if self.messages else 0

    def state(self, room_id: str, tail: int) -> RoomState:
        """The room as a turn sees it (copies: what this keeps goes on growing)."""
        messages = list(self.messages)
        return RoomState(
            room_id=room_id,
            messages=messages,
            participants=list(self.participants or ()),
            participants_version=self.participants_version,
            last_turn=self.last_turn,
            compaction_epoch=self.epoch,
            history_tail_msg_ids=",".join(str(m.id) for m in messages[-tail:]) or "empty",
            history_start=messages[0].id if messages else 0,
        )


@dataclass(frozen=True)
class RoomState:
    """A room as a turn sees it when it starts."""

    room_id: str
    messages: list[StoredMessage]
    participants: list[Participant]
    participants_version: int
    last_turn: int
    compaction_epoch: int
    history_tail_msg_ids: str = field(default="")
    history_start: int = 0
    """The id of the first visible message (0 when there is none): who joined before it is in the participants
    section, who joined after it is a `[... joined the room]` event in the history."""


class ConversationStore:
    """Rooms, their participants and histories, and persona slot assignments: in one SQLite file (a path), or in
    a PostgreSQL database (a `postgresql://` URL) that several workers share."""

    def __init__(self, location: str | Path):
        engine: _Engine = _PostgresEngine(str(location)) if is_postgres_url(location) else _SqliteEngine(Path(location))
        self._engine = engine
        self.location = engine.location
        """The SQLite file, or the PostgreSQL URL without its password."""
        self._db = engine.db
        self._lock = threading.Lock()  # one connection per store: one transaction at a time on it
        self._rooms: dict[str, _KnownRoom] = {}
        """Each room's visible history as last read (messages are immutable once committed)."""
        self._transcripts: dict[int, str] = {}
        """Transcripts of messages' audio as last read (kept ones never change)."""

    @property
    def kind(self) -> str:
        """`sqlite` or `postgresql`."""
        return "postgresql" if isinstance(self._engine, _PostgresEngine) else "sqlite"

    def close(self) -> None:
        """Close the database."""
        self._engine.close()

    @contextmanager
    def _transaction(self, *scopes: str) -> Iterator[_Db]:
        with self._lock, self._engine.transaction(*scopes) as db:
            yield db

    def _stale(self, room_id: str) -> None:
        """This store is about to write to the room: what it keeps of it is read again before it is used."""
        known = self._rooms.get(room_id)
        if known is not None:
            known.current_at = None

    def _ensure_room(self, db: _Db, room_id: str) -> None:
        db.execute("INSERT INTO rooms (room_id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (room_id, time.time()))

    @contextmanager
    def _snapshot(self) -> Iterator[_Db]:
        """A read transaction: every read inside sees the same committed state (no write lock is taken)."""
        with self._lock, self._engine.snapshot() as db:
            yield db

    def room(self, room_id: str, *, tail: int = 2) -> RoomState:
        """The room's visible history (since the last compaction), participants and counters, read at once.

        Committed messages never change, so the store keeps the room's decoded history in memory and reads only
        the messages added since (by this or any other process); a count check catches anything else and reads
        the room again in full. When no other connection has committed since the room was last read (SQLite's
        data version), and this store's own commits to it were applied to what it keeps, nothing is read.
        """
        with self._lock:
            known = self._rooms.get(room_id)
            if known is not None and known.current_at is not None and known.current_at == self._engine.data_version():
                return known.state(room_id, tail)
            with self._engine.snapshot() as db:
                known = self._read_room(db, room_id)
                known.current_at = self._engine.data_version()  # inside the read: the version of what was read
            return known.state(room_id, tail)

    def _read_room(self, db: _Db, room_id: str) -> _KnownRoom:
        """The room as the database holds it, read incrementally onto what this store kept of it."""
        row = db.execute(  # the room's counters and how many messages it shows, in one statement
            "SELECT participants_version, history_floor_id, compaction_epoch, (SELECT COUNT(*) FROM messages "
            "WHERE messages.room_id = rooms.room_id AND messages.id >= rooms.history_floor_id) "
            "FROM rooms WHERE room_id = ?",
            (room_id,),
        ).fetchone()
        version, floor, epoch, count = row if row else (0, 0, 0, 0)
        known = self._rooms.get(room_id)
        if known is None or known.floor != floor:
            known = _KnownRoom(floor)
        known.current_at = None  # until this read is done
        messages = _messages_from(db, room_id, max(floor, known.last_id + 1))
        if len(known.messages) + len(messages) != count:  # not an append: read the whole room again
            known = _KnownRoom(floor)
            messages = _messages_from(db, room_id, floor)
        if known.participants_version != version or known.participants is None:
            people = db.execute(
                "SELECT participant, kind, display_name, joined_after FROM participants WHERE room_id = ? "
                "ORDER BY seq",
                (room_id,),
            ).fetchall()
            known.participants = tuple(Participant(p, k, n, after) for p, k, n, after in people)
            known.participants_version = version
        known.messages.extend(messages)  # under the store's lock: another thread may read the same room
        known.epoch = epoch
        # a turn's number is above every earlier one, so with anything visible the visible messages hold the
        # room's last turn; with nothing visible, ask the table
        known.last_turn = max([known.last_turn, *(m.turn for m in messages)]) if known.messages else db.execute(
            "SELECT COALESCE(MAX(turn), 0) FROM messages WHERE room_id = ?", (room_id,)
        ).fetchone()[0]
        self._rooms[room_id] = known
        return known

    def transcript_of(self, message_id: int) -> str | None:
        """The transcript kept for a message's audio (see `keep_transcript`), or None when there is none."""
        with self._lock:
            known = self._transcripts.get(message_id)
            if known is None:
                row = self._db.execute("SELECT text FROM transcripts WHERE message_id = ?", (message_id,)).fetchone()
                if row is not None:
                    known = self._transcripts[message_id] = str(row[0])
            return known

    def keep_transcript(self, message_id: int, text: str) -> str:
        """Keep the transcript of a message's audio, for every persona and process that needs it later; returns the
        one kept (another process's, when it kept one first). The message itself never changes."""
        with self._transaction("transcripts") as db:
            db.execute("INSERT INTO transcripts (message_id, text) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (message_id, text))
            kept = str(db.execute("SELECT text FROM transcripts WHERE message_id = ?", (message_id,)).fetchone()[0])
            self._transcripts[message_id] = kept
            return kept

    def history(self, room_id: str) -> list[StoredMessage]:
        """Every message of the room, compacted or not, oldest first."""
        with self._snapshot() as db:
            return _messages_from(db, room_id, 0)

    def _join(self, db: _Db, room_id: str, who: Participant) -> bool:
        if db.execute(  # the common case, someone already in the room: one key lookup
            "SELECT 1 FROM participants WHERE room_id = ? AND participant = ?", (room_id, who.participant)
        ).fetchone():
            return False
        self._ensure_room(db, room_id)
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM participants WHERE room_id = ?", (room_id,)).fetchone()
        newest = db.execute("SELECT COALESCE(MAX(id), 0) FROM messages WHERE room_id = ?", (room_id,)).fetchone()
        inserted = db.execute(
            "INSERT INTO participants "
            "(room_id, participant, kind, display_name, joined_at, seq, joined_after) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (room_id, who.participant, who.kind, who.display_name, time.time(), seq[0], newest[0]),
        ).rowcount
        if inserted:
            db.execute(
                "UPDATE rooms SET participants_version = participants_version + 1 WHERE room_id = ?", (room_id,)
            )
        return bool(inserted)

    def join(self, room_id: str, who: Participant) -> bool:
        """Add `who` to the room; True when they were not in it yet."""
        with self._transaction(f"room:{room_id}") as db:
            self._stale(room_id)
            return self._join(db, room_id, who)

    def last_turn_of(self, room_id: str, who: str, kind: Literal["person", "persona"]) -> int | None:
        """The turn of `who`'s newest visible message in the room, or None when there is none."""
        with self._snapshot() as db:
            row = db.execute(
                "SELECT turn FROM messages WHERE room_id = ? AND speaker = ? AND speaker_kind = ? AND id >= "
                "(SELECT COALESCE(MAX(history_floor_id), 0) FROM rooms WHERE room_id = ?) ORDER BY id DESC LIMIT 1",
                (room_id, who, kind, room_id),
            ).fetchone()
        return None if row is None else int(row[0])

    def add_message(self, room_id: str, turn: int, speaker: Participant, content: Content, text: str) -> int:
        """Append one message outside a turn (e.g. a person speaking to the room); returns its id."""
        with self._transaction(f"room:{room_id}") as db:
            self._stale(room_id)
            self._join(db, room_id, speaker)
            return self._insert(db, room_id, turn, (speaker, content, text, ""))[-1][0]

    def _insert(
        self, db: _Db, room_id: str, turn: int, *messages: tuple[Participant, Content, str, str]
    ) -> list[tuple[int, str]]:
        """Messages of one turn (who, content, text, preface), in this order, in one statement; their ids (in that
        order: ids only grow) and their content as stored."""
        now = time.time()
        values: list[Any] = []
        stored = [json.dumps(content) for _, content, _, _ in messages]
        for (who, _, text, preface), content in zip(messages, stored, strict=True):
            values += [room_id, turn, who.participant, who.kind, who.display_name, content, text, now, preface]
        rows = db.execute(
            "INSERT INTO messages (room_id, turn, speaker, speaker_kind, display_name, content, text, created_at, "
            "preface) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(messages)) + " RETURNING id",
            values,
        ).fetchall()
        return list(zip(sorted(int(row[0]) for row in rows), stored, strict=True))

    def commit_turn(
        self,
        room_id: str,
        turn: int,
        speaker: Participant,
        user_content: Content,
        user_text: str,
        persona: Participant,
        reply_text: str,
        *,
        release: SlotClaim | None = None,
        present: Collection[str] = (),
        preface: str = "",
    ) -> int:
        """Commit the speaker's message and the persona's reply together; returns the turn's number.

        The number is `turn` unless another turn in the room (another thread or process) committed it
        first: then it is the next free one (a room's commits are serialised, so numbers are unique per room).
        `release`: the turn's slot claim, let go in the same transaction (see `release_slot`). `present`: who the
        caller saw in the room already (no one leaves a room): their join is not checked again. `preface`: the
        turn's volatile text sections in front of what was said in `user_content` (see `StoredMessage.as_seen_by`).
        """
        scopes = (f"room:{room_id}", *([f"slots:{release.backend}"] if release is not None else []))
        with self._lock:
            with self._engine.transaction(*scopes) as db:
                turn, inserted, current, at = self._commit_turn(
                    db, room_id, turn, speaker, user_content, user_text, persona, reply_text, release, present, preface
                )
            if current is not None:  # committed: what this store keeps of the room is all of it again
                current.messages.extend(
                    StoredMessage(id, turn, who.participant, who.kind, who.display_name, _load_content(content), text,
                                  said_preface)
                    for (id, content), (who, text, said_preface) in zip(
                        inserted, ((speaker, user_text, preface), (persona, reply_text, "")), strict=True
                    )
                )
                current.last_turn, current.current_at = turn, at
        if release is not None:
            release.released = True
        return turn

    def _commit_turn(
        self, db: _Db, room_id: str, turn: int, speaker: Participant, user_content: Content, user_text: str,
        persona: Participant, reply_text: str, release: SlotClaim | None, present: Collection[str], preface: str,
    ) -> tuple[int, list[tuple[int, str]], _KnownRoom | None, int | None]:
        """`commit_turn`'s writes: the turn's number and messages (ids, stored content); what the store keeps of the
        room and its data version when that was all of the room before the commit and no one joined in it (the
        turn's messages are then added to it), else None."""
        # what this store keeps of the room is all of it when no one else committed since: then the room's last
        # turn is known, and the turn's messages are added to what it keeps
        known = self._rooms.get(room_id)
        at = known.current_at if known is not None else None
        current = known if at is not None and at == self._engine.data_version() else None
        self._stale(room_id)
        if release is not None:
            self._release(db, release)
        joined = False
        for who in (speaker, persona):
            if who.participant not in present:
                joined = self._join(db, room_id, who) or joined
        if current is not None:
            last = current.last_turn
        else:
            last = db.execute(
                "SELECT COALESCE(MAX(turn), 0) FROM messages WHERE room_id = ?", (room_id,)
            ).fetchone()[0]
        turn = max(turn, int(last) + 1)  # the room's writers commit one at a time: no one else takes it
        said, replied = (speaker, user_content, user_text, preface), (persona, reply_text, reply_text, "")
        inserted = self._insert(db, room_id, turn, said, replied)
        return turn, inserted, None if joined else current, at

    def compact(self, room_id: str, keep: int) -> int:
        """Hide all but the newest `keep` messages from prompts (one large block); returns how many were hidden."""
        with self._transaction(f"room:{room_id}") as db:
            self._stale(room_id)
            ids = [r[0] for r in db.execute(
                "SELECT id FROM messages WHERE room_id = ? AND id >= "
                "(SELECT history_floor_id FROM rooms WHERE room_id = ?) ORDER BY id",
                (room_id, room_id),
            )]
            if len(ids) <= keep:
                return 0
            floor = ids[len(ids) - keep] if keep else ids[-1] + 1
            db.execute(
                "UPDATE rooms SET history_floor_id = ?, compaction_epoch = compaction_epoch + 1, "
                "participants_version = participants_version + 1 WHERE room_id = ?",
                (floor, room_id),
            )
            return len(ids) - keep

    def claim_slot(
        self, backend: str, total_slots: int, persona_id: str, *, paging: bool, reserve: int = 0,
        wait_s: float = 900.0, lease_s: float = 900.0,
    ) -> SlotClaim:
        """Hold a slot for one turn of `persona_id`, counting `reserve` tokens of KV for it (the turn in flight).

        With `paging`, the slot that holds the persona's KV if there is one, else an empty slot, else the one
        used least recently (its KV is saved to disk by the turn before it is overwritten). Without, the
        persona's pinned slot (`slot_for`). A slot another turn holds is waited for; a hold expires after
        `lease_s` (a process that died mid-turn). The claim's `others` are the other slots as they are now.
        """
        deadline = time.monotonic() + wait_s
        pinned = None if paging else self.slot_for(backend, persona_id, total_slots)
        while True:
            with self._transaction(f"slots:{backend}") as db:
                now = time.time()
                owners = {o.slot: o for o in self._owners(db, backend, total_slots, now)}
                free = [s for s in range(total_slots) if not (owners.get(s) and owners[s].busy)]
                choice: int | None = None
                if pinned is not None:
                    choice = pinned if pinned in free else None
                elif free:
                    mine = [s for s in free if owners.get(s) and owners[s].persona_id == persona_id]
                    empty = [s for s in free if not owners.get(s) or owners[s].persona_id is None]
                    choice = (mine or empty or sorted(free, key=lambda s: owners[s].last_used))[0]
                if choice is not None:
                    token = _hold_token()
                    before = owners.get(choice)
                    db.execute(
                        "INSERT INTO slot_owners (backend, total_slots, slot, busy_token, busy_until, tokens) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (backend, total_slots, slot) DO UPDATE SET "
                        "busy_token = excluded.busy_token, busy_until = excluded.busy_until, tokens = CASE "
                        "WHEN slot_owners.tokens > excluded.tokens THEN slot_owners.tokens ELSE excluded.tokens END",
                        (backend, total_slots, choice, token, now + lease_s, reserve),
                    )
                    own = before is not None and before.persona_id == persona_id
                    previous = before if before is not None and before.persona_id and not own else None
                    others = [o for s, o in sorted(owners.items()) if s != choice]
                    claim = SlotClaim(backend, total_slots, choice, token, previous, own, others)
                    if own and before is not None:  # a turn that fails before the model call leaves the KV as is
                        claim.persona_id, claim.adapters = persona_id, before.adapters
                        claim.prefix, claim.tokens = before.prefix, before.tokens
                    return claim
            if time.monotonic() > deadline:
                raise TimeoutError(f"no free slot on {backend} after {wait_s:.0f} s (all {total_slots} busy)")
            time.sleep(0.02)

    def slot_owners(self, backend: str, total_slots: int, *, now: float | None = None) -> list[SlotOwner]:
        """Who holds each slot of a backend's server; `busy` is a lease still running at `now` (default: now;
        0 counts any lease not released, expired or not)."""
        with self._snapshot() as db:
            return self._owners(db, backend, total_slots, time.time() if now is None else now)

    def _owners(self, db: _Db, backend: str, total_slots: int, now: float) -> list[SlotOwner]:
        rows = db.execute(
            "SELECT slot, persona_id, adapters, prefix, tokens, last_used, busy_token, busy_until FROM slot_owners "
            "WHERE backend = ? AND total_slots = ?",
            (backend, total_slots),
        ).fetchall()
        return [SlotOwner(slot, persona, adapters, prefix, tokens, last_used, bool(token) and until > now)
                for slot, persona, adapters, prefix, tokens, last_used, token, until in rows]

    def release_slot(self, claim: SlotClaim) -> None:
        """Let the slot go; it now holds what the turn set on the claim (nothing known when the turn failed). A
        claim already let go (by `commit_turn`) is left alone."""
        if claim.released:
            return
        with self._transaction(f"slots:{claim.backend}") as db:
            self._release(db, claim)
        claim.released = True

    def _release(self, db: _Db, claim: SlotClaim) -> None:
        db.execute(
            "UPDATE slot_owners SET persona_id = ?, adapters = ?, prefix = ?, tokens = ?, last_used = ?, "
            "busy_token = NULL, busy_until = 0 WHERE backend = ? AND total_slots = ? AND slot = ? "
            "AND busy_token = ?",
            (claim.persona_id, claim.adapters, claim.prefix, claim.tokens, time.time(), claim.backend,
             claim.total_slots, claim.slot, claim.token),
        )

    def take_idle_slot(self, backend: str, total_slots: int, slot: int, lease_s: float = 120.0) -> str | None:
        """Hold an idle slot briefly (to page its KV out); its hold token, or None when it is busy."""
        with self._transaction(f"slots:{backend}") as db:
            token = _hold_token()
            now = time.time()
            updated = db.execute(
                "UPDATE slot_owners SET busy_token = ?, busy_until = ? WHERE backend = ? AND total_slots = ? "
                "AND slot = ? AND (busy_token IS NULL OR busy_until <= ?)",
                (token, now + lease_s, backend, total_slots, slot, now),
            ).rowcount
            return token if updated else None

    def clear_slot(self, backend: str, total_slots: int, slot: int, token: str) -> None:
        """An idle slot whose KV was paged out: it holds nothing now."""
        with self._transaction(f"slots:{backend}") as db:
            db.execute(
                "UPDATE slot_owners SET persona_id = NULL, adapters = '', prefix = '', tokens = 0, busy_token = NULL, "
                "busy_until = 0 WHERE backend = ? AND total_slots = ? AND slot = ? AND busy_token = ?",
                (backend, total_slots, slot, token),
            )

    def slot_for(self, backend: str, persona_id: str, total_slots: int) -> int:
        """The persona's slot on `backend`: assigned once, the same ever after.

        A new persona takes a free slot (trying its hash-preferred one first) so personas share a slot
        only when they outnumber the slots. Reading an existing assignment takes no write lock.
        """
        with self._snapshot() as db:
            known = _assigned_slot(db, backend, total_slots, persona_id)
        if known is not None:
            return known
        with self._transaction(f"slots:{backend}") as db:
            known = _assigned_slot(db, backend, total_slots, persona_id)
            if known is not None:
                return known
            taken = {
                r[0]
                for r in db.execute(
                    "SELECT slot FROM slot_assignments WHERE backend = ? AND total_slots = ?", (backend, total_slots)
                )
            }
            preferred = _stable_hash(persona_id) % total_slots
            free = [s for s in range(total_slots) if s not in taken]
            slot = preferred if preferred not in taken else (free[0] if free else preferred)
            db.execute(
                "INSERT INTO slot_assignments (backend, total_slots, persona_id, slot) VALUES (?, ?, ?, ?)",
                (backend, total_slots, persona_id, slot),
            )
            return slot


def _assigned_slot(db: _Db, backend: str, total_slots: int, persona_id: str) -> int | None:
    row = db.execute(
        "SELECT slot FROM slot_assignments WHERE backend = ? AND total_slots = ? AND persona_id = ?",
        (backend, total_slots, persona_id),
    ).fetchone()
    return int(row[0]) if row else None


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _messages_from(db: _Db, room_id: str, first_id: int) -> list[StoredMessage]:
    """The room's messages from id `first_id` on, oldest first."""
    rows = db.execute(
        "SELECT id, turn, speaker, speaker_kind, display_name, content, text, preface FROM messages "
        "WHERE room_id = ? AND id >= ? ORDER BY id",
        (room_id, first_id),
    ).fetchall()
    return [StoredMessage(i, t, s, k, n, _load_content(c), x, p) for i, t, s, k, n, c, x, p in rows]


def _load_content(raw: str) -> Content:
    value = json.loads(raw)
    return value if isinstance(value, str | list) else str(value)
