"""The bench's PNG plots: tokens processed per turn (and cumulative), latency distributions, memory over the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from turnflow.bench.fixture import MODES
from turnflow.bench.summary import STEADY_FROM_TURN, BenchSummary, TurnRecord, _fmt_ms, _rooms_label

COLORS: dict[str, str] = {
    "turnflow": "#0f7b6c", "naive": "#d9603b", "append_only": "#7048e8", "no_pinning": "#1c7ed6",
    "no_composition_cache": "#f59f00", "no_ordering": "#c2255c",
}
"""One colour per mode, the same in every plot."""


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)


def _tick_ms(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"


def _human(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def write_plots(records: Sequence[TurnRecord], summary: BenchSummary, out: Path) -> dict[str, str]:
    """PNG plots: tokens processed per turn (and cumulative), latency distribution, memory over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.titleweight": "bold", "figure.dpi": 110})
    present_modes = [mode for mode in MODES if any(r.mode == mode for r in records)]
    by_mode = {mode: sorted((r for r in records if r.mode == mode), key=lambda r: r.seq) for mode in present_modes}
    plots: dict[str, str] = {}
    subtitle = (
        f"{summary.config['personas']} personas ({_rooms_label(summary.config['rooms'])}) · "
        f"{summary.config['turns']} turns each · "
        f"~{summary.prompt_tokens_first_turn / 1000:.1f}k-token prompts · {summary.server.get('model') or 'server'}"
    )

    # 1. tokens processed per turn, and cumulative
    fig, (ax, ax_sum) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    warm = [r.seq for r in by_mode["turnflow"] if not r.steady]
    last = max((r.seq for r in records), default=1)
    if warm:
        ax.axvspan(0.5, max(warm) + 0.5, color="#f2f2f2", zorder=0)
        label = f"warm-up: each persona's turns 1–{STEADY_FROM_TURN - 1}"
        if max(warm) > 0.25 * last:
            ax.text((max(warm) + 1) / 2, 0.02, label.replace(": ", ":\n"), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="#777777")
        else:
            ax.text(max(warm) + 0.01 * last, 0.02, "← " + label, transform=ax.get_xaxis_transform(),
                    ha="left", va="bottom", fontsize=8, color="#777777")
    tf_rows = by_mode["turnflow"]
    dense = len(tf_rows) > 40
    ax.plot([r.seq for r in tf_rows], [r.prompt_tokens for r in tf_rows], color="#9a9a9a", lw=1, ls="--",
            label="prompt size (tokens sent)")
    for mode in present_modes:
        rows = by_mode[mode]
        ax.plot([r.seq for r in rows], [max(1, r.prompt_tokens_processed) for r in rows], color=COLORS[mode],
                lw=1.3 if dense else 1.8, marker="o", ms=0 if dense else 3, label=f"{mode}: tokens processed")
        audio = [r for r in rows if r.kind == "audio"]
        if audio:
            ax.scatter([r.seq for r in audio], [max(1, r.prompt_tokens_processed) for r in audio],
                       s=9 if dense else 28, facecolors="none", edgecolors=COLORS[mode], lw=0.9, zorder=3)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("turn in the conversation" + (" (hollow rings: audio turns)" if summary.audio_turns else ""))
    ax.set_ylabel("prompt tokens (log scale)")
    ax.set_title("Prompt tokens the model server processed, per turn")
    ax.legend(frameon=False, loc="center right", fontsize=9)
    _style(ax)
    for mode in present_modes:
        rows = by_mode[mode]
        ax_sum.plot([r.seq for r in rows], np.cumsum([r.prompt_tokens_processed for r in rows]), color=COLORS[mode],
                    lw=2.2, label=mode)
        if rows:
            total = sum(r.prompt_tokens_processed for r in rows)
            ax_sum.annotate(_human(total), (rows[-1].seq, total), xytext=(4, 0), textcoords="offset points",
                            va="center", color=COLORS[mode], fontweight="bold")
    ax_sum.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax_sum.set_xlabel("turn in the conversation")
    ax_sum.set_title("Cumulative")
    ratio = summary.ratio_processed
    if ratio:
        ax_sum.text(0.04, 0.95, f"{ratio:,.0f}× fewer tokens processed\nin the steady state\n"
                    f"({summary.ratio_processed_all_turns or 0:,.1f}× over all turns)", transform=ax_sum.transAxes,
                    va="top", fontsize=9.5, color="#333333")
    ax_sum.margins(x=0.12)
    _style(ax_sum)
    fig.suptitle(subtitle, fontsize=9, color="#555555", y=0.995, x=0.01, ha="left")
    fig.tight_layout()
    plots["tokens"] = _save(fig, out / "tokens.png")

    # 2. latency distribution
    panels = [("e2e_ms", "End-to-end turn latency"), ("ttft_ms", "Time to first token")]
    if any(r.first_audio_ms is not None for r in records):
        panels.append(("first_audio_ms", "Time to first audio"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1, 4.6))
    rng = np.random.default_rng(0)
    for ax, (metric, title) in zip(np.atleast_1d(axes), panels, strict=True):
        data = [[getattr(r, metric) for r in by_mode[mode] if r.steady and getattr(r, metric) is not None]
                for mode in present_modes]
        positions = list(range(1, len(present_modes) + 1))
        present = [(p, d, m) for p, d, m in zip(positions, data, present_modes, strict=True) if d]
        if present:
            values = [v for _, d, _ in present for v in d]
            log = min(values) > 0 and max(values) / min(values) > 20
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            boxes = ax.boxplot([d for _, d, _ in present], positions=[p for p, _, _ in present], widths=0.5,
                               whis=(5, 95), showfliers=False, patch_artist=True, medianprops={"lw": 0})
            for box, (_, _, mode) in zip(boxes["boxes"], present, strict=True):
                box.set(facecolor=COLORS[mode], alpha=0.15, edgecolor=COLORS[mode])
            for line in boxes["whiskers"] + boxes["caps"]:
                line.set(color="#999999", lw=1)
            for position, data, mode in present:
                ax.scatter(position + rng.uniform(-0.14, 0.14, len(data)), data, s=10, color=COLORS[mode],
                           alpha=0.55, lw=0, zorder=3)
                median = float(np.median(data))
                ax.hlines(median, position - 0.25, position + 0.25, color=COLORS[mode], lw=2.5, zorder=4)
                ax.annotate(_fmt_ms(median), (position + 0.3, median), va="center", fontsize=9,
                            color=COLORS[mode], fontweight="bold")
            if not log:
                ax.set_ylim(bottom=0)
        ax.set_xticks(positions, [m.replace('_', ' ') for m in present_modes], rotation=20, fontsize=8)
        ax.set_xlim(0.4, len(present_modes) + 0.8)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_ms(v)))
        ax.set_title(title)
        _style(ax)
    fig.suptitle(f"Steady state (each persona's turns {STEADY_FROM_TURN}+); line = median, box = quartiles, "
                 "whiskers = 5th–95th percentile · " + subtitle,
                 fontsize=9, color="#555555", x=0.01, ha="left")
    fig.tight_layout()
    plots["latency"] = _save(fig, out / "latency.png")

    # 3. memory over the run
    fig, ax = plt.subplots(figsize=(10, 4.2))
    timeline = [r for mode in present_modes for r in by_mode[mode]]
    steps = list(range(1, len(timeline) + 1))
    if any(r.server_rss_mb is not None for r in timeline):
        server_mb = [np.nan if r.server_rss_mb is None else r.server_rss_mb for r in timeline]
        ax.plot(steps, server_mb, color="#3b5bdb", lw=2, label="model server")
    ax.plot(steps, [r.turnflow_rss_mb for r in timeline], color="#868e96", lw=2, ls="--", label="turnflow process")
    start = 0
    for mode in present_modes:
        stop = start + len(by_mode[mode])
        if start:
            ax.axvline(start + 0.5, color="#bbbbbb", lw=1)
        ax.text((start + stop + 1) / 2, 1.01, mode.replace("_", " "), transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", color=COLORS[mode], fontweight="bold", fontsize=8)
        start = stop
    ax.set_ylim(bottom=0)
    ax.set_xlabel("turn of the bench (one mode after another; the server restarts cold between modes)")
    ax.set_ylabel("resident memory (MB)")
    ax.legend(frameon=False, loc="lower right")
    _style(ax)
    ax.set_title("Resident memory", pad=18)
    if summary.server.get("embedded"):
        fig.text(0.01, -0.02, "The model server's memory includes llama-server's host prompt cache (--cache-ram, "
                 "8 GiB by default), which keeps the state of recent prompts and grows with every distinct one.",
                 fontsize=8, color="#666666", ha="left", va="top")
    fig.tight_layout()
    plots["memory"] = _save(fig, out / "memory.png")
    return plots


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return str(path)


def write_kv_sweep_plot(rows: Sequence[dict[str, Any]], path: Path) -> str:
    """Hit ratio and KV memory per persona count, one line per configuration (rows from `kv_sweep_row`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hit, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.6))
    configs = sorted({row["config"] for row in rows})
    palette = ("#0f7b6c", "#1c7ed6", "#d9603b", "#7048e8")
    for color, config in zip(palette, configs, strict=False):
        mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["personas"])
        xs = [r["personas"] for r in mine]
        ax_hit.plot(xs, [r["cache_hit_ratio"] or 0 for r in mine], marker="o", color=color, lw=2, label=config)
        ax_mem.plot(xs, [r["server_rss_mb"] or 0 for r in mine], marker="o", color=color, lw=2,
                    label=f"server RSS, {config}")
    first = sorted((r for r in rows if r["config"] == configs[0]), key=lambda r: r["personas"]) if configs else []
    if first:
        xs = [r["personas"] for r in first]
        ax_mem.plot(xs, [r["pool_mb"] or 0 for r in first], color="#333333", ls="--", marker="s",
                    label="KV pool allocated")
        ax_mem.plot(xs, [r["used_mb"] or 0 for r in first], color="#999999", ls=":", marker="s",
                    label="KV used at peak")
        ax_mem.plot(xs, [r["layout_mb"] or 0 for r in first], color="#c2255c", ls="-.", marker="x",
                    label="slots × ctx_per_slot layout")
    ax_hit.axhline(0.97, color="#bbbbbb", lw=1, ls="--")
    ax_hit.set_ylim(0, 1.02)
    ax_hit.set_xlabel("personas (a room each, on 4 slots)")
    ax_hit.set_ylabel("steady-state KV cache hit ratio")
    ax_hit.set_title("Cache hit ratio")
    ax_hit.legend(frameon=False, fontsize=8, loc="lower left")
    ax_mem.set_xlabel("personas")
    ax_mem.set_ylabel("MB")
    ax_mem.set_title("Memory")
    ax_mem.legend(frameon=False, fontsize=7)
    for ax in (ax_hit, ax_mem):
        ax.set_xticks(sorted({r["personas"] for r in rows}))
        _style(ax)
    fig.tight_layout()
    return _save(fig, path)
