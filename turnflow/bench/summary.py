"""The bench's records and summaries: one record per turn, each mode's totals, the side-by-side summary, and
its Markdown and console forms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from turnflow.bench.fixture import MODES, BenchOptions, Mode

KV_SOURCES = ("slot", "host-cache", "disk", "recomputed")

STEADY_FROM_TURN = 3
"""A persona's turns from this one on form the steady state that ratios and hit ratios are taken over."""


# --------------------------------------------------------------------------------------------- records


class TurnRecord(BaseModel):
    """Everything measured about one turn of one mode."""

    mode: Mode
    seq: int = Field(description="position of the turn in the scripted conversation, from 1")
    persona: str
    persona_turn: int = Field(description="the persona's n-th turn, from 1")
    room: str
    speaker: str
    kind: Literal["text", "audio"]
    steady: bool = Field(description=f"the persona's turn {STEADY_FROM_TURN} or later")
    slot: int | None
    prompt_tokens: int
    prompt_tokens_processed: int
    prompt_tokens_cached: int
    usage_reported: bool = Field(
        True, description="the server reported the turn's prompt counts (else the three counts above are 0 and the "
        "turn is left out of every token total and ratio)"
    )
    completion_tokens: int | None
    invariant_sha256: str
    route_audio_in: str
    route_audio_out: str
    stt_invocations: int
    tts_invocations: int
    llm_invocations: int
    ttft_ms: float | None
    first_audio_ms: float | None
    e2e_ms: float
    model_ms: float | None
    turnflow_ms: float | None
    node_ms: dict[str, float]
    composition_cache_hits: int
    composition_cache_misses: int
    tier_violations: int
    server_rss_mb: float | None
    turnflow_rss_mb: float
    reply_chars: int
    joined: bool = Field(False, description="someone joined the room just before this turn")
    kv_source: str | None = Field(None, description="where the prompt's KV came from (kv.source of the report)")
    kv_restore_ms: float | None = None
    kv_page_ms: float = Field(0.0, description="the kv node's time when it saved or restored KV (timings_ms.kv_page)")
    kv_saved_bytes: int = 0
    kv_pool_tokens: int | None = None
    kv_bytes_per_token: float | None = None
    server_prompt_ms: float | None = Field(None, description="the server's own prompt processing time")
    server_decode_ms_per_token: float | None = Field(
        None, description="the server's own time per generated token: how fast the machine ran this turn"
    )


class ModeSummary(BaseModel):
    """One mode's totals; the unsuffixed token counts are over the steady state (each persona's turns 3+)."""

    turns: int
    steady_turns: int
    audio_turns: int
    prompt_tokens: int
    prompt_tokens_processed: int
    prompt_tokens_cached: int
    cache_hit_ratio: float | None = Field(description="cached ÷ prompt tokens over the steady state")
    prompt_tokens_all: int
    prompt_tokens_processed_all: int
    prompt_tokens_cached_all: int
    cache_hit_ratio_all: float | None
    processed_per_turn_p50: float | None
    e2e_ms_p50: float | None
    e2e_ms_p90: float | None
    e2e_ms_p50_all: float | None
    ttft_ms_p50: float | None
    first_audio_ms_p50: float | None
    model_ms_p50: float | None
    server_decode_ms_per_token_p50: float | None = Field(
        None, description="steady state: the server's time per generated token, the machine's speed during the mode"
    )
    turnflow_overhead_ms_p50: float | None
    node_ms_p50: dict[str, float]
    new_tokens: int | None = Field(
        None, description="steady state: tokens new to each persona since its own last turn (others' messages, "
        "its last reply, the new question): what an ideal cache would still process"
    )
    reprocessed_tokens: int | None = Field(
        None, description="steady state: tokens processed beyond new_tokens, i.e. re-processed although the "
        "persona's slot had already seen them"
    )
    reprocessed_per_turn_p50: float | None = None
    composition_cache_hits: int
    composition_cache_misses: int
    composition_cache_hit_ratio: float | None
    stt_invocations: int
    stt_invocations_native: int
    tts_invocations: int
    llm_invocations: int
    tier_violations: int
    prefix_stable: bool
    wall_s: float
    join_turns: int = 0
    join_processed_p50: float | None = Field(None, description="tokens processed on the turns right after a join")
    kv_sources: dict[str, int] = Field(default_factory=dict, description="turns by kv.source")
    turns_without_usage: int = Field(
        0, description="turns whose prompt counts the server did not report (a reply cut by turnflow at a stop the "
        "server was not sent, on a server other than llama-server): left out of the token totals and ratios"
    )


