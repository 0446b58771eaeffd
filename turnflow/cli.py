"""The `turnflow` command: validate, render, run, server, bench.

Errors are for people: a bad recipe prints `FILE:LINE: message` lines and exits 1, a failed turn prints
one line saying what happened and that the history is unchanged, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from turnflow.nodes.images import ImageError
from turnflow.nodes.media import AudioError
from turnflow.recipe import RecipeError, backends_for, load_recipe, validate_paths


def _cmd_validate(args: argparse.Namespace) -> int:
    problems = validate_paths(args.paths)
    for problem in problems:
        print(problem)
    errors = [p for p in problems if p.severity == "error"]
    if not errors and not args.quiet:
        print(f"ok: {len(args.paths)} path(s) valid" + (f", {len(problems)} warning(s)" if problems else ""))
    return 1 if errors else 0


def _cmd_render(args: argparse.Namespace) -> int:
    from turnflow.viz.render import render

    recipe = load_recipe(args.recipe)
    report = json.loads(Path(args.report).read_text()) if args.report else None
    out = render(recipe, Path(args.output), profile=_profile(args), report=report)
    print(f"wrote {out}")
    return 0


def _profile(args: argparse.Namespace) -> dict[str, str]:
    from turnflow.backend import Capabilities

    caps = Capabilities(audio_in=getattr(args, "hears", False), audio_out=getattr(args, "speaks", False))
    return caps.profile


def _cmd_run(args: argparse.Namespace) -> int:
    from turnflow.session import Session, TurnError

    with Session(args.recipe, backend=args.backend, strict=args.strict) as session:
        streamed = not args.json and sys.stdout.isatty()

        def show(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        try:
            result = session.turn(
                persona=args.persona,
                room=args.room,
                text=args.text,
                audio=args.audio,
                images=args.image,
                speaker=args.speaker,
                out=args.out,
                on_text=show if streamed else None,
            )
        except TurnError as exc:
            print(f"turnflow: {exc}", file=sys.stderr)
            return 3
        except (AudioError, ImageError) as exc:
            print(f"turnflow: input refused, history unchanged: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result.report, indent=2, ensure_ascii=False))
        return 0
    if not streamed:
        print(f"{args.persona}: {result.reply}")
    else:
        print()
    print(summary_line(result.report))
    if args.out:
        print(f"wrote {args.out} ({result.report['speech']['audio_s']:.1f} s of speech)")
    return 0


def summary_line(report: dict[str, Any]) -> str:
    """One line per turn: tokens processed vs cached, prefix hash, slot, cache hits, timings."""
    llm = report["llm"]
    cache = report["composition_cache"]
    timings = report.get("timings_ms", {})
    violations = len(report.get("tier_violations") or [])
    route = report.get("route", {})
    voice = ""
    if route.get("audio_in", "none") != "none" or route.get("audio_out", "none") != "none":
        first = timings.get("first_audio")
        voice = (f" | audio in {route['audio_in']}, out {route['audio_out']}"
                 + (f", first audio {first:.0f} ms" if first is not None else ""))
    return (
        f"[turn {report['turn']} {report['persona']}@{report['room']}] "
        f"prompt {llm['prompt_tokens']} tok: processed {llm['prompt_tokens_processed']}, "
        f"cached {llm['prompt_tokens_cached']} | slot {llm['slot']} | "
        f"invariant {report['prefix']['invariant_sha256'][:12]} | "
        f"cache {cache['hits']}/{cache['hits'] + cache['misses']} hits | "
        f"{timings.get('total', 0):.0f} ms (turnflow {timings.get('turnflow', 0):.1f} ms)"
        + voice
        + (f" | {violations} tier violation(s)" if violations else "")
    )


def _server_targets(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from turnflow.recipe import default_backends_path, load_backends

    if args.recipe:
        backends = backends_for(load_recipe(args.recipe, check=False))
    else:
        backends = load_backends(default_backends_path(), Path("backends.yaml"))
    embedded = {name: spec for name, spec in backends.items() if spec.kind == "embedded"}
    if args.backend:
        if args.backend not in embedded:
            raise SystemExit(f"turnflow: no embedded backend {args.backend!r} (have: {', '.join(embedded)})")
        return [(args.backend, embedded[args.backend])]
    if args.action == "up":
        return [(name, spec) for name, spec in embedded.items() if name == "local"] or list(embedded.items())[:1]
    return list(embedded.items())


def _cmd_server(args: argparse.Namespace) -> int:
    from turnflow.server import EmbeddedServer, ServerError

    code = 0
    for name, spec in _server_targets(args):
        server = EmbeddedServer(name, spec)
        try:
            if args.action == "up":
                print(f"{name}: up at {server.up()}")
            elif args.action == "down":
                print(f"{name}: {'stopped' if server.down() else 'was not running'}")
            else:
                status = server.status()
                if status["running"]:
                    health = "healthy" if status.get("healthy") else "NOT answering"
                    print(f"{name}: running at {status['url']} (pid {status['pid']}, {health})")
                else:
                    print(f"{name}: not running")
        except ServerError as exc:
            print(f"turnflow: {exc}", file=sys.stderr)
            code = 1
    return code


def _cmd_bench(args: argparse.Namespace) -> int:
    from turnflow.bench import BenchOptions, console_report, rebuild_report, run_bench

    if args.rebuild:
        try:
            rebuilt = rebuild_report(Path(args.rebuild))
        except ValueError as error:
            print(f"turnflow bench: {error}", file=sys.stderr)
            return 2
        print(rebuilt.model_dump_json(indent=2) if args.json else console_report(rebuilt))
        return 0

    options = BenchOptions.preset(
        quick=args.quick,
        personas=args.personas,
        turns=args.turns,
        prompt_tokens=args.prompt_tokens,
        out=Path(args.out) if args.out else None,
        backend_url=args.backend,
        model=args.model,
        audio=False if args.no_audio else None,
        rooms=args.rooms,
    )
    summary = run_bench(options)
    print(summary.model_dump_json(indent=2) if args.json else console_report(summary))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from turnflow.serve import LiveKitCredentials, MissingCredentialsError, run_room_agent

    try:
        credentials = LiveKitCredentials.from_env()
    except MissingCredentialsError as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 2
    personas = [persona.strip() for persona in args.personas.split(",") if persona.strip()]
    return run_room_agent(args.recipe, room=args.room, personas=personas, credentials=credentials, backend=args.backend)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="turnflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check recipes, personas and backends files")
    validate.add_argument("paths", nargs="+", help="files or folders")
    validate.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    validate.set_defaults(fn=_cmd_validate)

    render = sub.add_parser("render", help="draw the turn DAG (tiers and cache keys visible)")
    render.add_argument("recipe")
    render.add_argument("-o", "--output", required=True, help="OUT.dot, .svg, .png or .html")
    render.add_argument("--persona", help="(accepted for symmetry with run; the DAG is the same for every persona)")
    render.add_argument("--hears", action="store_true", help="draw the branch for a model that hears")
    render.add_argument("--speaks", action="store_true", help="draw the branch for a model that speaks")
    render.add_argument("--report", help="a turn report (run --json) to overlay: node timings and cache hits")
    render.set_defaults(fn=_cmd_render)

    run = sub.add_parser("run", help="run one turn")
    run.add_argument("recipe")
    run.add_argument("--persona", required=True)
    run.add_argument("--room", default="default", help="consecutive runs with the same room continue it")
    run.add_argument("--speaker", default="user", help="who is speaking (a person's name)")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--text")
    what.add_argument("--audio", help="a WAV (or FLAC/OGG) file of what the speaker said")
    run.add_argument("--image", action="append", help="an image the speaker shows (repeatable)")
    run.add_argument("--out", help="write the spoken reply to this WAV file")
    run.add_argument("--backend", help="override the recipe's backend")
    run.add_argument("--json", action="store_true", help="print the turn report as JSON")
    run.add_argument("--strict", action="store_true", help="a tier violation fails the turn")
    run.set_defaults(fn=_cmd_run)

    server = sub.add_parser("server", help="the embedded llama-server")
    server.add_argument("action", choices=["up", "down", "status"])
    server.add_argument("--backend", help="which embedded backend (default: local for up, all for down/status)")
    server.add_argument("--recipe", help="use the backends beside this recipe")
    server.set_defaults(fn=_cmd_server)

    bench = sub.add_parser("bench", help="turnflow against a naive pipeline, same conversation, same model server")
    bench.add_argument("--quick", action="store_true", help="3 personas, ~4k-token prompts, 5 turns each")
    bench.add_argument("--personas", type=int, help="personas in the room (default 6)")
    bench.add_argument("--turns", type=int, help="turns per persona (default 20)")
    bench.add_argument("--prompt-tokens", type=int, help="prompt size at a persona's first turn (default 14000)")
    bench.add_argument("--out", help="output folder (default bench-runs/<timestamp>/)")
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.add_argument("--backend", metavar="URL", help="use this OpenAI-compatible server instead of an embedded one")
    bench.add_argument("--model", help="embedded model: bench (default), tiny, or a GGUF file")
    bench.add_argument("--no-audio", action="store_true", help="text turns only")
    bench.add_argument(
        "--rebuild", metavar="DIR", help="re-write the summary, table and plots of an earlier run from its turns.jsonl"
    )
    bench.add_argument(
        "--rooms", choices=("per-persona", "shared"),
        help="per-persona (default): each persona in its own room; shared: all in one room, one shared history",
    )
    bench.set_defaults(fn=_cmd_bench)

    serve = sub.add_parser("serve", help="join a LiveKit room as the personas and answer the people in it")
    serve.add_argument("recipe")
    serve.add_argument("--room", required=True, help="the LiveKit room to join")
    serve.add_argument("--personas", required=True, help="comma-separated persona ids; the first one listens")
    serve.add_argument("--backend", help="override the recipe's backend")
    serve.set_defaults(fn=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except RecipeError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
