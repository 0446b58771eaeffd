"""The fault suite: what turnflow does when things go wrong, counted on the embedded server.

    .venv/bin/python benchmarks/faults.py [--quick] [--json OUT] [--only kill,concurrent,recipes,media]

Four parts, each printing its figures (goals in brackets):

- kill: kill -9 the model server at random points during text and audio turns. Corrupted histories [0],
  failed turns that left the room unchanged [all], turns that succeeded after a restart.
- concurrent: 14 personas x 20 concurrent turns, a room each. Replies in the wrong room or persona [0],
  lost turns [0], slot bookkeeping left inconsistent [0].
- recipes: mutations of the example recipe, personas and backends file (wrong types, misspelt, missing and
  duplicate keys, unknown tiers and names, indentation, tabs, lost colons, truncation, encodings, huge values,
  deep nesting, alias bombs), generated until `--recipes` distinct files are malformed; a mutation that left a
  valid file is counted apart. Malformed files rejected with `FILE:LINE:` errors [100%], malformed files
  accepted [0], tracebacks [0].
- media: bad audio and image inputs (truncated, wrong headers, huge, silent, NaN samples). Clean refusals
  [100%], history untouched [100%].

Everything runs in a throw-away TURNFLOW_HOME (the example adapters added as `make demo` adds them); its
servers stop afterwards. `--quick` is the short form the tests run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
LOCATED = re.compile(r"^[^\n:]+:\d+: ", re.MULTILINE)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NAMES = ["Ada", "Bea", "Cal", "Dov", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kai", "Lia", "Max", "Nia"]


# ----------------------------------------------------------------------------------------------- fixtures


@contextmanager
def throwaway_home() -> Iterator[Path]:
    """A TURNFLOW_HOME with the example adapters; every embedded server started in it is stopped after."""
    previous = os.environ.get("TURNFLOW_HOME")
    with tempfile.TemporaryDirectory(prefix="turnflow-faults-") as tmp:
        home = Path(tmp)
        os.environ["TURNFLOW_HOME"] = str(home)
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "TURNFLOW": str(bin_dir / "turnflow"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        subprocess.run([str(REPO / "scripts" / "example-adapters.sh")], env=env, check=True, capture_output=True)
        try:
            yield home
        finally:
            from turnflow.server import stop_all_recorded

            stop_all_recorded()
            if previous is None:
                os.environ.pop("TURNFLOW_HOME", None)
            else:
                os.environ["TURNFLOW_HOME"] = previous


def recipe_copy(target: Path, *, personas: int = 0, backend_spec: dict[str, Any] | None = None) -> Path:
    """A private copy of the example recipe folder; with `personas`, that many adapter-less personas p0..pN."""
    shutil.copytree(RECIPES, target, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    recipe = target / "voice-chat.yaml"
    if personas:
        examples = ["maya", "helper", "teacher", "codereview"]
        text = recipe.read_text().replace("personas: [maya, helper, teacher, codereview]\n", "")
        recipe.write_text(text)
        for i in range(personas):
            data = yaml.safe_load((target / "personas" / f"{examples[i % 4]}.yaml").read_text())
            old = data["name"]
            data.update(persona=f"p{i}", name=NAMES[i % len(NAMES)], skills=[])
            data["system_prompt"] = data["system_prompt"].replace(old, NAMES[i % len(NAMES)])
            data["voice"].pop("adapter", None)
            (target / "personas" / f"p{i}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if backend_spec is not None:
        recipe.write_text(recipe.read_text().replace("backend: local\n", "backend: faults\n"))
        (target / "backends.yaml").write_text(yaml.safe_dump({"backends": {"faults": backend_spec}}))
    return recipe


def espeak(text: str, path: Path) -> Path:
    """`text` spoken by espeak-ng into a WAV file."""
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    return path


def history_rows(store: Any, room: str) -> list[tuple[Any, ...]]:
    """A room's stored history as comparable tuples."""
    return [(m.turn, m.speaker, m.text) for m in store.history(room)]


def percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 100.0


# ------------------------------------------------------------------------------------------- kill -9