class BenchSummary(BaseModel):
    """The bench's result: both modes side by side, with what they were run on."""

    created_at: str
    out: str
    wall_s: float
    config: dict[str, Any]
    server: dict[str, Any]
    ratio_processed: float | None = Field(description="naive ÷ turnflow prompt tokens processed, steady state")
    ratio_processed_all_turns: float | None
    steady_state_from_turn: int = STEADY_FROM_TURN
    prefix_stable: bool
    prefix_stable_by_persona: dict[str, bool]
    prompt_tokens_first_turn: float
    turnflow: ModeSummary
    naive: ModeSummary
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="each baseline's cache_hit_ratio, prompt_tokens_processed, ttft_ms_p50, e2e_ms_p50 (steady state)",
    )
    modes: dict[str, ModeSummary] = Field(default_factory=dict, description="every mode's full summary")
    kv: dict[str, Any] = Field(default_factory=dict, description="the turnflow run's KV memory")
    kv_arithmetic: dict[str, Any] = Field(default_factory=dict, description="a Qwen3-4B-class model at 6 x 8k")
    audio_turns: int
    stt_invocations_native: int
    tts_invocations: int
    server_rss_mb: float | None
    turnflow_rss_mb: float
    load_average: dict[str, list[float]]
    cpu_count: int
    notes: list[str]
    plots: dict[str, str]
    files: dict[str, str]
    stopped: str | None = Field(
        default=None, description="set when stopped (Ctrl-C, SIGTERM) after turnflow's mode: what it left out"
    )


def _load(summary: BenchSummary, when: str) -> str:
    """The 1-minute load average at the run's start or end, or '?' when it was not recorded."""
    values = summary.load_average.get(when)
    return f"{values[0]:.1f}" if values else "?"


def _percentile(values: Sequence[float | None], q: float) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.percentile(present, q)), 2) if present else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None



# --------------------------------------------------------------------------------------------- summary


