"""The fault suite: what turnflow does when things go wrong, counted on the embedded server.

    .venv/bin/python benchmarks/faults.py [--quick] [--json OUT] [--only kill,concurrent,recipes,media]

Four parts, each printing its figures (goals in brackets):

- kill: kill -9 the model server at random points during text and audio turns. Corrupted histories [0],
  failed turns that left the room unchanged [all], turns that succeeded after a restart.
- concurrent: 14 personas x 20 concurrent turns, a room each. Replies in the wrong room or persona [0],
  lost turns [0], slot bookkeeping left inconsistent [0].
- recipes: mutations of the example recipe, personas and backends file (wrong types, keys, tiers,
  indentation, encodings, huge values, truncation). Rejected with `FILE:LINE:` errors [100%], tracebacks [0].
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
LOCATED = re.compile(r"^[^\n:]+:\d+: ", re.MULTILINE)
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
    from turnflow.server import EmbeddedServer
    from turnflow.session import Session, TurnError

    rng = random.Random(seed)
    recipe = recipe_copy(work / "kill")
    utterances = [espeak(text, work / f"utterance-{i}.wav") for i, text in enumerate(
        ["Maya, what is on the agenda today?", "Helper, can you check the build?", "Teacher, explain recursion."])]
    personas = ["maya", "helper", "teacher"]  # their adapters fit the server at once: no page-in restarts
    figures = {"turns": turns, "kills": 0, "failed": 0, "failed_left_room_unchanged": 0, "succeeded": 0,
               "succeeded_after_restart": 0, "corrupted_histories": 0, "unexpected_errors": 0}
    problems: list[str] = []
    with Session(recipe, state_dir=work / "kill-state") as session:
        server: EmbeddedServer = session.backend.server
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
        backend.server.down()
    return {"personas": personas, "turns_each": turns, "turns": personas * turns,
            "wrong_room_or_persona": wrong, "lost_turns": lost, "inconsistent_slots": inconsistent,
            "failed_turns": len(errors), "kv_sources": {s: sources.count(s) for s in sorted(set(sources))},
            "wall_s": round(time.perf_counter() - started, 1), "problems": errors[:10]}


# ------------------------------------------------------------------------------------ malformed recipes


def _lines_mutation(rng: random.Random, text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines) if re.match(r"^\s*[a-z_]+:", line)]
    i = rng.choice(candidates)
    line = lines[i]
    key = line.split(":", 1)[0].strip()
    choice = rng.randrange(7)
    if choice == 0:  # a key misspelt
        lines[i] = line.replace(key, key[:-1] + ("x" if key[-1] != "x" else "y"), 1)
        return "".join(lines), f"misspelt key {key!r}"
    if choice == 1:  # indentation shifted
        lines[i] = " " * rng.choice([1, 3, 5]) + line
        return "".join(lines), f"indentation of {key!r}"
    if choice == 2:  # a tab for indentation
        lines[i] = "\t" + line.lstrip(" ")
        return "".join(lines), f"tab before {key!r}"
    if choice == 3:  # a value of the wrong type
        indent = line[: len(line) - len(line.lstrip())]
        value = rng.choice(["[1, 2, 3]", "{a: 1}", "-12", "3.5e99", "true", "null", "'x' * 3"])
        lines[i] = f"{indent}{key}: {value}\n"
        return "".join(lines), f"{key!r} set to {value}"
    if choice == 4:  # the line duplicated
        lines.insert(i, line)
        return "".join(lines), f"duplicate {key!r}"
    if choice == 5:  # the line removed
        del lines[i]
        return "".join(lines), f"{key!r} removed"
    lines[i] = line.replace(":", "", 1)  # the colon lost
    return "".join(lines), f"colon after {key!r} lost"


def mutate(rng: random.Random, name: str, raw: bytes) -> tuple[bytes, str]:
    """One broken version of a recipe file and what was done to it."""
    text = raw.decode()
    choice = rng.randrange(12)
    if choice < 5:
        mutated, what = _lines_mutation(rng, text)
        return mutated.encode(), what
    if choice == 5:  # truncated at a random byte
        cut = rng.randrange(1, len(raw))
        return raw[:cut], f"truncated at byte {cut}"
    if choice == 6:  # invalid UTF-8
        at = rng.randrange(len(raw))
        return raw[:at] + b"\xff\xfe\xc3(" + raw[at:], f"invalid UTF-8 at byte {at}"
    if choice == 7:  # another encoding
        return text.encode("utf-16"), "UTF-16 encoded"
    if choice == 8:  # a huge value
        key = "system_prompt" if "system_prompt" in text else "description"
        if "backends:" in text:
            return text.replace("slots: ", "slots: 9" + "9" * 40 + "", 1).encode(), "huge slots"
        big = "x" * 3_000_000
        if key in text:
            return re.sub(rf"^{key}:.*$", f"{key}: {big}", text, count=1, flags=re.M).encode(), f"3 MB {key}"
        return (text + f"description: {big}\n").encode(), "3 MB description"
    if choice == 9:  # nesting far too deep
        depth = rng.choice([200, 5000])
        return (text + "extra: " + "[" * depth + "]" * depth + "\n").encode(), f"nesting {depth} deep"
    if choice == 10:  # tiers and kinds that do not exist
        for word in ("invariant", "semi_stable", "volatile", "embedded", "voice", "text"):
            if word in text:
                return text.replace(word, word[::-1], 1).encode(), f"{word!r} reversed"
        return b"", "emptied"
    alias = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    return (text + alias).encode(), "alias bomb (9^8 items)"


def malformed_recipes(count: int, seed: int, work: Path) -> dict[str, Any]:
    """`count` mutated recipe/persona/backends files, each loaded and validated as a user would."""
    from turnflow.recipe import RecipeError, load_recipe, validate_paths

    rng = random.Random(seed)
    personas = [f"personas/{p.name}" for p in (RECIPES / "personas").glob("*.yaml")]
    targets = ["voice-chat.yaml", "backends.yaml", *personas]
    figures = {"mutations": count, "rejected": 0, "rejected_with_file_line": 0, "accepted": 0, "tracebacks": 0,
               "cli_checked": 0, "cli_clean": 0}
    examples: list[str] = []
    accepted: list[str] = []
    problems: list[str] = []
    for n in range(count):
        folder = work / f"recipes-{n}"
        recipe = recipe_copy(folder)
        name = rng.choice(sorted(targets))
        path = folder / name
        broken, what = mutate(rng, name, path.read_bytes())
        path.write_bytes(broken)
        outcome = ""
        try:
            started = time.perf_counter()
            validate_paths([recipe])
            load_recipe(recipe)
            outcome = "accepted"
            figures["accepted"] += 1
            accepted.append(f"{name}: {what}")
        except RecipeError as exc:
            figures["rejected"] += 1
            message = str(exc)
            if message and all(LOCATED.match(line) for line in message.splitlines() if line.strip()):
                figures["rejected_with_file_line"] += 1
                if len(examples) < 6:
                    examples.append(f"{what}: {message.splitlines()[0][:160]}")
            else:
                problems.append(f"{name} ({what}): not located: {message[:200]}")
            outcome = "rejected"
        except BaseException as exc:  # a traceback for the user
            if isinstance(exc, KeyboardInterrupt):
                raise
            figures["tracebacks"] += 1
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            problems.append(f"{name} ({what}): {tb[:200]}")
            outcome = "traceback"
        if time.perf_counter() - started > 10:
            problems.append(f"{name} ({what}): took {time.perf_counter() - started:.0f} s")
        if n % 20 == 0:  # the CLI as well: one line per problem, exit 1 or 0, never a traceback
            proc = subprocess.run([sys.executable, "-m", "turnflow.cli", "validate", str(recipe)],
                                  capture_output=True, text=True, timeout=120)
            figures["cli_checked"] += 1
            if "Traceback" not in proc.stderr and proc.returncode == (0 if outcome == "accepted" else 1):
                figures["cli_clean"] += 1
            else:
                problems.append(f"cli validate {name} ({what}): exit {proc.returncode}: {proc.stderr[-200:]}")
        shutil.rmtree(folder)
    figures["rejected_with_file_line_pct"] = percent(figures["rejected_with_file_line"], figures["rejected"])
    figures["examples"] = examples
    figures["accepted_mutations"] = accepted
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
    figures = {"inputs": 0, "refused_cleanly": 0, "accepted": 0, "tracebacks": 0, "history_untouched": 0}
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
    parser.add_argument("--recipes", type=int, default=None, help="malformed files (default 240; quick 60)")
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