def kill_server(turns: int, seed: int, work: Path) -> dict[str, Any]:
    """kill -9 the embedded server at random points while text and audio turns run; check every room."""
    from turnflow.session import Session, TurnError

    rng = random.Random(seed)
    recipe = recipe_copy(work / "kill")
    utterances = [espeak(text, work / f"utterance-{i}.wav") for i, text in enumerate(
        ["Maya, what is on the agenda today?", "Helper, can you check the build?", "Teacher, explain recursion."])]
    personas = ["maya", "helper", "teacher"]  # their adapters fit the server at once: no page-in restarts
    figures: dict[str, Any] = {"turns": turns, "kills": 0, "failed": 0, "failed_left_room_unchanged": 0,
                               "succeeded": 0, "succeeded_after_restart": 0, "corrupted_histories": 0,
                               "unexpected_errors": 0}
    problems: list[str] = []
    with Session(recipe, state_dir=work / "kill-state") as session:
        server = session.backend.server
        assert server is not None, "the fault suite runs on an embedded server"
        kills_seen = 0  # kills before the last successful turn began
        for n in range(turns):
            kills_before = figures["kills"]
            room = f"room-{n % 3}"
            persona = personas[(n + n // 3) % len(personas)]
            before = history_rows(session.store, room)
            timer: threading.Timer | None = None
            on_text: Callable[[str], None] | None = None
            if rng.random() < 0.4:
                def kill() -> None:  # the server's pid when the kill fires (a page-in may have restarted it)
                    pid = (server.status() or {}).get("pid")
                    try:
                        if pid:
                            os.killpg(pid, signal.SIGKILL)
                            figures["kills"] += 1
                    except ProcessLookupError:
                        pass
                if rng.random() < 0.5:  # somewhere in the turn: start-up, prompt processing, stream, after
                    timer = threading.Timer(rng.uniform(0.0, 1.5), kill)
                    timer.start()
                else:  # while the reply streams
                    fired: list[bool] = []

                    def on_text(_: str, kill: Callable[[], None] = kill, fired: list[bool] = fired) -> None:
                        if not fired:
                            fired.append(True)
                            kill()
            audio = n % 3 == 1
            try:
                if audio:
                    result = session.turn(persona=persona, room=room, audio=utterances[n % len(utterances)],
                                          speaker="sam", on_text=on_text)
                else:
                    result = session.turn(persona=persona, room=room, text=f"Turn {n} for you.", speaker="sam",
                                          on_text=on_text)
            except TurnError as exc:
                figures["failed"] += 1
                if history_rows(session.store, room) == before:
                    figures["failed_left_room_unchanged"] += 1
                else:
                    problems.append(f"turn {n}: failed ({exc}) but the room changed")
            except Exception as exc:  # anything but a TurnError is a defect
                figures["unexpected_errors"] += 1
                problems.append(f"turn {n}: {type(exc).__name__}: {exc}")
            else:
                figures["succeeded"] += 1
                if kills_before > kills_seen:  # the server was killed since the last good turn: restarted
                    figures["succeeded_after_restart"] += 1
                kills_seen = kills_before
                after = history_rows(session.store, room)
                if after[: len(before)] != before or len(after) != len(before) + 2 or after[-1][1] != persona \
                        or after[-2][1] != "sam" or (not audio and after[-2][2] != f"Turn {n} for you.") \
                        or after[-1][0] != result.report["turn"]:
                    problems.append(f"turn {n}: the room's history does not hold exactly this turn")
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join()
        for r in sorted({f"room-{n % 3}" for n in range(turns)}):
            rows = session.store.history(r)
            numbers = [m.turn for m in rows]
            if numbers != sorted(numbers) or any(numbers.count(t) != 2 for t in set(numbers)) \
                    or sorted(set(numbers)) != list(range(1, len(set(numbers)) + 1)):
                figures["corrupted_histories"] += 1
                problems.append(f"{r}: turn numbers {numbers}")
        server.down()
    figures["problems"] = problems[:10]
    return figures


# -------------------------------------------------------------------------------------- concurrent


def concurrent_turns(personas: int, turns: int, work: Path) -> dict[str, Any]:
    """`personas` personas, a room each, `turns` turns each, all at once on one 4-slot server."""
    from turnflow.session import Session

    spec = {"kind": "embedded", "model": "generated:tiny", "slots": 4, "ctx_per_slot": 32768}
    recipe = recipe_copy(work / "concurrent", personas=personas, backend_spec=spec)
    errors: list[str] = []
    reports: dict[int, list[dict[str, Any]]] = {i: [] for i in range(personas)}
    started = time.perf_counter()
    with Session(recipe, state_dir=work / "concurrent-state") as session:
        backend = session.backend

        def talk(i: int) -> None:
            for n in range(turns):
                try:
                    result = session.turn(persona=f"p{i}", room=f"room-{i}", speaker=f"user{i}",
                                          text=f"Message {n} from user{i} to {NAMES[i % len(NAMES)]}.")
                    reports[i].append({**result.report, "prompt_text": json.dumps(result.prompt.messages)})
                except Exception as exc:  # counted as a lost turn below
                    errors.append(f"p{i} turn {n}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(personas)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wrong = lost = 0
        for i in range(personas):
            rows = session.store.history(f"room-{i}")
            speakers = {m.speaker for m in rows}
            if not speakers <= {f"p{i}", f"user{i}"}:
                wrong += 1
            said = [m.text for m in rows if m.speaker == f"user{i}"]
            expected = [f"Message {n} from user{i} to {NAMES[i % len(NAMES)]}." for n in range(turns)]
            lost += len([t for t in expected if t not in said])
            wrong += sum(1 for r in reports[i] if r.get("persona") != f"p{i}" or r.get("room") != f"room-{i}")
            wrong += sum(1 for r in reports[i]  # another room's words in this persona's prompt
                         if any(f"from user{j} to" in r["prompt_text"] for j in range(personas) if j != i))
        owners = session.store.slot_owners(backend.key, 4, now=0)
        held = [o.persona_id for o in owners if o.persona_id]
        inconsistent = sum(1 for o in owners if o.busy) + (len(held) - len(set(held)))
        sources = [r["kv"]["source"] for rs in reports.values() for r in rs]
        assert backend.server is not None
        backend.server.down()
    return {"personas": personas, "turns_each": turns, "turns": personas * turns,
            "wrong_room_or_persona": wrong, "lost_turns": lost, "inconsistent_slots": inconsistent,
            "failed_turns": len(errors), "kv_sources": {s: sources.count(s) for s in sorted(set(sources))},
            "wall_s": round(time.perf_counter() - started, 1), "problems": errors[:10]}


# ------------------------------------------------------------------------------------ malformed recipes


SAME = "same data"
"""`judge`'s verdict on a mutation that left the file's data exactly as it was (a comment or spacing edit)."""


def _options(annotation: Any) -> list[Any]:
    """The alternatives of a union annotation (`int | None` -> [int, NoneType]); any other annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [o for arg in typing.get_args(annotation) for o in _options(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _child(annotation: Any, part: str | int) -> Any:
    """The annotation of `part` (a key or a list index) inside a value of `annotation`; None when free-form."""
    for option in _options(annotation):
        if _is_model(option) and isinstance(part, str) and part in option.model_fields:
            return option.model_fields[part].annotation
        origin, args = typing.get_origin(option), typing.get_args(option)
        if origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
        if origin in (tuple, list) and isinstance(part, int) and args:
            return args[0]
    return None


@dataclass(frozen=True)
class _Key:
    """A key of the example file that its schema declares: where it is and what it may hold."""

    path: tuple[str | int, ...]
    key: yaml.Node
    value: yaml.Node
    model: type[BaseModel]
    annotation: Any

    @property
    def name(self) -> str:
        return str(self.path[-1])

    @property
    def strict(self) -> bool:
        """Unknown keys beside this one are an error."""
        return self.model.model_config.get("extra") == "forbid"

    @property
    def required(self) -> bool:
        return self.model.model_fields[self.name].is_required()


def _schema_of(name: str) -> type[BaseModel]:
    from turnflow.recipe import BackendsFile, Persona, Recipe

    return BackendsFile if name == "backends.yaml" else Persona if name.startswith("personas/") else Recipe


def schema_keys(name: str, text: str) -> list[_Key]:
    """Every key of a turnflow file that its schema declares, with the line and column YAML found it at."""
    keys: list[_Key] = []

    def walk(node: yaml.Node, annotation: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            model = next((o for o in _options(annotation) if _is_model(o)), None)
            for key, value in node.value:
                child = _child(annotation, key.value)
                if model is not None and key.value in model.model_fields:
                    keys.append(_Key(path + (key.value,), key, value, model, child))
                if child is not None:
                    walk(value, child, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = _child(annotation, i)
                if child is not None:
                    walk(item, child, path + (i,))

    root = yaml.compose(text, Loader=yaml.SafeLoader)  # its marks index characters
    if root is not None:
        walk(root, _schema_of(name), ())
    return keys


def _wrong_values(annotation: Any) -> list[str]:
    """YAML values the annotation does not accept (none when it accepts anything)."""
    options = _options(annotation)
    origins = {typing.get_origin(o) or o for o in options}
    if Any in origins:
        return []
    numeric = bool(origins & {int, float, bool})
    wrong = []
    if not origins & {tuple, list}:
        wrong.append("[1, 2, 3]")
    if not origins & {dict} and not any(_is_model(o) for o in options):
        wrong.append("{a: 1}")
    if not numeric:
        wrong += ["true", "-12"]
    if numeric and not origins & {str, typing.Literal}:
        wrong.append("many")
    if type(None) not in origins:
        wrong.append("null")
    return wrong


def _value_end(text: str, node: yaml.Node) -> int:
    """Where a value ends: YAML ends a block value at the next token, which may be indented on a later line."""
    end = node.end_mark.index
    line_start = text.rfind("\n", 0, end) + 1
    return line_start if end > line_start and not text[line_start:end].strip() else end


def _line_span(text: str, key: _Key) -> tuple[int, int]:
    """The character span of a block key's whole entry: its line through the end of its value."""
    start = text.rfind("\n", 0, key.key.start_mark.index) + 1
    end = _value_end(text, key.value)
    if not text[start:end].endswith("\n"):
        newline = text.find("\n", end)
        end = len(text) if newline < 0 else newline + 1
    return start, end


def _keyed_mutation(rng: random.Random, text: str, keys: list[_Key]) -> tuple[str, str, str] | None:
    """One mutation at a key the schema declares: (text, kind, what), or None when the chosen key cannot take it."""
    key = rng.choice(keys)
    k, v = key.key.start_mark.index, key.key.end_mark.index
    line_start = text.rfind("\n", 0, k) + 1
    prefix = text[line_start:k].strip()
    block = prefix in ("", "-")  # a `key:` line (maybe a list item's first), not a key inside {...}
    where = "/".join(str(p) for p in key.path)
    choice = rng.randrange(8)
    if choice == 0 and key.strict:  # a key misspelt
        wrong = key.name[:-1] + ("x" if key.name[-1] != "x" else "y")
        if wrong in key.model.model_fields:
            return None
        return text[:k] + wrong + text[v:], "misspelt key", f"key {where} misspelt {wrong!r}"
    if choice == 1:  # a value of the wrong type
        wrong_values = _wrong_values(key.annotation)
        if not wrong_values:
            return None
        value = rng.choice(wrong_values)
        s, e = key.value.start_mark.index, _value_end(text, key.value)
        tail = "\n" if text[s:e].endswith("\n") else ""
        return text[:s] + value + tail + text[e:], "wrong type", f"{where} set to {value}"
    if choice == 2 and key.required:  # a required key removed
        if block:
            s, e = _line_span(text, key)
            if prefix == "-":  # the first key of a list item: keep the dash
                s = k
            return text[:s] + text[e:], "required key removed", f"{where} removed"
        e = _value_end(text, key.value)
        if text[e:e + 2] == ", ":
            return text[:k] + text[e + 2:], "required key removed", f"{where} removed"
        s = text.rfind(",", line_start, k)
        if s < 0:
            return None
        return text[:s] + text[e:], "required key removed", f"{where} removed"
    if choice == 3:  # the key given twice
        if prefix == "":
            s, e = _line_span(text, key)
            return text[:e] + text[s:e] + text[e:], "duplicate key", f"{where} twice"
        if block:
            return None
        e = _value_end(text, key.value)
        return text[:e] + ", " + text[k:e] + text[e:], "duplicate key", f"{where} twice"
    if choice == 4 and block and key.strict:  # indentation shifted
        shift = " " * rng.choice([1, 3, 5])
        return text[:line_start] + shift + text[line_start:], "indentation", f"{where} indented by {len(shift)}"
    if choice == 5 and block and key.strict:  # a tab for indentation
        indent = text[line_start:k]
        return (text[:line_start] + "\t" + indent.lstrip(" ") + text[k:], "tab indentation",
                f"tab before {where}")
    if choice == 6 and key.strict:  # the colon lost
        colon = text.find(":", v)
        if colon < 0 or text[v:colon].strip():
            return None
        return text[:colon] + text[colon + 1:], "colon lost", f"colon after {where} lost"
    if choice == 7 and len(key.name) >= 2:  # truncated inside a key
        cut = rng.randrange(k + 1, v)
        return text[:cut], "truncated", f"truncated inside key {where} (byte {len(text[:cut].encode())})"
    return None


# value words that name something (a tier, a backend kind, a backend, a persona id): reversed, they name nothing
NAMING = re.compile(r"\b(tier|kind|backend|persona): ([a-z][\w-]*)")


def mutate(rng: random.Random, name: str, raw: bytes, keys: list[_Key]) -> tuple[bytes, str, str]:
    """One broken version of a turnflow file: (bytes, kind of mutation, what was done)."""
    text = raw.decode()
    while True:
        choice = rng.randrange(14)
        if choice < 7:
            mutated = _keyed_mutation(rng, text, keys)
            if mutated is not None:
                return mutated[0].encode(), mutated[1], mutated[2]
            continue
        if choice == 7:  # invalid UTF-8
            at = rng.randrange(len(raw))
            return raw[:at] + b"\xff\xfe\xc3(" + raw[at:], "invalid UTF-8", f"invalid UTF-8 at byte {at}"
        if choice == 8:  # another encoding
            return text.encode("utf-16"), "UTF-16", "UTF-16 encoded"
        if choice == 9:  # a huge value
            if name == "backends.yaml":
                return (text.replace("slots: ", "slots: " + "9" * 41, 1).encode(), "huge value",
                        "slots: 42 digits")
            key = "system_prompt" if name.startswith("personas/") else "description"
            big = "x" * 3_000_000
            return re.sub(rf"^{key}:.*$", f"{key}: {big}", text, count=1, flags=re.M).encode(), "huge value", \
                f"3 MB {key}"
        if choice == 10:  # nesting far too deep, in place of a value
            depth = rng.choice([200, 5000])
            spot = rng.choice([k for k in keys if k.value.start_mark.line == k.key.start_mark.line])
            s, e = spot.value.start_mark.index, _value_end(text, spot.value)
            return (text[:s] + "[" * depth + "]" * depth + text[e:]).encode(), "deep nesting", \
                f"{'/'.join(map(str, spot.path))}: lists {depth} deep"
        if choice == 11:  # a tier, kind, backend or persona id that does not exist
            found = [m for m in NAMING.finditer(text)
                     if not text[text.rfind("\n", 0, m.start()) + 1: m.start()].lstrip().startswith("#")]
            if not found:
                continue
            m = rng.choice(found)
            word = m.group(2)[::-1] if m.group(2)[::-1] != m.group(2) else m.group(2) + "x"
            return (text[: m.start(2)] + word + text[m.end(2):]).encode(), "unknown name", \
                f"{m.group(1)} {m.group(2)!r} -> {word!r}"
        if choice == 12:  # not a mapping at all
            content, what = rng.choice([(b"", "emptied"), (b"- just\n- a list\n", "a list"),
                                        (b"just words\n", "a bare string")])
            return content, "not a mapping", what
        alias = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
        return (text + alias).encode(), "alias bomb", "alias bomb (9^8 items)"


def _structure_problem(node: yaml.Node) -> str | None:
    """A key given twice in one mapping, or more values than a turnflow file may expand to through aliases."""
    from turnflow.recipe import MAX_YAML_VALUES

    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:  # iterative: the file may nest thousands deep
        current, done = stack.pop()
        if isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        elif isinstance(current, yaml.SequenceNode):
            children = list(current.value)
        else:
            children = []
        if done:
            sizes[id(current)] = 1 + sum(sizes[id(c)] for c in children)
            continue
        if id(current) in sizes:
            continue
        sizes[id(current)] = 0  # an alias back to an ancestor adds nothing more
        if isinstance(current, yaml.MappingNode):
            names = [k.value for k, _ in current.value if isinstance(k, yaml.ScalarNode)]
            if len(names) != len(set(names)):
                return "a key given twice"
        stack.append((current, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    if sizes[id(node)] > MAX_YAML_VALUES:
        return f"expands to more than {MAX_YAML_VALUES:,} values"
    return None


def judge(name: str, raw: bytes, original: Any) -> str | None:
    """Why a mutated file is not a valid turnflow file, by the format's own rules and apart from turnflow's loader.

    The rules: at most MAX_FILE_BYTES, UTF-8, YAML with no key given twice and at most MAX_YAML_VALUES values
    once aliases are expanded, a mapping, and valid against the file's schema (the `Recipe`, `Persona` or
    `BackendsFile` model). Returns the rule broken; `SAME` when the data is exactly the example's; None when the
    file keeps every rule here (only the checks across files, which the loader makes, can still refuse it).
    """
    from pydantic import ValidationError

    from turnflow.recipe import MAX_FILE_BYTES

    if len(raw) > MAX_FILE_BYTES:
        return "larger than the file size limit"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except Exception:  # a syntax error, or nesting too deep for the parser
        return "not YAML"
    if node is None:
        return "empty"
    problem = _structure_problem(node)
    if problem:
        return problem
    try:
        data = yaml.load(text, Loader=_LOADER)
    except Exception:
        return "does not load"
    if data == original:
        return SAME
    if not isinstance(data, dict):
        return "not a mapping"
    try:
        _schema_of(name).model_validate(data)
    except ValidationError as exc:
        return f"schema: {exc.errors()[0]['type']}"
    return None


def malformed_recipes(count: int, seed: int, work: Path) -> dict[str, Any]:
    """Mutated recipe/persona/backends files, each loaded and validated as a user would, until `count` of them
    are malformed (`judge` says so, or turnflow's checks across files refuse them); the mutations that left a
    valid file are counted apart."""
    from turnflow.recipe import RecipeError, load_recipe, validate_paths

    rng = random.Random(seed)
    personas = sorted(f"personas/{p.name}" for p in (RECIPES / "personas").glob("*.yaml"))
    targets = ["voice-chat.yaml", "backends.yaml", *personas]
    examples = {name: (RECIPES / name).read_bytes() for name in targets}
    keys = {name: schema_keys(name, raw.decode()) for name, raw in examples.items()}
    originals = {name: yaml.load(raw, Loader=_LOADER) for name, raw in examples.items()}
    figures: dict[str, Any] = {
        "target": count, "generated": 0, "duplicates_skipped": 0, "malformed": 0, "valid_after_all": 0,
        "rejected": 0, "rejected_with_file_line": 0, "rejected_by_checks_across_files": 0,
        "malformed_accepted": 0, "valid_rejected": 0, "tracebacks": 0, "cli_checked": 0, "cli_clean": 0}
    kinds: dict[str, int] = {}
    seen: set[tuple[str, bytes]] = set()
    samples: list[str] = []
    across: list[str] = []
    valid: list[str] = []
    problems: list[str] = []
    while figures["malformed"] < count and figures["generated"] < 3 * count \
            and figures["duplicates_skipped"] < 10 * count:
        name = rng.choice(targets)
        broken, kind, what = mutate(rng, name, examples[name], keys[name])
        if (name, broken) in seen:  # every file counted is a different file
            figures["duplicates_skipped"] += 1
            continue
        seen.add((name, broken))
        n = figures["generated"]
        figures["generated"] += 1
        verdict = judge(name, broken, originals[name])
        folder = work / f"recipes-{n}"
        recipe = recipe_copy(folder)
        (folder / name).write_bytes(broken)
        outcome, message = "", ""
        started = time.perf_counter()
        try:
            validate_paths([recipe])
            load_recipe(recipe)
            outcome = "accepted"
        except RecipeError as exc:
            message = str(exc).replace(f"{folder}/", "")
            located = bool(message) and all(LOCATED.match(line) for line in message.splitlines() if line.strip())
            outcome = "located" if located else "unlocated"
        except BaseException as exc:  # a traceback for the user
            if isinstance(exc, KeyboardInterrupt):
                raise
            figures["tracebacks"] += 1
            problems.append(f"{name} ({what}): {traceback.format_exception_only(type(exc), exc)[-1].strip()[:200]}")
            outcome = "traceback"
        took = time.perf_counter() - started
        if took > 10:
            problems.append(f"{name} ({what}): took {took:.0f} s")
        malformed = verdict not in (None, SAME) or outcome in ("located", "unlocated") and verdict is None
        if outcome != "traceback" and outcome != "accepted" and verdict == SAME:
            figures["valid_rejected"] += 1
            problems.append(f"{name} ({what}): the data did not change, yet: {message[:200]}")
        elif malformed:
            figures["malformed"] += 1
            kinds[kind] = kinds.get(kind, 0) + 1
            if outcome == "accepted":
                figures["malformed_accepted"] += 1
                problems.append(f"{name} ({what}): accepted, but {verdict}")
            elif outcome != "traceback":
                figures["rejected"] += 1
                if verdict is None:
                    figures["rejected_by_checks_across_files"] += 1
                    across.append(f"{name} ({what}): {message.splitlines()[0][:160]}")
                if outcome == "located":
                    figures["rejected_with_file_line"] += 1
                    if len(samples) < 8:
                        samples.append(f"{name} ({what}): {message.splitlines()[0][:160]}")
                else:
                    problems.append(f"{name} ({what}): not located: {message[:200]}")
        elif outcome == "accepted":
            figures["valid_after_all"] += 1
            valid.append(f"{name}: {what}" + (" (same data)" if verdict == SAME else ""))
        if n % 20 == 0:  # the CLI as well: one line per problem, exit 1 or 0, never a traceback
            proc = subprocess.run([sys.executable, "-m", "turnflow.cli", "validate", str(recipe)],
                                  capture_output=True, text=True, timeout=120)
            figures["cli_checked"] += 1
            if "Traceback" not in proc.stderr and proc.returncode == (0 if outcome == "accepted" else 1):
                figures["cli_clean"] += 1
            else:
                problems.append(f"cli validate {name} ({what}): exit {proc.returncode}: {proc.stderr[-200:]}")
        shutil.rmtree(folder)
    figures["rejected_with_file_line_pct"] = percent(figures["rejected_with_file_line"], figures["malformed"])
    figures["kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    figures["examples"] = samples
    figures["rejected_by_checks_across_files_list"] = across
    figures["valid_after_all_mutations"] = valid
    figures["problems"] = problems[:15]
    return figures


# --------------------------------------------------------------------------------------------- bad media


def _wav(samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def bad_audio(speech: bytes) -> list[tuple[str, Any]]:
    """Audio inputs a turn must refuse, with a name each."""
    rng = np.random.default_rng(7)
    nan = np.zeros(16000, dtype=np.float32)
    nan[100:200] = np.nan
    inf = np.zeros(16000, dtype=np.float32)
    inf[5] = np.inf
    huge_header = bytearray(speech)
    huge_header[40:44] = struct.pack("<I", 0xFFFFFFF0)
    cases: list[tuple[str, Any]] = [
        ("empty bytes", b""),
        ("header only", speech[:44]),
        ("truncated header", speech[:20]),
        ("RIFF magic wrong", b"RIFX" + speech[4:]),
        ("WAVE magic wrong", speech[:8] + b"WAVX" + speech[12:]),
        ("fmt chunk zeroed", speech[:12] + b"\0" * 24 + speech[36:]),
        ("random bytes", rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()),
        ("text pretending", b"this is not audio at all, only words in a file" * 20),
        ("data size 4 GB", bytes(huge_header)),
        ("silence", _wav(np.zeros(32000, dtype=np.float32))),
        ("near silence", _wav(np.full(32000, 1e-6, dtype=np.float32))),
        ("NaN samples (float WAV)", _wav(nan, subtype="FLOAT")),
        ("infinite sample (float WAV)", _wav(inf, subtype="FLOAT")),
        ("too long (90 s)", _wav(np.zeros(16000 * 90, dtype=np.float32), 16000)),
        ("sample rate 1 Hz (hours long)", speech[:24] + struct.pack("<I", 1) + speech[28:]),
        ("zero sample rate", speech[:24] + struct.pack("<I", 0) + speech[28:]),
        ("NaN array", nan),
        ("3-D array", np.zeros((5, 16000, 2), dtype=np.float32)),
        ("input_audio bad base64", {"data": "@@@not base64@@@", "format": "wav"}),
        ("input_audio empty", {"data": "", "format": "wav"}),
        ("input_audio mp3 declared, wav inside", {"data": base64.b64encode(speech).decode(), "format": "mp3"}),
        ("input_audio format unknown", {"data": base64.b64encode(speech).decode(), "format": "midi"}),
        ("input_audio data not a string", {"data": 12345, "format": "wav"}),
        ("missing file", "/nonexistent/voice.wav"),
        ("FLAC magic only", b"fLaC" + b"\0" * 30),
        ("Ogg magic only", b"OggS" + b"\0" * 30),
        ("zero channels", speech[:22] + struct.pack("<H", 0) + speech[24:]),
        ("empty array", np.zeros(0, dtype=np.float32)),
        ("array of no frames and two channels", np.zeros((0, 2), dtype=np.float32)),
        ("input_audio random bytes", {"data": base64.b64encode(rng.integers(0, 256, 4000, dtype=np.uint8)
                                                               .tobytes()).decode(), "format": "wav"}),
    ]
    for cut in (0.1, 0.5):  # truncated mid-stream: the header claims more data than there is
        cases.append((f"truncated to {int(cut * 100)}% with the header intact",
                      speech[: 44 + int((len(speech) - 44) * cut)]))
    cases.append(("odd byte after the header", speech[:44] + b"\x01"))
    return cases


def _png(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + b"\x80" * (width * 3) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def bad_images(work: Path) -> list[tuple[str, Any]]:
    """Image inputs a turn must refuse, with a name each."""
    png = _png(8, 8)
    text_file = work / "notes.png"
    text_file.write_text("not an image")
    return [
        ("empty bytes", b""),
        ("text bytes", b"hello world"),
        ("PNG truncated to its magic", png[:8]),
        ("PNG truncated mid-header", png[:20]),
        ("PNG truncated mid-data", png[: len(png) - 20]),
        ("PNG magic wrong", b"\x89PNX" + png[4:]),
        ("PNG claiming 100000x100000", png[:16] + struct.pack(">II", 100000, 100000) + png[24:]),
        ("PNG zero width", png[:16] + struct.pack(">II", 0, 8) + png[24:]),
        ("JPEG magic only", b"\xff\xd8\xff"),
        ("GIF header only", b"GIF89a"),
        ("WebP header only", b"RIFF\0\0\0\0WEBP"),
        ("BMP image", b"BM" + b"\0" * 60),
        ("SVG text", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>'),
        ("30 MB of zeros after a PNG magic", png[:8] + b"\0" * 30_000_000),
        ("data URL bad base64", "data:image/png;base64,@@@"),
        ("data URL not base64", "data:image/png,rawbytes"),
        ("data URL of text", "data:image/png;base64," + base64.b64encode(b"not a png").decode()),
        ("image_url part without url", {"type": "image_url", "image_url": {}}),
        ("missing file", str(work / "nope.png")),
        ("text file named .png", str(text_file)),
        ("directory", str(work)),
    ]


def bad_media(work: Path) -> dict[str, Any]:
    """Every bad input through `Session.turn`: a clean refusal and the room untouched."""
    from turnflow.nodes.images import ImageError
    from turnflow.nodes.media import AudioError
    from turnflow.session import Session, TurnError

    recipe = recipe_copy(work / "media")
    speech = espeak("Helper, what is the weather like for the offsite?", work / "speech.wav").read_bytes()
    refused_types = (AudioError, ImageError, TurnError)
    figures: dict[str, Any] = {"inputs": 0, "refused_cleanly": 0, "accepted": 0, "tracebacks": 0,
                               "history_untouched": 0}
    accepted: list[str] = []
    problems: list[str] = []
    with Session(recipe, state_dir=work / "media-state") as session:
        session.turn(persona="helper", room="media", text="Hello, helper.")
        cases = [("audio", name, value) for name, value in bad_audio(speech)]
        cases += [("image", name, value) for name, value in bad_images(work)]
        for kind, name, value in cases:
            figures["inputs"] += 1
            before = history_rows(session.store, "media")
            try:
                if kind == "audio":
                    session.turn(persona="helper", room="media", audio=value, speaker="sam")
                else:
                    session.turn(persona="helper", room="media", text="What is in this picture?", images=[value],
                                 speaker="sam")
                figures["accepted"] += 1
                accepted.append(f"{kind}: {name}")
                continue
            except refused_types as exc:
                figures["refused_cleanly"] += 1
                if not str(exc).strip():
                    problems.append(f"{kind} {name}: refused without a message")
            except Exception as exc:  # anything else is a traceback for the user
                figures["tracebacks"] += 1
                problems.append(f"{kind} {name}: {type(exc).__name__}: {str(exc)[:160]}")
            if history_rows(session.store, "media") == before:
                figures["history_untouched"] += 1
            else:
                problems.append(f"{kind} {name}: the room changed")
        assert session.backend.server is not None
        session.backend.server.down()
    refusals = figures["inputs"] - figures["accepted"]
    figures["refused_cleanly_pct"] = percent(figures["refused_cleanly"], figures["inputs"])
    figures["history_untouched_pct"] = percent(figures["history_untouched"], refusals)
    figures["accepted_inputs"] = accepted
    figures["problems"] = problems[:15]
    return figures


# -------------------------------------------------------------------------------------------------- main


PARTS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "kill": lambda a, w: kill_server(a.turns, a.seed, w),
    "concurrent": lambda a, w: concurrent_turns(a.personas, a.concurrent_turns, w),
    "recipes": lambda a, w: malformed_recipes(a.recipes, a.seed, w),
    "media": lambda a, w: bad_media(w),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen parts in one throw-away home; returns their figures."""
    results: dict[str, Any] = {}
    with throwaway_home() as home:
        for part in args.only:
            work = home / f"work-{part}"
            work.mkdir()
            started = time.perf_counter()
            results[part] = PARTS[part](args, work)
            results[part]["part_s"] = round(time.perf_counter() - started, 1)
            print(f"\n== {part}")
            for key, value in results[part].items():
                if isinstance(value, list):
                    for item in value:
                        print(f"   {key}: {item}")
                else:
                    print(f"{key:>30}: {value}")
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short form: fewer turns and mutations")
    parser.add_argument("--turns", type=int, default=None, help="turns under kill -9 (default 100; quick 12)")
    parser.add_argument("--personas", type=int, default=14)
    parser.add_argument("--concurrent-turns", type=int, default=None, help="turns per persona (20; quick 3)")
    parser.add_argument("--recipes", type=int, default=None, help="malformed files to generate (default 240; quick 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="kill,concurrent,recipes,media")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.turns = args.turns or (9 if args.quick else 100)
    args.concurrent_turns = args.concurrent_turns or (3 if args.quick else 20)
    args.recipes = args.recipes or (60 if args.quick else 240)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    results = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"quick": args.quick, **results}, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