def summarise_mode(records: Sequence[TurnRecord], wall_s: float) -> ModeSummary:
    """One mode's totals and distributions; token counts are over the turns whose counts the server reported."""
    counted = [r for r in records if r.usage_reported]
    steady_all = [r for r in records if r.steady]
    steady = [r for r in counted if r.steady]
    nodes = sorted({name for r in records for name in r.node_ms})
    node_p50 = {n: _percentile([r.node_ms.get(n) for r in records], 50) or 0.0 for n in nodes}
    hashes: dict[str, set[str]] = {}
    for r in records:
        hashes.setdefault(r.persona, set()).add(r.invariant_sha256)
    hits = sum(r.composition_cache_hits for r in records)
    misses = sum(r.composition_cache_misses for r in records)
    new_and_again = _new_and_reprocessed(records)

    def total(rows: Sequence[TurnRecord], name: str) -> int:
        return sum(int(getattr(r, name)) for r in rows)

    return ModeSummary(
        turns=len(records),
        steady_turns=len(steady_all),
        audio_turns=sum(r.kind == "audio" for r in records),
        prompt_tokens=total(steady, "prompt_tokens"),
        prompt_tokens_processed=total(steady, "prompt_tokens_processed"),
        prompt_tokens_cached=total(steady, "prompt_tokens_cached"),
        cache_hit_ratio=_ratio(total(steady, "prompt_tokens_cached"), total(steady, "prompt_tokens")),
        prompt_tokens_all=total(counted, "prompt_tokens"),
        prompt_tokens_processed_all=total(counted, "prompt_tokens_processed"),
        prompt_tokens_cached_all=total(counted, "prompt_tokens_cached"),
        cache_hit_ratio_all=_ratio(total(counted, "prompt_tokens_cached"), total(counted, "prompt_tokens")),
        processed_per_turn_p50=_percentile([r.prompt_tokens_processed for r in steady], 50),
        e2e_ms_p50=_percentile([r.e2e_ms for r in steady_all], 50),
        e2e_ms_p90=_percentile([r.e2e_ms for r in steady_all], 90),
        e2e_ms_p50_all=_percentile([r.e2e_ms for r in records], 50),
        ttft_ms_p50=_percentile([r.ttft_ms for r in steady_all], 50),
        first_audio_ms_p50=_percentile([r.first_audio_ms for r in steady_all], 50),
        model_ms_p50=_percentile([r.model_ms for r in steady_all], 50),
        server_decode_ms_per_token_p50=_percentile([r.server_decode_ms_per_token for r in steady_all], 50),
        turnflow_overhead_ms_p50=_percentile([r.turnflow_ms for r in steady_all], 50),
        node_ms_p50=dict(sorted(node_p50.items(), key=lambda item: -item[1])),
        new_tokens=sum(new for new, _ in new_and_again),
        reprocessed_tokens=sum(again for _, again in new_and_again),
        reprocessed_per_turn_p50=_percentile([again for _, again in new_and_again], 50),
        composition_cache_hits=hits,
        composition_cache_misses=misses,
        composition_cache_hit_ratio=_ratio(hits, hits + misses),
        stt_invocations=total(records, "stt_invocations"),
        stt_invocations_native=sum(r.stt_invocations for r in records if r.route_audio_in == "native"),
        tts_invocations=total(records, "tts_invocations"),
        llm_invocations=total(records, "llm_invocations"),
        tier_violations=total(records, "tier_violations"),
        prefix_stable=bool(hashes) and all(len(h) == 1 for h in hashes.values()),
        wall_s=wall_s,
        join_turns=sum(r.joined for r in records),
        join_processed_p50=_percentile([r.prompt_tokens_processed for r in counted if r.joined], 50),
        kv_sources={src: sum(r.kv_source == src for r in records) for src in KV_SOURCES},
        turns_without_usage=len(records) - len(counted),
    )


def baseline_row(mode: ModeSummary, turnflow: ModeSummary) -> dict[str, Any]:
    """A baseline's headline numbers, and how many times turnflow's steady-state tokens processed it needed."""
    return {
        "cache_hit_ratio": mode.cache_hit_ratio,
        "prompt_tokens_processed": mode.prompt_tokens_processed,
        "ttft_ms_p50": mode.ttft_ms_p50,
        "e2e_ms_p50": mode.e2e_ms_p50,
        "server_decode_ms_per_token_p50": mode.server_decode_ms_per_token_p50,
        "prompt_tokens_processed_all": mode.prompt_tokens_processed_all,
        "cache_hit_ratio_all": mode.cache_hit_ratio_all,
        "join_processed_p50": mode.join_processed_p50,
        "ratio_processed": _ratio(mode.prompt_tokens_processed, turnflow.prompt_tokens_processed),
        "turns": mode.turns,
        "turns_without_usage": mode.turns_without_usage,
    }


def tokens_in_slots(records: Sequence[TurnRecord]) -> list[int]:
    """After each turn (in order), the KV tokens the slots hold: each slot's last prompt and reply."""
    held: dict[int, int] = {}
    totals = []
    for r in sorted(records, key=lambda r: r.seq):
        if r.slot is not None and r.usage_reported:  # else what the slot holds is not known: as before
            held[r.slot] = r.prompt_tokens + (r.completion_tokens or 0)
        totals.append(sum(held.values()))
    return totals


