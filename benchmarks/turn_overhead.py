"""turnflow's own work per turn: everything but the model, STT and TTS, measured over consecutive turns.

    .venv/bin/python benchmarks/turn_overhead.py [--history 100] [--prompt-tokens 14000] [--turns 60]
                                                 [--max-tokens 24] [--json FILE] [--profile FILE]
                                                 [--instant-model [--idle-ms MS [--spin]]]

Runs a conversation on an embedded llama-server with the generated `tiny` model (started in a throw-away
TURNFLOW_HOME and stopped afterwards) with the bench's recipe: the voice-chat example padded to
`--prompt-tokens` of invariant text. Each of two personas talks in its own room, whose history is first
seeded with `--history` messages. Prints p50/p95 of the per-turn overhead (`timings_ms.turnflow`, the turn's
total minus the model stream, STT, TTS, adapter page-ins and KV paging, plus `timings_ms.setup`, the route and
DAG lookup before it), the part of it before the model request (`timings_ms.turnflow_before_model` plus setup: what
delays the reply), and of each node. Target: p50 <= 1 ms.

Also prints how much colder this machine's caches are at the start of a turn than in a loop: a fixed piece of
work (a dict walk, a JSON encoding, a SHA-256) timed back to back and timed after 0.3 s of waiting. On a shared
virtual machine the host empties the caches within ~0.1 s, so per-turn work costs several times what a loop shows.

`--instant-model` is a diagnostic: the model's stream is replaced by a short reply made in-process at once (the
server still starts, holds the slots and the KV), so nothing evicts the caches between a turn's work before and
after its stream. The difference from a normal run is what the model's computation costs turnflow's own work in
cache refills on this machine; the target is measured by a normal run. With `--idle-ms`, the instant reply comes
after that many milliseconds of waiting (blocked, as a turn waits for its model, but with no computation anywhere),
or of spinning on the CPU with `--spin`: what the wait alone costs, apart from what the model's computation does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXTERNAL_NODES = ("speech", "transcript", "voice_fingerprint")
"""The nodes whose time is the model stream, STT and TTS (`timings_ms.turnflow` leaves them out)."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values (nearest rank)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _reference_work(table: dict[str, int]) -> float:
    """Microseconds for one fixed piece of work of the kinds a turn does."""
    started = time.perf_counter_ns()
    total = sum(table[key] for key in table)
    hashlib.sha256(json.dumps([total, table], sort_keys=True).encode()).hexdigest()
    return (time.perf_counter_ns() - started) / 1000


def cache_coldness(samples: int = 20, wait_s: float = 0.3) -> dict[str, float]:
    """The reference work's p50 back to back (warm) and after `wait_s` of waiting (as at a turn's start)."""
    table = {f"key-{i}": i for i in range(200)}
    warm, cold = [], []
    for _ in range(samples):
        time.sleep(wait_s)
        cold.append(_reference_work(table))
        warm.append(min(_reference_work(table) for _ in range(5)))
    warm_us, cold_us = statistics.median(warm), statistics.median(cold)
    return {"warm_us": round(warm_us, 1), "after_wait_us": round(cold_us, 1), "wait_s": wait_s,
            "factor": round(cold_us / warm_us, 1)}


