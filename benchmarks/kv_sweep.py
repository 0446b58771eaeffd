"""The KV sweep of issue #9: turnflow alone at 4, 8 and 14 personas on 4 slots, with the host cache off or on and
turnflow's paging on or off; writes `kv-sweep.json` and `kv-sweep.png` into the output folder, and each run's own
folder under `--runs` (default `<out>/kv-sweep-runs`).

    .venv/bin/python benchmarks/kv_sweep.py --out docs/bench [--model tiny] [--turns 3] [--prompt-tokens 1500]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from turnflow.bench.fixture import BenchOptions
from turnflow.bench.plots import write_kv_sweep_plot
from turnflow.bench.runner import run_bench

CONFIGS: dict[str, dict[str, Any]] = {
    "paging, host cache off": {"paging": True, "cache_ram_mb": 0},
    "paging, host cache on": {"paging": True, "cache_ram_mb": None},
    "no paging, host cache off": {"paging": False, "cache_ram_mb": 0},
    "no paging, host cache on": {"paging": False, "cache_ram_mb": None},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--personas", default="4,8,14")
    parser.add_argument("--max-tokens", type=int, help="reply length cap (default: the recipe's)")
    parser.add_argument("--runs", help="where each run's folder goes (default <out>/kv-sweep-runs)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an earlier, interrupted kv-sweep.json in --out; run only the missing")
    args = parser.parse_args()
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / "kv-sweep-runs"
    rows: list[dict[str, Any]] = []
    if args.resume and (out / "kv-sweep.json").is_file():
        rows = json.loads((out / "kv-sweep.json").read_text())
    done = {(row["personas"], row["config"]) for row in rows}
    for personas in [int(p) for p in args.personas.split(",")]:
        for config, switches in CONFIGS.items():
            if (personas, config) in done:
                continue
            folder = runs / f"p{personas}-{'paging' if switches['paging'] else 'nopaging'}-" \
                f"cache{'0' if switches['cache_ram_mb'] == 0 else 'on'}"
            options = BenchOptions.preset(
                personas=personas, slots=4, turns=args.turns, prompt_tokens=args.prompt_tokens, model=args.model,
                audio=False, baselines=(), out=folder, progress=False, max_tokens=args.max_tokens,
                **{k: v for k, v in switches.items() if v is not None},
            )
            summary = run_bench(options)
            kv = summary.kv
            rows.append({
                "personas": personas, "config": config, "prompt_tokens": summary.prompt_tokens_first_turn,
                "turns": args.turns, "cache_hit_ratio": summary.turnflow.cache_hit_ratio,
                "prompt_tokens_processed": summary.turnflow.prompt_tokens_processed,
                "server_rss_mb": summary.server_rss_mb, "pool_mb": kv.get("pool_mb"), "used_mb": kv.get("used_mb"),
                "layout_mb": kv.get("slots_x_ctx_per_slot_mb"),
                "allocated_over_used": kv.get("allocated_over_used"), "restore_ms_p50": kv.get("restore_ms_p50"),
                "wall_s": summary.wall_s,
                "kv": kv,
            })
            print(json.dumps(rows[-1]), flush=True)
            (out / "kv-sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_kv_sweep_plot(rows, out / "kv-sweep.png")


if __name__ == "__main__":
    main()