def kv_block(records: Sequence[TurnRecord], server: dict[str, Any]) -> dict[str, Any]:
    """The turnflow run's KV memory: bytes per token, the pool allocated vs used, restores, and where KV came from."""
    if not records:
        return {}
    per_token = next((r.kv_bytes_per_token for r in records if r.kv_bytes_per_token), None)
    pool = max((r.kv_pool_tokens or 0 for r in records), default=0)
    used = max(tokens_in_slots(records), default=0)
    slots, ctx = server.get("slots"), server.get("ctx_per_slot")
    layout = slots * ctx if slots and ctx else None

    def mb(tokens: int | None) -> float | None:
        return round(tokens * per_token / 1e6, 1) if tokens and per_token else None

    return {
        "bytes_per_token": per_token,
        "pool_tokens_allocated": pool or None,
        "tokens_used_peak": used or None,
        "allocated_over_used": _ratio(pool, used) if pool and used else None,
        "restore_ms_p50": _percentile([r.kv_restore_ms for r in records if r.kv_source == "disk"], 50),
        "page_ms_p50": _percentile([r.kv_page_ms for r in records if r.kv_page_ms], 50),
        "sources": {src: sum(r.kv_source == src for r in records) for src in KV_SOURCES},
        "saved_bytes": sum(r.kv_saved_bytes for r in records),
        "pool_mb": mb(pool),
        "used_mb": mb(used),
        "slots_x_ctx_per_slot_tokens": layout,
        "slots_x_ctx_per_slot_mb": mb(layout),
        "slots": slots,
        "ctx_per_slot": ctx,
    }


def kv_arithmetic(records: Sequence[TurnRecord]) -> dict[str, Any]:
    """What a Qwen3-4B-class model needs at 6 personas x 8k tokens (f16 and q8_0), beside our model's measured
    bytes per token."""
    from turnflow.kv import reference_arithmetic

    measured = next((r.kv_bytes_per_token for r in records if r.kv_bytes_per_token), None)
    return {**reference_arithmetic(6, 8192), "bench_model_bytes_per_token": measured}


def _new_and_reprocessed(records: Sequence[TurnRecord]) -> list[tuple[int, int]]:
    """Per steady-state turn: (tokens new to the persona since its last turn, tokens processed beyond those).

    New = this prompt's length minus the persona's previous prompt and reply: what the others said in the
    meantime, the persona's own reply as it went into the history, the new question and the volatile tail.
    """
    seen: dict[str, int] = {}
    counts: list[tuple[int, int]] = []
    for r in sorted(records, key=lambda r: r.seq):
        if not r.usage_reported:  # its length is unknown: the persona's next turn is not counted either
            seen.pop(r.persona, None)
            continue
        before = seen.get(r.persona)
        if before is not None and r.steady:
            new = max(0, r.prompt_tokens - before)
            counts.append((new, max(0, r.prompt_tokens_processed - new)))
        seen[r.persona] = r.prompt_tokens + (r.completion_tokens or 0)
    return counts


