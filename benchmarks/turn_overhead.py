"""turnflow's own work per turn: everything but the model call, measured over consecutive turns.

    .venv/bin/python benchmarks/turn_overhead.py [--turns 60] [--recipe recipes/voice-chat.yaml]

Runs a real conversation on the embedded `local` backend (started in a throw-away TURNFLOW_HOME and
stopped afterwards) and prints p50/p95 of the per-turn overhead (`timings_ms.turnflow` = total minus the
`reply` node, which is the model call) and of each node. Target: p50 <= 5 ms on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    """Run the turns and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "voice-chat.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="turnflow-overhead-") as home:
        os.environ["TURNFLOW_HOME"] = home
        import subprocess
        import sys

        from turnflow.server import EmbeddedServer
        from turnflow.session import Session

        bin_dir = Path(sys.executable).parent  # the example personas' adapters, as `make demo` adds them
        env = {**os.environ, "TURNFLOW": str(bin_dir / "turnflow"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        subprocess.run([str(REPO / "scripts" / "example-adapters.sh")], env=env, check=True, capture_output=True)
        session = Session(args.recipe)
        try:
            overheads: list[float] = []
            nodes: dict[str, list[float]] = {}
            personas = ["maya", "helper"]
            for i in range(args.turns):
                result = session.turn(persona=personas[i % 2], room="bench", text=f"Question number {i}?")
                timings = result.report["timings_ms"]
                if i >= 2:  # the first turns warm the composition cache and the model server
                    overheads.append(timings["turnflow"])
                    for name, ms in timings["nodes"].items():
                        nodes.setdefault(name, []).append(ms)
        finally:
            session.close()
            EmbeddedServer(session.backend_name, session._backend_spec).down()
    print(f"turnflow overhead per turn over {len(overheads)} turns (model call excluded):")
    print(f"  p50 {statistics.median(overheads):.2f} ms   p95 {percentile(overheads, 95):.2f} ms   "
          f"max {max(overheads):.2f} ms   (target p50 <= 5 ms)")
    print("per node (p50 / p95 ms):")
    for name, values in sorted(nodes.items(), key=lambda kv: -statistics.median(kv[1])):
        if name != "reply":
            print(f"  {name:26s} {statistics.median(values):7.3f} / {percentile(values, 95):7.3f}")


if __name__ == "__main__":
    main()
