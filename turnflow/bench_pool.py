"""`turnflow bench --backends N`: personas over a pool of embedded servers, placed three ways, one member killed.

Each placement runs the same conversation on freshly started members (cold KV): `rendezvous` (turnflow's: each
persona on its home member), and the baselines `random` and `round_robin` (per turn, whoever the persona). The
people speak in a shuffled order each round (the same order for every placement), as people do. Then the
rendezvous run is repeated with one member killed halfway through and started again before the last rounds:
turns lost, histories corrupted, personas re-warmed elsewhere (and the tokens that cost), personas back home.
`moved_fraction_on_add` is the fraction of the bench's personas a new member takes over: each persona is placed by a
Session on the pool as run and on the same pool with one more member (`pool-grown`, declared in the bench's
backends.yaml, never started); `moved_on_add` has the details (who moved, where, and the fraction over 10,000
synthetic ids).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from turnflow.bench.fixture import (
    BACKEND_NAME,
    BenchOptions,
    ScriptedTurn,
    backend_spec,
    context_per_slot,
    conversation_script,
    write_recipe_folder,
)
from turnflow.bench.runner import _exit_on_sigterm, _preload_adapters, _turnflow_home
from turnflow.placement import Strategy, home_member, placement_key
from turnflow.recipe import BackendSpec, find_persona, load_recipe
from turnflow.server import EmbeddedServer

POOL_NAME = "pool"
GROWN_POOL_NAME = "pool-grown"
"""The bench's pool with one more member: placement only (the new member is never started)."""
STRATEGIES: tuple[Strategy, ...] = ("rendezvous", "random", "round_robin")


def _members(count: int) -> list[str]:
    return [f"member-{i}" for i in range(count)]


def _shuffled_rounds(script: Sequence[ScriptedTurn], seed: int = 7) -> list[ScriptedTurn]:
    """The script with each round's speakers in a shuffled (seeded) order."""
    rng = random.Random(seed)
    rounds: dict[int, list[ScriptedTurn]] = {}
    for turn in script:
        rounds.setdefault(turn.persona_turn, []).append(turn)
    ordered: list[ScriptedTurn] = []
    for number in sorted(rounds):
        batch = list(rounds[number])
        rng.shuffle(batch)
        ordered.extend(batch)
    return ordered


def _write_pool(folder: Path, spec: BackendSpec, members: list[str]) -> None:
    member = spec.model_dump(mode="json", exclude_defaults=True)
    grown = [*members, _members(len(members) + 1)[-1]]
    backends = {name: dict(member) for name in grown}
    backends[POOL_NAME] = {"kind": "pool", "members": members, "recheck_s": 1.0}
    backends[GROWN_POOL_NAME] = {"kind": "pool", "members": grown, "recheck_s": 1.0}
    backends[BACKEND_NAME] = dict(member)  # the recipe's own backend (the bench runs it on the pool)
    (folder / "backends.yaml").write_text(json.dumps({"backends": backends}, indent=2))