def summarise(
    options: BenchOptions,
    records: Sequence[TurnRecord],
    *,
    out: Path,
    mode_wall_s: dict[str, float],
    turnflow_rss_mb: float,
    created: datetime,
    wall_s: float,
    server: dict[str, Any],
    server_peak_mb: float | None,
    load: dict[str, list[float]],
    notes: list[str],
) -> BenchSummary:
    """Both modes side by side."""
    by_mode = {mode: [r for r in records if r.mode == mode] for mode in MODES}
    modes: dict[str, ModeSummary] = {
        mode: summarise_mode(by_mode[mode], mode_wall_s.get(mode, 0.0)) for mode in MODES if by_mode[mode]
    }
    tf, naive = modes["turnflow"], modes.get("naive") or summarise_mode([], 0.0)
    stable: dict[str, bool] = {}
    for r in by_mode["turnflow"]:
        stable.setdefault(r.persona, True)
    for persona in stable:
        stable[persona] = len({r.invariant_sha256 for r in by_mode["turnflow"] if r.persona == persona}) == 1
    first_turns = [r.prompt_tokens for r in by_mode["turnflow"] if r.persona_turn == 1]
    server_rss = [r.server_rss_mb for r in records if r.server_rss_mb is not None]
    peak = max([*server_rss, *([server_peak_mb] if server_peak_mb else [])], default=None)
    if tf.audio_turns == 0:
        notes = [*notes, "audio_turns: 0 — time to first audio and STT/TTS counts cover text turns only"]
    notes.append(
        f"ratio_processed and cache_hit_ratio are over each persona's turns {STEADY_FROM_TURN}+ (its first turns "
        f"fill its slot); ratio_processed_all_turns counts every turn"
    )
    return BenchSummary(
        created_at=created.isoformat(timespec="seconds"),
        out=str(out),
        wall_s=round(wall_s, 1),
        config={
            "personas": options.personas,
            "turns": options.turns,
            "prompt_tokens": options.prompt_tokens,
            "quick": options.quick,
            "model": options.model if not options.backend_url else None,
            "backend_url": options.backend_url,
            "rooms": options.rooms,
            "audio": options.audio,
        },
        server=server,
        ratio_processed=_ratio(naive.prompt_tokens_processed, tf.prompt_tokens_processed),
        ratio_processed_all_turns=_ratio(naive.prompt_tokens_processed_all, tf.prompt_tokens_processed_all),
        prefix_stable=bool(stable) and all(stable.values()),
        prefix_stable_by_persona=stable,
        prompt_tokens_first_turn=round(float(np.mean(first_turns)), 1) if first_turns else 0.0,
        turnflow=tf,
        naive=naive,
        baselines={mode: baseline_row(m, tf) for mode, m in modes.items() if mode != "turnflow"},
        modes=modes,
        kv=kv_block(by_mode["turnflow"], server),
        kv_arithmetic=kv_arithmetic(by_mode["turnflow"]),
        audio_turns=tf.audio_turns + naive.audio_turns,
        stt_invocations_native=tf.stt_invocations_native + naive.stt_invocations_native,
        tts_invocations=tf.tts_invocations + naive.tts_invocations,
        server_rss_mb=peak,
        turnflow_rss_mb=max((r.turnflow_rss_mb for r in records), default=turnflow_rss_mb),
        load_average=load,
        cpu_count=os.cpu_count() or 0,
        notes=notes,
        plots={},
        files={},
    )