def seed_history(session: Any, room: str, persona: str, persona_name: str, messages: int) -> None:
    """Give `room` a history of `messages` messages (a person and `persona` taking turns), as turns commit them."""
    from turnflow.store import Participant

    person = Participant("Dana", "person", "Dana")
    who = Participant(persona, "persona", persona_name)
    for turn in range(1, messages // 2 + 1):
        said = f"Dana: question {turn}: what should we look at next about the release and its migration?"
        reply = f"Reply {turn}: look at the migration's rollback plan first, then the flaky pipeline, then the demo."
        session.store.commit_turn(room, turn, person, said, said, who, reply)


def main() -> None:
    """Run the turns and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=100, help="messages in each room before the timed turns")
    parser.add_argument("--prompt-tokens", type=int, default=14000, help="the prompt's size at the first turn")
    parser.add_argument("--turns", type=int, default=60, help="timed turns (after 4 warm-up turns)")
    parser.add_argument("--max-tokens", type=int, default=24,
                        help="reply length: the model's time between a turn's work before and after its stream")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the timed turns to this file")
    parser.add_argument("--instant-model", action="store_true",
                        help="diagnostic: an in-process reply made at once instead of the model's stream")
    parser.add_argument("--idle-ms", type=float, default=0.0,
                        help="with --instant-model: the reply comes after this long (no computation meanwhile)")
    parser.add_argument("--spin", action="store_true",
                        help="with --idle-ms: spin on the CPU for that long instead of waiting blocked")
    parser.add_argument("--own-core", action="store_true",
                        help="pin the model server to CPU 0 and turnflow to the other cores (needs 2 or more)")
    args = parser.parse_args()
    if (args.idle_ms or args.spin) and not args.instant_model:
        parser.error("--idle-ms and --spin go with --instant-model")
    if args.spin and not args.idle_ms:
        parser.error("--spin needs --idle-ms")
    with tempfile.TemporaryDirectory(prefix="turnflow-overhead-") as home:
        os.environ["TURNFLOW_HOME"] = home
        from turnflow.bench.fixture import BenchOptions, backend_spec, context_per_slot, write_recipe_folder
        from turnflow.recipe import find_persona, load_recipe
        from turnflow.server import EmbeddedServer
        from turnflow.session import Session

        options = BenchOptions.preset(personas=2, turns=args.history // 2 + args.turns + 4,
                                      prompt_tokens=args.prompt_tokens, model="tiny", audio=False,
                                      max_tokens=args.max_tokens)
        spec = backend_spec(options, ctx_per_slot=context_per_slot(options), audio=False)
        server = EmbeddedServer("bench", spec)
        try:
            url = server.up()
            if args.own_core:  # the model server on CPU 0, turnflow on the others: as with a GPU, they do not share
                pid = server.status().get("pid")
                if pid:
                    os.sched_setaffinity(pid, {0})
                os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
            recipe_path = write_recipe_folder(Path(home) / "recipe", options, spec, url, context_per_slot(options))
            recipe = load_recipe(recipe_path)
            personas = list(recipe.personas or ())
            with Session(recipe, backend="bench", state_dir=Path(home) / "state") as session:
                for persona in personas:
                    room = f"room-{persona}"
                    session.join(room, "Dana")
                    session.join(room, persona, kind="persona", display_name=find_persona(recipe, persona).name)
                    seed_history(session, room, persona, find_persona(recipe, persona).name, args.history)
                with instant_model(args.idle_ms, spin=args.spin) if args.instant_model else nullcontext():
                    results = run_turns(session, personas, args.turns, args.profile)
        finally:
            server.down()
    results["coldness"] = cache_coldness()
    report(results, args)


@contextmanager
def instant_model(idle_ms: float = 0.0, *, spin: bool = False) -> Iterator[None]:
    """Replace every model stream with a three-piece reply made in-process, at once or after `idle_ms` of waiting
    (blocked, or spinning with `spin`)."""
    from turnflow.nodes import llm

    def run(self: llm.ReplyStream) -> Iterator[llm.Delta]:
        reply, self.started_at = self.reply, time.perf_counter()
        if spin:
            until = self.started_at + idle_ms / 1000
            while time.perf_counter() < until:
                pass
        elif idle_ms:
            time.sleep(idle_ms / 1000)
        reply.ttft_ms = 0.0
        for piece in ("Look at ", "the rollback plan ", "first."):
            self.streamed_chars += len(piece)
            yield llm.Delta(piece, "")
        reply.text, reply.finish_reason = "Look at the rollback plan first.", "stop"
        reply.completion_tokens = 8  # the prompt was not sent: its counts stay unknown
        reply.total_ms = (time.perf_counter() - self.started_at) * 1000

    real = llm.ReplyStream._run
    llm.ReplyStream._run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        llm.ReplyStream._run = real  # type: ignore[method-assign]


def run_turns(session: Any, personas: list[str], turns: int, profile: Path | None) -> dict[str, Any]:
    """Run 4 warm-up turns, then `turns` timed ones; the per-turn overhead, per-node times and prompt sizes."""
    import cProfile

    overheads: list[float] = []
    before_model: list[float] = []
    nodes: dict[str, list[float]] = {}
    prompt_tokens: list[int] = []
    model_ms: list[float] = []
    history: list[int] = []
    profiler = cProfile.Profile() if profile else None
    for i in range(turns + 4):
        persona = personas[i % len(personas)]
        room = f"room-{persona}"
        timed = i >= 4  # the first turns warm the composition cache and the model server
        if profiler and timed:
            profiler.enable()
        result = session.turn(persona=persona, room=room, speaker="Dana", text=f"Question number {i}?")
        if profiler and timed:
            profiler.disable()
        if not timed:
            continue
        timings = result.report["timings_ms"]
        overheads.append(timings["turnflow"] + timings["setup"])  # the route and DAG lookup before the turn too
        before_model.append(timings["turnflow_before_model"] + timings["setup"])
        for name, ms in timings["nodes"].items():
            nodes.setdefault(name, []).append(ms)
        prompt_tokens.append(result.report["llm"]["prompt_tokens"] or 0)
        model_ms.append(timings["model"])
        history.append(len(session.store.room(room).messages))
    if profiler and profile:
        profiler.dump_stats(str(profile))
    return {"overheads": overheads, "before_model": before_model, "nodes": nodes, "prompt_tokens": prompt_tokens,
            "model_ms": model_ms, "history": history}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the table (and write the JSON)."""
    overheads, nodes = results["overheads"], results["nodes"]
    own = {name: values for name, values in nodes.items() if name not in EXTERNAL_NODES}
    summary = {
        "turns": len(overheads),
        "history_messages": [min(results["history"]), max(results["history"])],
        "prompt_tokens_p50": None if args.instant_model else statistics.median(results["prompt_tokens"]),
        "model_ms_p50": round(statistics.median(results["model_ms"]), 1),
        "turnflow_ms": {"p50": round(statistics.median(overheads), 3), "p95": round(percentile(overheads, 95), 3),
                        "max": round(max(overheads), 3)},
        "before_model_ms": {"p50": round(statistics.median(results["before_model"]), 3),
                            "p95": round(percentile(results["before_model"], 95), 3)},
        "nodes_ms": {name: {"p50": round(statistics.median(v), 3), "p95": round(percentile(v, 95), 3)}
                     for name, v in sorted(own.items(), key=lambda kv: -statistics.median(kv[1]))},
        "cache_coldness": results["coldness"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu": os.cpu_count(),
    }
    if args.instant_model:
        wait = (f" after {args.idle_ms:g} ms of {'spinning' if args.spin else 'waiting'}" if args.idle_ms
                else " at once")
        print(f"with --instant-model: the model's stream replaced by a reply made{wait} (a diagnostic)")
    prompt = "" if args.instant_model else f"prompt p50 {summary['prompt_tokens_p50']:.0f} tokens, "
    print(f"turnflow's own work per turn over {summary['turns']} turns (model, STT and TTS excluded); "
          f"{prompt}history {summary['history_messages'][0]}-{summary['history_messages'][1]} messages:")
    t = summary["turnflow_ms"]
    print(f"  p50 {t['p50']:.3f} ms   p95 {t['p95']:.3f} ms   max {t['max']:.3f} ms   (target p50 <= 1 ms)")
    b = summary["before_model_ms"]
    print(f"  of it before the model request (what delays the reply): p50 {b['p50']:.3f} ms   p95 {b['p95']:.3f} ms; "
          "the rest (committing the turn, the report) comes after the reply")
    print("per node (p50 / p95 ms), the nodes the model stream, STT and TTS run in left out:")
    for name, v in summary["nodes_ms"].items():
        print(f"  {name:26s} {v['p50']:7.3f} / {v['p95']:7.3f}")
    c = summary["cache_coldness"]
    print(f"this machine: a fixed piece of work takes {c['warm_us']:.1f} us back to back and "
          f"{c['after_wait_us']:.1f} us after {c['wait_s']} s of waiting ({c['factor']}x): "
          "what a turn does once costs that much more than in a loop")
    print(f"load average {summary['load_average']}", file=sys.stderr)
    if args.json:
        options = {"history": args.history, "prompt_tokens": args.prompt_tokens, "turns": args.turns,
                   "max_tokens": args.max_tokens, "instant_model": args.instant_model, "idle_ms": args.idle_ms,
                   "spin": args.spin}
        args.json.write_text(json.dumps({"options": options, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
