"""`turnflow bench` end to end: a tiny run on the tiny model against a real llama-server, through the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import llama_server_or_skip

from turnflow.bench import BenchOptions, conversation_script, persona_documents, reference_notes
from turnflow.recipe import Persona

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """`turnflow bench --json` with 2 personas, 3 turns each, ~1.5k-token prompts, on the tiny model."""
    llama_server_or_skip()
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "turnflow.cli", "bench", "--json", "--model", "tiny",
        "--personas", "2", "--turns", "3", "--prompt-tokens", "1500", "--out", str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TURNFLOW_HOME"}
    # six modes (turnflow and five baselines): ~1 min when idle, several when the machine is loaded
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout), out


def test_summary_has_the_promised_keys(tiny_run: tuple[dict, Path]) -> None:
    summary, _ = tiny_run
    for key in ("ratio_processed", "prefix_stable", "stt_invocations_native", "tts_invocations", "server_rss_mb",
                "plots", "audio_turns"):
        assert key in summary, key
    for mode in ("turnflow", "naive"):
        for key in ("cache_hit_ratio", "prompt_tokens_processed", "first_audio_ms_p50", "e2e_ms_p50",
                    "stt_invocations_native", "tts_invocations"):
            assert key in summary[mode], f"{mode}.{key}"
        assert summary[mode]["turns"] == 6
        assert summary[mode]["e2e_ms_p50"] > 0
    assert summary["server_rss_mb"] > 0
    assert 1200 < summary["prompt_tokens_first_turn"] < 2200  # ~1.5k asked for
    assert set(summary["baselines"]) == {"naive", "append_only", "no_pinning", "no_composition_cache", "no_ordering"}
    for name, row in summary["baselines"].items():
        for key in ("cache_hit_ratio", "prompt_tokens_processed", "ttft_ms_p50", "e2e_ms_p50"):
            assert row[key] is not None, f"baselines.{name}.{key}"
    kv = summary["kv"]
    for key in ("bytes_per_token", "pool_tokens_allocated", "tokens_used_peak", "restore_ms_p50", "sources"):
        assert key in kv, f"kv.{key}"
    assert set(kv["sources"]) == {"slot", "host-cache", "disk", "recomputed"}
    assert sum(kv["sources"].values()) == summary["turnflow"]["turns"]
    assert kv["bytes_per_token"] > 0 and kv["tokens_used_peak"] <= kv["pool_tokens_allocated"]
    assert summary["kv_arithmetic"]["by_cache_type"]["f16"]["bytes_per_token"] == 147456  # Qwen3-4B: 144 KiB


def test_turnflow_processes_fewer_tokens_on_a_stable_prefix(tiny_run: tuple[dict, Path]) -> None:
    summary, _ = tiny_run
    turnflow, naive = summary["turnflow"], summary["naive"]
    assert summary["prefix_stable"] is True
    assert all(summary["prefix_stable_by_persona"].values())
    assert turnflow["prompt_tokens_processed"] * 2 < naive["prompt_tokens_processed"]
    assert summary["ratio_processed"] > 2
    assert turnflow["cache_hit_ratio"] > 0.7 > naive["cache_hit_ratio"]
    assert turnflow["composition_cache_hits"] > 0 and naive["composition_cache_hits"] == 0
    assert turnflow["tier_violations"] == 0
    # what each mode processed beyond what was new to the persona since its last turn
    assert turnflow["new_tokens"] > 0 and abs(turnflow["new_tokens"] - naive["new_tokens"]) < 0.2 * naive["new_tokens"]
    assert turnflow["reprocessed_per_turn_p50"] * 10 < naive["reprocessed_per_turn_p50"]


def test_an_earlier_run_is_rebuilt_from_its_turns(tiny_run: tuple[dict, Path], tmp_path: Path) -> None:
    summary, out = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("home", "state", "*.png"))
    (copy / "summary.md").unlink()
    finished = subprocess.run(
        [sys.executable, "-m", "turnflow.cli", "bench", "--rebuild", str(copy), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    rebuilt = json.loads(finished.stdout)
    for key in ("ratio_processed", "prefix_stable", "created_at", "server_rss_mb"):
        assert rebuilt[key] == summary[key], key
    assert rebuilt["turnflow"]["reprocessed_tokens"] == summary["turnflow"]["reprocessed_tokens"]
    assert (copy / "summary.md").is_file() and (copy / "tokens.png").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "turnflow.cli", "bench", "--rebuild", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=60,
    )
    assert missing.returncode == 2 and "not a finished bench run" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_writes_raw_data_summary_and_plots(tiny_run: tuple[dict, Path]) -> None:
    summary, out = tiny_run
    records = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 6  # turnflow and five baselines, 2 personas x 3 turns each
    assert {r["mode"] for r in records} == {"turnflow", "naive", "append_only", "no_pinning", "no_composition_cache",
                                            "no_ordering"}
    assert sum(r["joined"] for r in records if r["mode"] == "turnflow") == 2  # two people join mid-conversation
    pinned = {r["persona"]: r["slot"] for r in records if r["mode"] == "turnflow"}
    assert len(set(pinned.values())) == 2  # one slot per persona
    assert all(r["slot"] is None for r in records if r["mode"] in ("naive", "append_only", "no_pinning"))
    assert all(r["slot"] is not None for r in records if r["mode"] in ("no_composition_cache", "no_ordering"))
    assert json.loads((out / "summary.json").read_text())["ratio_processed"] == summary["ratio_processed"]
    assert "| prompt tokens processed, steady state |" in (out / "summary.md").read_text()
    assert "server ms per generated token, p50 |" in (out / "summary.md").read_text()
    assert all(r["server_decode_ms_per_token"] > 0 for r in records)  # the server's own clock, for every mode
    assert all(row["server_decode_ms_per_token_p50"] > 0 for row in summary["baselines"].values())
    speeds = [row["server_decode_ms_per_token_p50"] for row in summary["baselines"].values()]
    speeds.append(summary["turnflow"]["server_decode_ms_per_token_p50"])
    warned = "say nothing about the modes" in (out / "summary.md").read_text()
    assert warned == (max(speeds) > 1.15 * min(speeds))  # the note under the table appears exactly when it should
    for name in ("tokens", "latency", "memory"):
        path = Path(summary["plots"][name])
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list((out / "home" / "servers").glob("*.json")), "the bench left its model server running"
    assert all(r["server_rss_mb"] for r in records)  # followed across restarts (modes, a growing KV pool)


def test_a_run_of_turnflow_alone_reports_no_naive_column(tiny_run: tuple[dict, Path], tmp_path: Path) -> None:
    _, out = tiny_run
    copy = tmp_path / "alone"
    copy.mkdir()
    shutil.copy(out / "summary.json", copy / "summary.json")
    turns = [line for line in (out / "turns.jsonl").read_text().splitlines() if json.loads(line)["mode"] == "turnflow"]
    (copy / "turns.jsonl").write_text("\n".join(turns) + "\n")
    finished = subprocess.run([sys.executable, "-m", "turnflow.cli", "bench", "--rebuild", str(copy)],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = (copy / "summary.md").read_text()
    assert "| | turnflow |\n" in report and "| prompt tokens processed, steady state | " in report
    assert "naive" not in report.split("KV (turnflow run)")[0]
    assert not [line for line in finished.stdout.splitlines() if "naive" in line and not line.startswith("note:")]
    assert "turnflow alone (no baselines)." in report


def test_a_run_with_some_baselines_names_the_modes_it_ran(tiny_run: tuple[dict, Path], tmp_path: Path) -> None:
    _, out = tiny_run
    copy = tmp_path / "some"
    copy.mkdir()
    shutil.copy(out / "summary.json", copy / "summary.json")
    turns = [line for line in (out / "turns.jsonl").read_text().splitlines()
             if json.loads(line)["mode"] in ("turnflow", "append_only", "no_pinning")]
    (copy / "turns.jsonl").write_text("\n".join(turns) + "\n")
    finished = subprocess.run([sys.executable, "-m", "turnflow.cli", "bench", "--rebuild", str(copy)],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = (copy / "summary.md").read_text()
    assert "Modes `turnflow`, `append_only`, `no_pinning` on the same server configuration" in report
    assert "no baselines" not in report and "| | turnflow |\n" in report
    assert [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| `")][:3] == [
        "`turnflow`", "`append_only`", "`no_pinning`"]


def test_a_run_stopped_after_turnflows_mode_keeps_the_modes_it_finished(tmp_path: Path) -> None:
    """SIGTERM during a baseline: the summary of the modes that finished is written (the stopped one left out, and
    said so), the exit status says it stopped, and a rebuild leaves the unfinished mode out too."""
    import signal
    import time

    llama_server_or_skip()
    out = tmp_path / "stopped"
    command = [
        sys.executable, "-m", "turnflow.cli", "bench", "--json", "--model", "tiny", "--no-audio",
        "--personas", "2", "--turns", "3", "--prompt-tokens", "1500", "--baselines", "naive,append_only",
        "--out", str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TURNFLOW_HOME"}
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    turns = out / "turns.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and bench.poll() is None:
        if turns.exists() and len(turns.read_text().splitlines()) >= 7:  # turnflow's 6 turns, then naive's first
            break
        time.sleep(0.2)
    bench.send_signal(signal.SIGTERM)
    stdout, stderr = bench.communicate(timeout=300)
    assert bench.returncode == 130, stderr[-2000:]
    summary = json.loads(stdout)
    assert re.fullmatch(
        r"stopped \(SIGTERM\) during the naive mode after [1-5] of 6 turns: that mode is left out of this summary "
        r"\(its turns are in turns\.jsonl\), and append_only did not run", summary["stopped"])
    assert summary["notes"][0] == summary["stopped"]
    assert set(summary["modes"]) == {"turnflow"} and summary["modes"]["turnflow"]["turns"] == 6
    assert summary["baselines"] == {} and summary["naive"]["turns"] == 0
    assert (out / "summary.md").exists()
    rebuilt = subprocess.run([sys.executable, "-m", "turnflow.cli", "bench", "--rebuild", str(out), "--json"],
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert set(json.loads(rebuilt.stdout)["modes"]) == {"turnflow"}


def test_more_personas_than_examples_get_their_own_identity() -> None:
    documents = persona_documents(6)
    ids = [d["persona"] for d in documents]
    assert len(set(ids)) == 6
    variants = [Persona.model_validate(d) for d in documents[4:]]
    assert all(v.name not in ("Maya", "Helper", "Teacher", "Codereview") for v in variants)
    assert documents[4]["system_prompt"] != documents[0]["system_prompt"]
    notes = reference_notes(variants[0], {variants[0].persona: 3000})
    assert 3000 <= len(notes.encode()) < 3300
    assert notes == reference_notes(variants[0], {variants[0].persona: 3000})  # deterministic: invariant


def test_the_script_is_the_same_for_both_modes_and_addresses_personas_by_name() -> None:
    script = conversation_script([("maya", "Maya"), ("helper", "Helper")], 4, audio=True, rooms="shared")
    assert [t.persona_turn for t in script if t.persona == "maya"] == [1, 2, 3, 4]
    assert all(t.text.startswith(("Maya, ", "Helper, ")) for t in script)
    assert [t.kind for t in script if t.persona == "maya"] == ["text", "audio", "text", "audio"]
    assert script == conversation_script([("maya", "Maya"), ("helper", "Helper")], 4, audio=True,
                                         rooms="shared")
    assert {t.room for t in script} == {"room"}
    apart = conversation_script([("maya", "Maya"), ("helper", "Helper")], 4, audio=True, rooms="per-persona")
    assert {t.persona: t.room for t in apart} == {"maya": "maya", "helper": "helper"}
    assert [t.text for t in apart] == [t.text for t in script]  # the same words either way
    late = conversation_script([("maya", "Maya"), ("helper", "Helper")], 6, audio=False, rooms="per-persona",
                               joins=True)
    joined = [t for t in late if t.joins]
    assert [(t.room, t.joins, t.speaker) for t in joined] == [("maya", ("Kai",), "Kai"), ("maya", ("Mara",), "Mara")]
    with pytest.raises(ValueError, match="--baselines"):
        BenchOptions.preset(baselines=("peer",))
    assert BenchOptions.preset(quick=True).prompt_tokens == 4000
    assert BenchOptions.preset().rooms == BenchOptions.preset(quick=True).rooms == "per-persona"
    with pytest.raises(ValueError, match="--turns"):
        BenchOptions.preset(turns=0)


@pytest.mark.parametrize(("instant", "idle"), [(False, []), (True, []), (True, ["--idle-ms", "60"])],
                         ids=["model", "instant-model", "instant-model-after-a-wait"])
def test_the_overhead_benchmark_times_each_node_of_turnflows_own_work(
    tmp_path: Path, instant: bool, idle: list[str]
) -> None:
    """`make overhead` in a short form: a few turns on a short history; its JSON has the per-node table."""
    llama_server_or_skip()
    out = tmp_path / "overhead.json"
    command = [sys.executable, "benchmarks/turn_overhead.py", "--history", "4", "--prompt-tokens", "600",
               "--turns", "3", "--json", str(out), *(["--instant-model"] if instant else []), *idle]
    env = {k: v for k, v in os.environ.items() if k != "TURNFLOW_HOME"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                              cwd=Path(__file__).resolve().parent.parent)
    assert finished.returncode == 0, finished.stderr[-2000:]
    summary = json.loads(out.read_text())
    print(f"\n{'instant' if instant else 'model'}: turnflow p50 {summary['turnflow_ms']['p50']} ms")
    assert summary["turns"] == 3 and summary["options"]["instant_model"] is instant
    assert summary["history_messages"][0] >= 4
    assert {"prompt", "conversation_history", "slot_claim", "turn_report"} <= set(summary["nodes_ms"])
    assert "speech" not in summary["nodes_ms"]  # the model stream's node is not turnflow's own work
    assert 0 < summary["turnflow_ms"]["p50"] <= summary["turnflow_ms"]["max"]
    if idle:  # the instant reply came after the wait, which counts as the model's time, not turnflow's
        assert summary["options"]["idle_ms"] == 60 and summary["model_ms_p50"] >= 60
    elif instant:
        assert summary["model_ms_p50"] < 60
    if instant:  # nothing was sent to the model: no prompt counts
        assert summary["prompt_tokens_p50"] is None
    else:
        assert summary["prompt_tokens_p50"] > 600


def _record(seq: int, persona_turn: int, processed: int | None, *, prompt: int = 1000) -> Any:
    from turnflow.bench.summary import STEADY_FROM_TURN, TurnRecord

    return TurnRecord(
        mode="turnflow", seq=seq, persona="maya", persona_turn=persona_turn, room="r", speaker="Dana", kind="text",
        steady=persona_turn >= STEADY_FROM_TURN, slot=0, prompt_tokens=0 if processed is None else prompt,
        prompt_tokens_processed=processed or 0, prompt_tokens_cached=0 if processed is None else prompt - processed,
        usage_reported=processed is not None, completion_tokens=10, invariant_sha256="a", route_audio_in="none",
        route_audio_out="none", stt_invocations=0, tts_invocations=0, llm_invocations=1, ttft_ms=50.0,
        first_audio_ms=None, e2e_ms=100.0, model_ms=90.0, turnflow_ms=1.0, node_ms={}, composition_cache_hits=0,
        composition_cache_misses=0, tier_violations=0, server_rss_mb=None, turnflow_rss_mb=1.0, reply_chars=5,
    )


def test_a_turn_whose_counts_the_server_did_not_report_is_left_out_not_counted_as_zero() -> None:
    """A server other than llama-server reports no usage for a reply turnflow cut itself: such a turn counts apart
    (as 0 processed it would flatter the mode's cache)."""
    from turnflow.bench.summary import baseline_row, summarise_mode

    reported = [_record(1, 1, 1000), _record(2, 2, 100, prompt=1100), _record(3, 3, 120, prompt=1200),
                _record(5, 5, 110, prompt=1400)]
    unreported = _record(4, 4, None)
    mode = summarise_mode([*reported, unreported], wall_s=1.0)
    assert mode.turns == 5 and mode.steady_turns == 3 and mode.turns_without_usage == 1
    assert mode.prompt_tokens_processed == 120 + 110 and mode.prompt_tokens == 1200 + 1400
    assert mode.cache_hit_ratio == round((1080 + 1290) / 2600, 4)
    assert mode.processed_per_turn_p50 == 115
    assert mode.prompt_tokens_processed_all == 1000 + 100 + 120 + 110
    # the turn after the unreported one has no known previous length: only turn 3 is compared with its predecessor
    assert mode.new_tokens == 1200 - 1110 and mode.reprocessed_tokens == 120 - 90
    assert baseline_row(mode, mode)["turns_without_usage"] == 1
    assert summarise_mode(reported, wall_s=1.0).turns_without_usage == 0


def test_a_rebuild_counts_kv_paging_apart_in_turns_recorded_before_it_was() -> None:
    """Turns recorded before `kv_page_ms` existed counted the server's KV restore as turnflow's own time; a rebuild
    takes the kv node's time out of it on the turns that restored or saved KV, as today's turns report it."""
    from turnflow.bench.runner import _paging_apart

    old = _record(3, 3, 100).model_copy(update={"kv_restore_ms": 120.0, "node_ms": {"kv": 128.0, "prompt": 0.1},
                                                "turnflow_ms": 130.0})
    saved = _record(4, 4, 100).model_copy(update={"kv_saved_bytes": 4096, "node_ms": {"kv": 40.0},
                                                  "turnflow_ms": 41.5})
    untouched = _record(5, 5, 100).model_copy(update={"node_ms": {"kv": 0.02}, "turnflow_ms": 1.5})
    counted = _record(6, 6, 100).model_copy(update={"kv_restore_ms": 90.0, "kv_page_ms": 95.0,
                                                    "node_ms": {"kv": 95.0}, "turnflow_ms": 1.4})
    records, upgraded = _paging_apart([old, saved, untouched, counted])
    assert upgraded == 2
    assert [(r.turnflow_ms, r.kv_page_ms) for r in records] == [(2.0, 128.0), (1.5, 40.0), (1.5, 0.0), (1.4, 95.0)]