def _fmt_int(value: int | float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return ""
    return f"{numerator / denominator:,.1f}×"


def _rooms_label(rooms: str) -> str:
    return {"per-persona": "a room each", "shared": "one shared room"}.get(rooms, rooms)


def markdown_report(summary: BenchSummary) -> str:
    """The summary as Markdown: the headline table, turnflow's overhead per node, and the plots."""
    tf, nv = summary.turnflow, summary.naive
    c = summary.config
    rooms = _rooms_label(c["rooms"])
    model = summary.server.get("model") or summary.server.get("url")
    steady_ratio = _fmt_ratio(nv.prompt_tokens_processed, tf.prompt_tokens_processed)
    all_ratio = _fmt_ratio(nv.prompt_tokens_processed_all, tf.prompt_tokens_processed_all)
    ran_naive = nv.llm_invocations > 0
    lines = [
        f"# turnflow bench — {summary.created_at}",
        "",
        f"{c['personas']} personas ({rooms}), {c['turns']} turns each, ~{summary.prompt_tokens_first_turn:,.0f}-token "
        f"prompts at a persona's first turn; {tf.audio_turns} audio turns per mode. Model server: {model}, "
        f"{summary.server.get('slots') or '?'} slots. "
        f"{_modes_sentence(summary)} "
        f"Token counts are the server's own `timings`. Steady state = each persona's turns "
        f"{summary.steady_state_from_turn}+. {summary.cpu_count} CPU cores, load average "
        f"{_load(summary, 'start')} → {_load(summary, 'end')}; wall time "
        f"{_fmt_s(summary.wall_s)}.",
        "",
        "| | turnflow | naive | naive ÷ turnflow |",
        "| --- | ---: | ---: | ---: |",
        f"| prompt tokens processed, steady state | {_fmt_int(tf.prompt_tokens_processed)} | "
        f"{_fmt_int(nv.prompt_tokens_processed)} | **{steady_ratio}** |",
        f"| prompt tokens processed, all turns | {_fmt_int(tf.prompt_tokens_processed_all)} | "
        f"{_fmt_int(nv.prompt_tokens_processed_all)} | {all_ratio} |",
        f"| prompt tokens sent, all turns | {_fmt_int(tf.prompt_tokens_all)} | {_fmt_int(nv.prompt_tokens_all)} | |",
        f"| KV cache hit ratio (cached ÷ prompt), steady state | {tf.cache_hit_ratio or 0:.3f} | "
        f"{nv.cache_hit_ratio or 0:.3f} | |",
        f"| tokens processed per turn, p50 | {_fmt_int(tf.processed_per_turn_p50)} | "
        f"{_fmt_int(nv.processed_per_turn_p50)} | {_fmt_ratio(nv.processed_per_turn_p50, tf.processed_per_turn_p50)} |",
        f"| tokens new to the persona since its last turn, steady state | {_fmt_int(tf.new_tokens)} | "
        f"{_fmt_int(nv.new_tokens)} | |",
        f"| tokens re-processed although the slot had seen them, per turn p50 | "
        f"{_fmt_int(tf.reprocessed_per_turn_p50)} | {_fmt_int(nv.reprocessed_per_turn_p50)} | "
        f"{_fmt_ratio(nv.reprocessed_per_turn_p50, tf.reprocessed_per_turn_p50)} |",
        f"| end-to-end latency p50 / p90 | {_fmt_ms(tf.e2e_ms_p50)} / {_fmt_ms(tf.e2e_ms_p90)} | "
        f"{_fmt_ms(nv.e2e_ms_p50)} / {_fmt_ms(nv.e2e_ms_p90)} | {_fmt_ratio(nv.e2e_ms_p50, tf.e2e_ms_p50)} |",
        f"| time to first token p50 | {_fmt_ms(tf.ttft_ms_p50)} | {_fmt_ms(nv.ttft_ms_p50)} | "
        f"{_fmt_ratio(nv.ttft_ms_p50, tf.ttft_ms_p50)} |",
        f"| time to first audio p50 | {_fmt_ms(tf.first_audio_ms_p50)} | {_fmt_ms(nv.first_audio_ms_p50)} | "
        f"{_fmt_ratio(nv.first_audio_ms_p50, tf.first_audio_ms_p50)} |",
        f"| turnflow's own time per turn p50 | {_fmt_ms(tf.turnflow_overhead_ms_p50)} | "
        f"{_fmt_ms(nv.turnflow_overhead_ms_p50)} | |",
        f"| composition cache hits | {tf.composition_cache_hits:,} of "
        f"{tf.composition_cache_hits + tf.composition_cache_misses:,} | off | |",
        f"| STT / TTS / LLM calls | {tf.stt_invocations} / {tf.tts_invocations} / {tf.llm_invocations} | "
        f"{nv.stt_invocations} / {nv.tts_invocations} / {nv.llm_invocations} | |",
        f"| STT calls on turns the model heard natively | {tf.stt_invocations_native} | "
        f"{nv.stt_invocations_native} | |",
        f"| invariant prefix stable for every persona | {'yes' if tf.prefix_stable else 'NO'} | "
        f"{'yes' if nv.prefix_stable else 'no'} | |",
        f"| wall time of the mode | {_fmt_s(tf.wall_s)} | {_fmt_s(nv.wall_s)} | |",
        "",
    ]
    if not ran_naive:  # turnflow alone: its column only
        lines = [_first_cells(line, 2) if line.startswith("|") else line for line in lines]
    lines += [
        *_baselines_table(summary),
        *_kv_lines(summary),
        f"Model server resident memory, peak: {_fmt_int(summary.server_rss_mb)} MB (one server configuration); "
        f"turnflow process: {_fmt_int(summary.turnflow_rss_mb)} MB.",
        "",
        "Time per node of the turn DAG (p50 over the turnflow run). `speech` reads the model's stream and speaks it "
        "(model and TTS time), `transcript` is the STT bridge; the rest is turnflow's own work:",
        "",
        "| node | p50 |",
        "| --- | ---: |",
    ]
    for name, ms in list(tf.node_ms_p50.items())[:12]:
        lines.append(f"| `{name}` | {ms:.2f} ms |")
    if summary.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in summary.notes]
    if summary.plots:
        lines += [""] + [f"![{name}]({Path(path).name})" for name, path in summary.plots.items()]
    return "\n".join(lines) + "\n"


