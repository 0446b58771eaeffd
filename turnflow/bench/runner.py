"""Running the bench: the embedded server up, the recipe folder written, every mode's turns on the same server,
then the summary, table and plots written (or rebuilt from an earlier run's `turns.jsonl`)."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from turnflow.bench.fixture import (
    ASSEMBLY,
    BACKEND_NAME,
    BASELINES,
    MODES,
    SESSION_OPTIONS,
    BenchOptions,
    Mode,
    ScriptedTurn,
    _speak_script,
    backend_spec,
    context_per_slot,
    conversation_script,
    voice_path_available,
    write_recipe_folder,
)
from turnflow.bench.plots import write_plots
from turnflow.bench.summary import (
    STEADY_FROM_TURN,
    BenchSummary,
    TurnRecord,
    _ratio,
    baseline_row,
    kv_arithmetic,
    kv_block,
    markdown_report,
    summarise,
    summarise_mode,
)
from turnflow.recipe import find_persona, load_recipe


def rss_mb(pid: int | None = None) -> float | None:
    """Resident memory of a process in MB (this process when `pid` is None), from /proc."""
    path = f"/proc/{pid}/status" if pid else "/proc/self/status"
    try:
        with open(path) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if pid is None:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return None



@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the bench runs, so that its model server is stopped on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _turnflow_home(path: Path) -> Iterator[None]:
    """Point TURNFLOW_HOME at `path` for the bench, so its server never meets the user's."""
    previous = os.environ.get("TURNFLOW_HOME")
    os.environ["TURNFLOW_HOME"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TURNFLOW_HOME", None)
        else:
            os.environ["TURNFLOW_HOME"] = previous


# --------------------------------------------------------------------------------------------- running


@dataclass
class _Run:
    """State of one bench run."""

    options: BenchOptions
    out: Path
    records: list[TurnRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    server: Any = None
    """The embedded server (None for a server reached by URL)."""
    server_pid: int | None = None
    peaks: list[float] = field(default_factory=list)
    """Peak RSS of each server process seen (the server restarts between modes, and when its KV pool grows)."""


def _record(mode: Mode, turn: ScriptedTurn, report: dict[str, Any], e2e_ms: float, run: _Run) -> TurnRecord:
    """A turn's report reduced to the bench's per-turn record."""
    llm = report["llm"]
    timings = report.get("timings_ms") or {}
    route = report.get("route") or {}
    invocations = report.get("invocations") or {}
    cache = report.get("composition_cache") or {}
    kv = report.get("kv") or {}
    processed = int(llm.get("prompt_tokens_processed") or 0)
    cached = int(llm.get("prompt_tokens_cached") or 0)
    return TurnRecord(
        mode=mode,
        seq=turn.seq,
        persona=turn.persona,
        persona_turn=turn.persona_turn,
        room=report.get("room", turn.room),
        speaker=turn.speaker,
        kind=turn.kind,
        steady=turn.persona_turn >= min(STEADY_FROM_TURN, run.options.turns),
        slot=llm.get("slot"),
        prompt_tokens=int(llm.get("prompt_tokens") or processed + cached),
        prompt_tokens_processed=processed,
        prompt_tokens_cached=cached,
        usage_reported=llm.get("prompt_tokens_processed") is not None,
        completion_tokens=llm.get("completion_tokens"),
        invariant_sha256=(report.get("prefix") or {}).get("invariant_sha256", ""),
        route_audio_in=str(route.get("audio_in", "none")),
        route_audio_out=str(route.get("audio_out", "none")),
        stt_invocations=int(invocations.get("stt", 0)),
        tts_invocations=int(invocations.get("tts", 0)),
        llm_invocations=int(invocations.get("llm", 1)),
        ttft_ms=llm.get("ttft_ms"),
        first_audio_ms=timings.get("first_audio"),
        e2e_ms=round(e2e_ms, 2),
        model_ms=timings.get("model"),
        turnflow_ms=(timings["turnflow"] + timings.get("setup", 0.0)) if timings.get("turnflow") is not None else None,
        node_ms={k: float(v) for k, v in (timings.get("nodes") or {}).items()},
        composition_cache_hits=int(cache.get("hits", 0)),
        composition_cache_misses=int(cache.get("misses", 0)),
        tier_violations=len(report.get("tier_violations") or []),
        server_rss_mb=rss_mb(run.server_pid) if run.server_pid else None,
        turnflow_rss_mb=rss_mb() or 0.0,
        reply_chars=len(report.get("reply") or ""),
        joined=bool(turn.joins),
        kv_source=kv.get("source"),
        kv_restore_ms=kv.get("restore_ms"),
        kv_page_ms=float(timings.get("kv_page") or 0.0),
        kv_saved_bytes=int(kv.get("saved_bytes") or 0),
        kv_pool_tokens=kv.get("pool_tokens"),
        kv_bytes_per_token=kv.get("bytes_per_token"),
        server_prompt_ms=llm.get("server_prompt_ms"),
        server_decode_ms_per_token=llm.get("server_decode_ms_per_token"),
    )


def _run_mode(
    mode: Mode,
    recipe_path: Path,
    script: Sequence[ScriptedTurn],
    clips: dict[int, Any],
    run: _Run,
    progress: Any,
    sink: Any,
) -> None:
    """Run the whole script in one mode, in its own state folder and room(s), on the shared server."""
    import inspect

    from turnflow.session import Session

    started = time.perf_counter()
    speaks = "audio_sink" in inspect.signature(Session.turn).parameters  # every reply is spoken into the room
    with Session(
        recipe_path, backend=BACKEND_NAME, state_dir=run.out / "state" / mode, assembly=ASSEMBLY[mode],
        warn=lambda message: run.warnings.append(f"{mode}: {message}"), **SESSION_OPTIONS.get(mode, {}),
    ) as session:
        # A naive turn re-reads a ~40k-token prompt on 2 cores: allow minutes between streamed bytes.
        session.backend.client._http.timeout = httpx.Timeout(1800.0, connect=10.0)
        for room in sorted({t.room for t in script}):  # everyone is in the call before anyone speaks
            late = {who for t in script if t.room == room for who in t.joins}
            for person in sorted({t.speaker for t in script if t.room == room} - late):
                session.join(room, person, display_name=person)
            for persona_id, name in sorted({(t.persona, t.persona_name) for t in script if t.room == room}):
                session.join(room, persona_id, kind="persona", display_name=name)
        progress.set_description(mode)
        for turn in script:
            for person in turn.joins:  # someone joins mid-conversation
                session.join(turn.room, person, display_name=person)
            kwargs: dict[str, Any] = {"persona": turn.persona, "room": turn.room, "speaker": turn.speaker}
            if turn.kind == "audio":
                kwargs["audio"] = clips[turn.seq]
            else:
                kwargs["text"] = turn.text
            if speaks and run.options.audio:  # --no-audio: text in, text out (no TTS)
                kwargs["audio_sink"] = _played
            turn_started = time.perf_counter()
            result = session.turn(**kwargs)
            elapsed_ms = (time.perf_counter() - turn_started) * 1000
            _follow_server(run)
            record = _record(mode, turn, result.report, elapsed_ms, run)
            run.records.append(record)
            sink.write(record.model_dump_json() + "\n")
            sink.flush()
            progress.set_postfix(processed=record.prompt_tokens_processed, e2e_ms=round(record.e2e_ms), refresh=False)
            progress.update(1)
    run.wall_s[mode] = round(time.perf_counter() - started, 2)


def _follow_server(run: _Run) -> None:
    """Note the server's peak memory so far, and follow it to its new process when it restarted (a growing KV pool
    or an adapter page-in restarts it); the old process's peak was noted after the turn before."""
    if run.server is None:
        return
    pid = run.server.status().get("pid")
    if pid and pid != run.server_pid:
        run.server_pid = pid
    run.peaks.append(_peak_rss_mb(run.server_pid) or 0.0)


def _preload_adapters(server: Any, recipe: Any) -> str:
    """Page every persona's adapters in before the clock starts (one restart), so the run measures turns only."""
    from turnflow.adapters import AdapterRegistry, resolve_base, resolve_set
    from turnflow.server import LoraFile

    registry, base = AdapterRegistry(), resolve_base(server.spec.model or "generated:tiny")[0]
    needed: dict[str, LoraFile] = {}
    for persona_id in recipe.personas or ():
        voice, skills = find_persona(recipe, persona_id).adapter_refs
        for adapter in resolve_set(voice, skills, registry, base).loras:
            needed[adapter.key] = LoraFile(adapter.key, adapter.id, str(adapter.path))
    lease = server.lease(list(needed.values()))
    lease.release()
    return str(lease.url)


def _played(audio: Any) -> None:
    """Where the bench plays the replies' audio: nowhere (time to first audio is what it measures)."""


def run_bench(options: BenchOptions) -> BenchSummary:
    """Run both modes on one server and write the raw data, the summary and the plots to the output folder."""
    from tqdm import tqdm

    from turnflow.server import EmbeddedServer

    created = datetime.now(UTC)
    out = Path(options.out or Path("bench-runs") / created.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(options, out)
    notes: list[str] = []
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    modes: list[Mode] = ["turnflow", *(m for m in BASELINES if m in options.baselines)]

    audio = options.audio and voice_path_available()
    if options.audio and not audio:
        notes.append("audio turns skipped: Session.turn does not take audio= in this build (voice path missing)")
    if audio and shutil.which("espeak-ng") is None:
        audio = False
        notes.append("audio turns skipped: espeak-ng (which speaks the people's lines) is not installed")
    ctx_per_slot = context_per_slot(options)
    spec = backend_spec(options, ctx_per_slot=ctx_per_slot, audio=audio)

    stopped: str | None = None
    with _turnflow_home(out / "home"), _exit_on_sigterm():
        server = EmbeddedServer(BACKEND_NAME, spec) if spec.kind == "embedded" else None
        try:
            url = server.up() if server else str(spec.url)
            recipe_path = write_recipe_folder(out / "recipe", options, spec, url, ctx_per_slot)
            recipe = load_recipe(recipe_path)
            if server:
                url = _preload_adapters(server, recipe)
                run.server, run.server_pid = server, server.status().get("pid")
            names = [(pid, find_persona(recipe, pid).name) for pid in recipe.personas or ()]
            script = conversation_script(names, options.turns, audio=audio, rooms=options.rooms, joins=options.joins)
            clips = _speak_script(script) if audio else {}
            with (
                open(out / "turns.jsonl", "w", encoding="utf-8") as sink,
                tqdm(
                    total=len(script) * len(modes), unit="turn", file=sys.stderr, disable=not options.progress,
                    dynamic_ncols=True,
                ) as progress,
            ):
                for index, mode in enumerate(modes):
                    try:
                        if server and index:  # every mode starts cold: no slot, host cache or saved KV of another
                            _follow_server(run)
                            server.down()
                            shutil.rmtree(server.slot_dir, ignore_errors=True)
                            server.up()
                            url = _preload_adapters(server, recipe)
                            run.server_pid = server.status().get("pid")
                        _run_mode(mode, recipe_path, script, clips, run, progress, sink)
                    except (KeyboardInterrupt, SystemExit) as stop:
                        if not index:  # turnflow's own mode unfinished: nothing to compare
                            raise
                        done = sum(1 for r in run.records if r.mode == mode)
                        how = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
                        stopped = (f"stopped ({how}) during the {mode} mode after {done} of {len(script)} turns: "
                                   f"that mode is left out of this summary (its turns are in turns.jsonl)"
                                   + (f", and {', '.join(modes[index + 1:])} did not run" if modes[index + 1:]
                                      else ""))
                        run.records = [r for r in run.records if r.mode != mode]
                        break
            server_peak = max([_peak_rss_mb(run.server_pid) or 0.0, *run.peaks]) or None
        finally:
            if server:
                server.down()

    notes.append(
        "modes run one after another on one server configuration, restarted cold between modes (its slots, host "
        "prompt cache and saved KV files cleared), so no mode inherits another's cache; latencies include whatever "
        "else the machine was doing (see load_average)"
    )
    unreported = {mode: sum(not r.usage_reported for r in run.records if r.mode == mode) for mode in modes}
    if any(unreported.values()):
        notes.insert(0, "turns whose prompt counts the server did not report (left out of token totals and ratios): "
                        + ", ".join(f"{mode} {n}" for mode, n in unreported.items() if n)
                        + "; the modes' token totals cover different turns")
    notes.extend(run.warnings[:20])
    if stopped:
        notes.insert(0, stopped)
    server_info = {
        "url": url,
        "embedded": server is not None,
        "model": spec.model if server else None,
        "mmproj": spec.mmproj,
        "slots": spec.slots if server else None,
        "ctx_per_slot": ctx_per_slot if server else None,
        "kv_cache_type": spec.kv_cache_type if server else None,
        "cache_ram_mb": spec.cache_ram_mb,
        "kv_paging": spec.kv_paging is not False if server else False,
        "pid": run.server_pid,
    }
    summary = summarise(
        options,
        run.records,
        out=run.out,
        mode_wall_s=run.wall_s,
        turnflow_rss_mb=rss_mb() or 0.0,
        created=created,
        wall_s=time.perf_counter() - started,
        server=server_info,
        server_peak_mb=server_peak,
        load={"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        notes=notes,
    )
    summary.stopped = stopped
    summary.files = {
        "turns": str(out / "turns.jsonl"),
        "summary_json": str(out / "summary.json"),
        "summary_md": str(out / "summary.md"),
        "recipe": str(out / "recipe" / "bench.yaml"),
    }
    return _write_report(summary, run.records, out)


def _write_report(summary: BenchSummary, records: Sequence[TurnRecord], out: Path) -> BenchSummary:
    """Draw the plots and write `summary.json` and `summary.md` into `out`."""
    summary.plots = write_plots(records, summary, out)
    (out / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown_report(summary), encoding="utf-8")
    return summary


def rebuild_report(out: Path) -> BenchSummary:
    """Re-write an earlier run's summary, table and plots from its `turns.jsonl` (with this turnflow's metrics).

    What was measured stays as it was: the per-turn records, the server, the load and the wall times.
    """
    try:
        before = BenchSummary.model_validate_json((out / "summary.json").read_text(encoding="utf-8"))
        with open(out / "turns.jsonl", encoding="utf-8") as lines:
            records = [TurnRecord.model_validate_json(line) for line in lines if line.strip()]
    except (OSError, ValueError) as error:
        raise ValueError(f"{out}: not a finished bench run (summary.json and turns.jsonl): {error}") from error
    records, upgraded = _paging_apart(records)
    if upgraded and not any(note.startswith(_PAGING_NOTE) for note in before.notes):
        before = before.model_copy(update={"notes": [
            *before.notes, f"{_PAGING_NOTE}: the kv node's time taken out of turnflow's own time on {upgraded} turns "
            "that restored or saved KV (recorded before KV paging was counted apart, as timings_ms.kv_page)"]})
    finished = {name for name, m in before.modes.items() if m.wall_s} or set(MODES)  # a stopped run's finished modes
    by_mode = {mode: [r for r in records if r.mode == mode and mode in finished] for mode in MODES}
    walls = {name: m.wall_s for name, m in before.modes.items()} or {
        "turnflow": before.turnflow.wall_s, "naive": before.naive.wall_s}
    modes = {mode: summarise_mode(rows, walls.get(mode, 0.0)) for mode, rows in by_mode.items() if rows}
    tf = modes["turnflow"]
    naive = modes.get("naive") or summarise_mode([], 0.0)
    summary = before.model_copy(
        update={
            "turnflow": tf,
            "naive": naive,
            "ratio_processed": _ratio(naive.prompt_tokens_processed, tf.prompt_tokens_processed),
            "ratio_processed_all_turns": _ratio(naive.prompt_tokens_processed_all, tf.prompt_tokens_processed_all),
            "modes": modes,
            "baselines": {mode: baseline_row(m, tf) for mode, m in modes.items() if mode != "turnflow"},
            "kv": kv_block(by_mode["turnflow"], before.server),
            "kv_arithmetic": kv_arithmetic(by_mode["turnflow"]),
            "out": str(out),
        }
    )
    return _write_report(summary, records, out)


_PAGING_NOTE = "rebuilt"


def _paging_apart(records: list[TurnRecord]) -> tuple[list[TurnRecord], int]:
    """Records made before KV paging was counted apart from turnflow's own time (no `kv_page_ms` in them), as
    today's turns report them: on a turn that restored or saved KV, the kv node's time is the server's paging.
    Returns the records and how many changed."""
    upgraded = 0
    out = []
    for record in records:
        paged = record.kv_restore_ms is not None or record.kv_saved_bytes
        page_ms = record.node_ms.get("kv", 0.0)
        if "kv_page_ms" in record.model_fields_set or not paged or not page_ms or record.turnflow_ms is None:
            out.append(record)
            continue
        upgraded += 1
        out.append(record.model_copy(update={"kv_page_ms": round(page_ms, 2),
                                             "turnflow_ms": round(record.turnflow_ms - page_ms, 2)}))
    return out, upgraded


def _peak_rss_mb(pid: int | None) -> float | None:
    """Peak resident memory (VmHWM) of a running process, in MB."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