def _start(servers: dict[str, EmbeddedServer], recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    for server in servers.values():
        server.up()
        _preload_adapters(server, recipe)


def _stop(servers: dict[str, EmbeddedServer]) -> None:
    for server in servers.values():
        server.down()


def _ratio(cached: int, total: int) -> float | None:
    return round(cached / total, 4) if total else None


def _placement_run(
    strategy: Strategy, recipe_path: Path, script: Sequence[ScriptedTurn], state: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One placement over the whole script; its steady-state (each persona's turns after its first) numbers."""
    from turnflow.session import Session

    reports: list[dict[str, Any]] = []
    with Session(recipe_path, backend=POOL_NAME, state_dir=state, placement=strategy) as session:
        for turn in script:
            reports.append(session.turn(persona=turn.persona, room=turn.room, speaker=turn.speaker,
                                        text=turn.text).report)
    counted = [r for r in reports if r["llm"]["prompt_tokens_processed"] is not None]  # the server reported them
    steady = [r for r in counted if r["turn"] > 1]
    total = sum(r["llm"]["prompt_tokens"] or 0 for r in steady)
    cached = sum(r["llm"]["prompt_tokens_cached"] or 0 for r in steady)
    members_used = {r["persona"]: sorted({x["llm"]["backend"] for x in reports if x["persona"] == r["persona"]})
                    for r in reports}
    return {
        "cache_hit_ratio": _ratio(cached, total),
        "prompt_tokens_processed": sum(r["llm"]["prompt_tokens_processed"] for r in steady),
        "prompt_tokens_processed_all_turns": sum(r["llm"]["prompt_tokens_processed"] for r in counted),
        "prompt_tokens": total,
        "turns": len(reports),
        "turns_without_usage": len(reports) - len(counted),
        "members_per_persona": round(sum(len(v) for v in members_used.values()) / max(1, len(members_used)), 2),
    }, reports


def _failover_run(
    recipe_path: Path, script: Sequence[ScriptedTurn], state: Path, servers: dict[str, EmbeddedServer],
    victim: str, rounds: int,
) -> dict[str, Any]:
    """Rendezvous with `victim` killed after the first half of the rounds and started again before the last two."""
    from turnflow.session import Session, TurnError

    kill_after = max(1, rounds // 2)
    restart_before = max(kill_after + 1, rounds - 1)
    lost: list[str] = []
    reports: list[dict[str, Any]] = []
    sent: dict[str, list[str]] = {}
    fallback_ms: list[float] = []
    with Session(recipe_path, backend=POOL_NAME, state_dir=state) as session:
        homes = {t.persona: session.route(t.persona)[0][0] for t in script}
        for turn in script:
            if turn.persona_turn == kill_after + 1 and servers[victim].status().get("running"):
                os.killpg(int(servers[victim].status()["pid"]), signal.SIGKILL)
                while servers[victim].status().get("running"):
                    time.sleep(0.05)
            if turn.persona_turn == restart_before + 1 and not servers[victim].status().get("running"):
                servers[victim].up()
                _preload_adapters(servers[victim], load_recipe(recipe_path))
                time.sleep(1.1)  # recheck_s
            started = time.perf_counter()
            try:
                report = session.turn(persona=turn.persona, room=turn.room, speaker=turn.speaker,
                                      text=turn.text).report
            except TurnError as exc:
                lost.append(f"{turn.persona} turn {turn.persona_turn}: {exc}")
                continue
            elapsed = (time.perf_counter() - started) * 1000
            report["_round"] = turn.persona_turn
            reports.append(report)
            sent.setdefault(turn.room, []).append(turn.text)
            if report["route"]["placement"] == "fallback":
                fallback_ms.append(elapsed)
        corrupted = []
        for room, texts in sent.items():
            history = session.store.history(room)
            numbers = [m.turn for m in history]
            said = [m.text for m in history if m.speaker_kind == "person"]
            if numbers != [n for n in range(1, len(texts) + 1) for _ in (0, 1)] or said != texts:
                corrupted.append(room)
    victims = sorted(p for p, home in homes.items() if home == victim)
    moved = sorted({r["persona"] for r in reports if r["route"]["placement"] == "fallback"})
    first_fallback = {}
    for r in reports:
        if r["route"]["placement"] == "fallback" and r["persona"] not in first_fallback:
            first_fallback[r["persona"]] = r
    steady_processed = [r["llm"]["prompt_tokens_processed"] for r in reports
                        if r["_round"] > 1 and r["route"]["placement"] == "home" and r["persona"] not in victims
                        and r["llm"]["prompt_tokens_processed"] is not None]
    typical = sorted(steady_processed)[len(steady_processed) // 2] if steady_processed else 0
    extra = sum(max(0, r["llm"]["prompt_tokens_processed"] - typical) for r in first_fallback.values()
                if r["llm"]["prompt_tokens_processed"] is not None)
    back = sorted({r["persona"] for r in reports if r["_round"] > restart_before and r["persona"] in victims
                   and r["route"]["placement"] == "home" and r["llm"]["backend"] == victim})
    return {
        "killed_member": victim,
        "killed_after_round": kill_after,
        "restarted_before_round": restart_before + 1,
        "lost_turns": len(lost),
        "lost": lost,
        "corrupted_histories": len(corrupted),
        "rewarmed_personas": len(first_fallback),
        "rewarmed": sorted(first_fallback),
        "killed_members_personas": victims,
        "only_killed_members_personas_moved": moved == victims,
        "rewarm_extra_prompt_tokens_processed": extra,
        "fallback_turn_ms_median": round(sorted(fallback_ms)[len(fallback_ms) // 2], 1) if fallback_ms else None,
        "returned_home": back,
        "all_returned_home": back == victims,
    }


def placed_homes(recipe_path: Path, pool: str, personas: Sequence[str], state: Path) -> dict[str, str]:
    """Each persona's home member as a Session on `pool` places it (its id and adapter-set digest; no member is
    started or asked)."""
    from turnflow.session import Session

    with Session(recipe_path, backend=pool, state_dir=state) as session:
        return {p: str(session.route(p)[0][0]) for p in personas}


def moved_on_add(before: Mapping[str, str], after: Mapping[str, str], members: Sequence[str]) -> dict[str, Any]:
    """What a new member took over: the personas whose home changed between placing on `members` (`before`) and on
    `members` plus one (`after`), and, for a larger sample, the fraction of 10,000 synthetic ids."""
    added = sorted(set(after.values()) - set(members))
    grown = [*members, *added] if added else [*members, _members(len(members) + 1)[-1]]
    moved = sorted(p for p in before if after.get(p) != before[p])
    ids = [f"persona-{i}" for i in range(10000)]
    many = sum(home_member(members, placement_key(p, "")) != home_member(grown, placement_key(p, "")) for p in ids)
    return {
        "fraction": round(len(moved) / len(before), 4) if before else 0.0,
        "personas": len(before),
        "personas_moved": moved,
        "moved_to": {p: after[p] for p in moved},
        "only_to_the_new_member": all(after[p] in added for p in moved),
        "new_member": added[0] if len(added) == 1 else added,
        "synthetic_10000": round(many / len(ids), 4),
        "minimum": round(1 / len(grown), 4),
    }


def pool_summary(
    config: dict[str, Any], placement: dict[str, Any], failover: dict[str, Any], moved: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The summary's measured parts: `moved_fraction_on_add` is a number (the fraction of the bench's personas a
    new member takes over), its details under `moved_on_add`."""
    return {
        "config": config,
        "placement": placement,
        "failover": failover,
        "moved_fraction_on_add": float(moved["fraction"]),
        "moved_on_add": moved,
        **extra,
    }


def run_pool_bench(options: BenchOptions, backends: int) -> dict[str, Any]:
    """The pool benchmark; writes `pool-summary.json` into the output folder and returns the summary."""
    if backends < 2:
        raise ValueError(f"bench --backends must be at least 2 (a pool), got {backends}")
    options = replace(options, audio=False, model=options.model if options.model != "bench" else "tiny")
    created = datetime.now(UTC)
    out = Path(options.out or Path("bench-runs") / f"pool-{created.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    members = _members(backends)
    ctx = context_per_slot(options)
    spec = backend_spec(options, ctx_per_slot=ctx, audio=False)
    started = time.perf_counter()
    result: dict[str, Any] = {"created_at": created.isoformat(timespec="seconds"), "out": str(out)}
    def checkpoint(**parts: Any) -> None:  # what is measured so far survives an interrupted run
        result.update(parts)
        (out / "pool-summary.json").write_text(json.dumps(result, indent=2) + "\n")

    with _turnflow_home(out / "home"), _exit_on_sigterm():
        servers = {m: EmbeddedServer(m, spec) for m in members}
        try:
            url = servers[members[0]].up()  # the server's tokenizer sizes the prompts
            recipe_path = write_recipe_folder(out / "recipe", options, spec, url, ctx)
            _stop(servers)
            _write_pool(recipe_path.parent, spec, members)
            servers = {m: EmbeddedServer(m, s) for m, s in _member_specs(recipe_path, members).items()}
            recipe = load_recipe(recipe_path)
            names = [(pid, find_persona(recipe, pid).name) for pid in recipe.personas or ()]
            script = _shuffled_rounds(conversation_script(names, options.turns, audio=False, rooms="per-persona"))
            placement: dict[str, Any] = {}
            for strategy in STRATEGIES:
                _stop(servers)
                _start(servers, recipe_path)
                placement[strategy], _ = _placement_run(strategy, recipe_path, script, out / "state" / strategy)
                checkpoint(placement=placement)
            _stop(servers)
            _start(servers, recipe_path)
            ids = [pid for pid, _ in names]
            homes = placed_homes(recipe_path, POOL_NAME, ids, out / "state" / "probe")
            grown_homes = placed_homes(recipe_path, GROWN_POOL_NAME, ids, out / "state" / "probe")
            moved = moved_on_add(homes, grown_homes, members)
            checkpoint(moved_fraction_on_add=moved["fraction"], moved_on_add=moved)
            victim = max(members, key=list(homes.values()).count)  # the member with the most personas: hardest
            failover = _failover_run(recipe_path, script, out / "state" / "failover", servers, victim,
                                     options.turns)
        finally:
            _stop(servers)
    config = {"backends": backends, "personas": options.personas, "turns": options.turns,
              "prompt_tokens": options.prompt_tokens, "model": spec.model, "slots_per_member": spec.slots,
              "quick": options.quick}
    result.update(pool_summary(
        config, placement, failover, moved,
        wall_s=round(time.perf_counter() - started, 1),
        cpu_count=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
        notes=[
            "each placement runs on freshly started members (cold KV); steady state is each persona's turns "
            "after its first; the people speak in a shuffled order each round (the same for every placement)",
            "random and round_robin pick a member per turn; a persona's history is the same wherever it runs",
            "moved_fraction_on_add: the bench's personas placed by a Session on the pool and on the pool with one "
            "more member (declared, never started); moved_on_add.synthetic_10000 is the same over 10,000 ids",
        ],
    ))
    (out / "pool-summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _member_specs(recipe_path: Path, members: list[str]) -> dict[str, BackendSpec]:
    from turnflow.recipe import backends_for

    backends = backends_for(load_recipe(recipe_path))
    return {m: backends[m] for m in members}


def console_pool_report(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"pool bench: {summary['config']['backends']} members, {summary['config']['personas']} personas, "
             f"{summary['config']['turns']} turns each ({summary['wall_s']} s)"]
    for name, numbers in summary["placement"].items():
        lines.append(f"  {name:11s} cache hit ratio {numbers['cache_hit_ratio']}, processed "
                     f"{numbers['prompt_tokens_processed']} of {numbers['prompt_tokens']} steady-state prompt tokens")
    f = summary["failover"]
    lines.append(f"  failover: {f['killed_member']} killed: lost {f['lost_turns']}, "
                 f"corrupted {f['corrupted_histories']}, "
                 f"re-warmed {f['rewarmed_personas']} (+{f['rewarm_extra_prompt_tokens_processed']} tokens), "
                 f"returned home {len(f['returned_home'])}/{len(f['killed_members_personas'])}")
    m = summary["moved_on_add"]
    lines.append(f"  a member added: moves {summary['moved_fraction_on_add']} of the personas "
                 f"({len(m['personas_moved'])} of {m['personas']}; {m['synthetic_10000']} of 10,000 ids; "
                 f"minimum {m['minimum']})")
    lines.append(f"  summary: {summary['out']}/pool-summary.json")
    return "\n".join(lines)