def _ran(summary: BenchSummary) -> dict[str, ModeSummary]:
    """The modes that ran, in the order they ran."""
    return {name: mode for name, mode in summary.modes.items() if mode.llm_invocations}


def _modes_sentence(summary: BenchSummary) -> str:
    """Which modes ran, in the order they ran."""
    ran = [f"`{name}`" for name in _ran(summary)]
    if len(ran) < 2:
        return "turnflow alone (no baselines)."
    return f"Modes {', '.join(ran)} on the same server configuration, one after the other."


def _decode_note(ms: float | None) -> str:
    """The server's time per generated token for a console line (how fast the machine ran), when known."""
    return "" if ms is None else f" (server {ms:.1f} ms per generated token)"


def _first_cells(row: str, count: int) -> str:
    """A Markdown table row cut to its first `count` cells."""
    return "|" + "|".join(row.split("|")[1:count + 1]) + "|"


def _baselines_table(summary: BenchSummary) -> list[str]:
    """Every mode side by side (steady state), with the turns right after someone joined."""
    ran = _ran(summary)
    if len(ran) < 2:
        return []
    lines = [
        "Every mode on the same server configuration (restarted cold between modes), steady state:",
        "",
        "| mode | cache hit ratio | prompt tokens processed | ÷ turnflow | TTFT p50 | e2e p50 "
        "| processed after a join, p50 | server ms per generated token, p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    tf = summary.modes.get("turnflow")
    for name, mode in ran.items():
        ratio = _fmt_ratio(mode.prompt_tokens_processed, tf.prompt_tokens_processed) if tf else ""
        decode = mode.server_decode_ms_per_token_p50
        lines.append(
            f"| `{name}` | {mode.cache_hit_ratio or 0:.3f} | {_fmt_int(mode.prompt_tokens_processed)} | {ratio} | "
            f"{_fmt_ms(mode.ttft_ms_p50)} | {_fmt_ms(mode.e2e_ms_p50)} | {_fmt_int(mode.join_processed_p50)} | "
            f"{'–' if decode is None else f'{decode:.1f}'} |"
        )
    lines.append("")
    speeds = [m.server_decode_ms_per_token_p50 for m in ran.values() if m.server_decode_ms_per_token_p50]
    if len(speeds) >= 2 and max(speeds) > 1.15 * min(speeds):
        lines += [
            f"The server took {min(speeds):.1f} to {max(speeds):.1f} ms per generated token depending on the mode "
            f"({max(speeds) / min(speeds) - 1:.0%} apart) with the same model and settings: the machine's speed "
            f"(or, over few turns, chance) differed, so TTFT and e2e differences of that size say nothing about the "
            f"modes. The token counts do.",
            "",
        ]
    return lines


def _kv_lines(summary: BenchSummary) -> list[str]:
    """The turnflow run's KV memory, and the Qwen3-4B arithmetic."""
    kv = summary.kv
    if not kv:
        return []
    sources = ", ".join(f"{k} {v}" for k, v in (kv.get("sources") or {}).items())
    lines = [
        f"KV (turnflow run): {_fmt_int(kv.get('bytes_per_token'))} bytes per token; pool allocated "
        f"{_fmt_int(kv.get('pool_tokens_allocated'))} tokens ({kv.get('pool_mb')} MB) vs used at peak "
        f"{_fmt_int(kv.get('tokens_used_peak'))} ({kv.get('used_mb')} MB), allocated ÷ used "
        f"{kv.get('allocated_over_used')}; the slots × ctx_per_slot layout would allocate "
        f"{_fmt_int(kv.get('slots_x_ctx_per_slot_tokens'))} tokens ({kv.get('slots_x_ctx_per_slot_mb')} MB). "
        f"Turns by KV source: {sources}; restore p50 {_fmt_ms(kv.get('restore_ms_p50'))} (the server's), "
        f"paging p50 {_fmt_ms(kv.get('page_ms_p50'))} (save, restore and checks, left out of turnflow's own time).",
        "",
    ]
    arithmetic = summary.kv_arithmetic
    if arithmetic:
        rows = arithmetic.get("by_cache_type") or {}
        lines += [
            f"{arithmetic['model']}, {arithmetic['personas']} personas × {arithmetic['tokens']:,} tokens "
            f"(weights ~{arithmetic['weights_gb']} GB):",
            "",
            "| KV type | bytes/token | KV sized to use | resident | KV at slots × 32k | resident |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *[f"| {t} | {r['bytes_per_token']:,} | {r['kv_gb_sized']} GB | {r['resident_gb_sized']} GB | "
              f"{r['kv_gb_full_slots']} GB | {r['resident_gb_full_slots']} GB |" for t, r in rows.items()],
            "",
        ]
    return lines


def console_report(summary: BenchSummary) -> str:
    """A few lines for the terminal: the headline numbers and where everything was written."""
    tf, nv = summary.turnflow, summary.naive
    plots = ", ".join(Path(p).name for p in summary.plots.values())
    vs = nv.llm_invocations > 0
    return "\n".join(
        [
            *([f"ratio_processed {summary.ratio_processed} (steady state; all turns: "
               f"{summary.ratio_processed_all_turns})"] if vs else []),
            f"cache_hit_ratio turnflow {tf.cache_hit_ratio}" + (f" | naive {nv.cache_hit_ratio}" if vs else ""),
            f"prompt tokens processed turnflow {tf.prompt_tokens_processed:,}"
            + (f" | naive {nv.prompt_tokens_processed:,}" if vs else ""),
            f"e2e p50 turnflow {_fmt_ms(tf.e2e_ms_p50)}{_decode_note(tf.server_decode_ms_per_token_p50)}"
            + (f" | naive {_fmt_ms(nv.e2e_ms_p50)}{_decode_note(nv.server_decode_ms_per_token_p50)}" if vs else ""),
            *[f"baseline {name}: hit {row['cache_hit_ratio']} processed {row['prompt_tokens_processed']:,} "
              f"ttft p50 {_fmt_ms(row['ttft_ms_p50'])} e2e p50 {_fmt_ms(row['e2e_ms_p50'])}"
              + _decode_note(row.get("server_decode_ms_per_token_p50"))
              for name, row in summary.baselines.items() if row.get("turns")],
            f"kv: {summary.kv}",
            f"prefix stable: {summary.prefix_stable}; server RSS peak {summary.server_rss_mb} MB; "
            f"wall {_fmt_s(summary.wall_s)}",
            *[f"note: {n}" for n in summary.notes],
            f"wrote {summary.out}/ (summary.md, summary.json, turns.jsonl, {plots})",
        ]
    )


