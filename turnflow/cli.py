"""The `turnflow` command: validate, render, run, server, bench, adapters (and the Hub), serve, worker.

Errors are for people: a bad recipe prints `FILE:LINE: message` lines and exits 1, a failed turn prints
one line saying what happened and that the history is unchanged, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# Hamilton loads its data-loader extensions (pandas, matplotlib, ...) when first imported, ~0.5 s of every command
# here; a turn DAG uses none of them (a source is called by the node turnflow makes for it, never decorated for
# Hamilton). Set HAMILTON_AUTOLOAD_EXTENSIONS=1 to load them anyway.
os.environ.setdefault("HAMILTON_AUTOLOAD_EXTENSIONS", "0")

from turnflow.nodes.images import ImageError  # noqa: E402  (after the setting above)
from turnflow.nodes.media import AudioError  # noqa: E402
from turnflow.recipe import RecipeError, backends_for, load_recipe, validate_paths  # noqa: E402


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
        f"cached {llm['prompt_tokens_cached']} | "
        + (f"{llm['backend']} ({route['placement']}) " if "placement" in route else "")
        + f"slot {llm['slot']} | "
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
    pools = {name: spec for name, spec in backends.items() if spec.kind == "pool"}
    if args.backend in pools:  # a pool: every embedded member (members reached by URL run elsewhere)
        members = [(m, embedded[m]) for m in pools[args.backend].members if m in embedded]
        if not members:
            raise SystemExit(f"turnflow: pool {args.backend!r} has no embedded members "
                             f"({', '.join(pools[args.backend].members)} are reached by URL)")
        return members
    if args.backend:
        if args.backend not in embedded:
            have = ", ".join([*embedded, *(f"{p} (pool)" for p in pools)])
            raise SystemExit(f"turnflow: no embedded backend or pool {args.backend!r} (have: {have})")
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


def _baselines(value: str | None) -> tuple[str, ...] | None:
    """`--baselines a,b` (or `none`) as a tuple; None for the default (all)."""
    if value is None:
        return None
    return () if value.strip() in ("", "none") else tuple(v.strip() for v in value.split(",") if v.strip())


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

    if args.backends is not None:
        from turnflow.bench_pool import console_pool_report, run_pool_bench

        options = BenchOptions.preset(
            quick=args.quick, personas=args.personas, turns=args.turns, prompt_tokens=args.prompt_tokens,
            out=Path(args.out) if args.out else None, model=args.model,
        )
        pooled = run_pool_bench(options, args.backends)
        print(json.dumps(pooled, indent=2) if args.json else console_pool_report(pooled))
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
        slots=args.slots,
        cache_ram_mb=args.cache_ram,
        paging=False if args.no_paging else None,
        baselines=_baselines(args.baselines),
        joins=False if args.no_joins else None,
        max_tokens=args.max_tokens,
    )
    summary = run_bench(options)
    print(summary.model_dump_json(indent=2) if args.json else console_report(summary))
    return 130 if summary.stopped else 0


def _cmd_adapters(args: argparse.Namespace) -> int:
    from turnflow.adapters import AdapterError, AdapterRegistry

    registry = AdapterRegistry()
    try:
        if args.action == "add":
            manifest = registry.add(
                args.path, kind=args.kind, adapter_id=args.id, license=args.license, authors=args.author or (),
                base=args.base, derived_from=args.derived_from or (), base_hub_id=args.base_hub_id,
            )
            print(f"added {manifest.id} ({manifest.kind} {manifest.format}, sha256 {manifest.sha256[:12]}, "
                  f"{_base_text(manifest)}, license {manifest.license or 'none'})")
            if manifest.base_model is not None:
                hub_id = manifest.base_model.hub_id
                print(f"base model on the Hub: {hub_id}" if hub_id else
                      "base model on the Hub: not known (a published card names none; give it with --base-hub-id)")
            return 0
        if args.action == "list":
            manifests = registry.manifests()
            if args.json:
                print(json.dumps([m.public() for m in manifests], indent=2))
                return 0
            if not manifests:
                print("no adapters; add one with `turnflow adapters add PATH --kind voice|skill`")
            for m in manifests:
                print(f"{m.id:32s} {m.kind:5s} {m.format:11s} {_base_text(m):34s} {m.license or 'unlicensed':12s} "
                      f"{', '.join(m.authors) or '-'}")
            return 0
        if args.action == "show":
            variants = registry.variants(args.id)
            if args.json:
                print(json.dumps([m.public() for m in variants], indent=2))
                return 0
            for m in variants:
                print(f"{m.id}  ({m.kind} {m.format})")
                print(f"  file:      {registry.path(m)}  ({m.size_bytes} bytes, sha256 {m.sha256})")
                print(f"  base:      {_base_text(m).removeprefix('base ')}")
                if m.base_model is not None:
                    print(f"  base on the Hub: {m.base_model.hub_id or 'not known'}")
                print(f"  license:   {m.license or 'none given'}")
                print(f"  authors:   {', '.join(m.authors) or 'none given'}")
                print(f"  source:    {m.source}" + (f" @ {m.revision}" if m.revision else ""))
                print(f"  derived from: {', '.join(m.derived_from) or 'nothing declared'}")
            return 0
        if args.action in ("publish", "search", "preview", "pull"):
            return _cmd_hub(args, registry)
        removed = registry.remove(args.id)
        print(f"removed {args.id} ({removed} variant{'s' if removed != 1 else ''})")
        return 0
    except AdapterError as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 1


def _cmd_hub(args: argparse.Namespace, registry: Any) -> int:
    """publish, search, preview, pull: the registry's adapters on the Hugging Face Hub."""
    from turnflow import hub

    try:
        if args.action == "publish":
            bundle, commit = hub.publish(
                args.id, args.repo, private=args.private, token=args.token, dry_run=args.dry_run,
                out=Path(args.out) if args.out else None, registry=registry, base=args.base, persona=args.persona,
            )
            card = hub.card_tags(bundle.manifest)
            where = f"wrote {bundle.folder}" if commit is None else f"published {args.repo} @ {commit}"
            print(f"{where}: {', '.join(bundle.files)} (tags {', '.join(card)}; license "
                  f"{bundle.manifest.license or 'none: pulling it will need --accept-unlicensed'})")
            if bundle.manifest.preview:
                print(f"preview.wav says: \u201c{bundle.manifest.preview.text}\u201d")
            return 0
        if args.action == "search":
            found = hub.search(args.query, kind=args.kind, base=args.base)
            if args.json:
                print(json.dumps([f.public() for f in found], indent=2))
                return 0
            if not found:
                print("no turnflow adapters found on the Hub" + (f" for {args.query!r}" if args.query else ""))
            for f in found:
                print(f"{f.repo:40s} {f.kind:5s} {f.base_model:28s} {f.license:12s} "
                      f"{', '.join(f.authors) or '-':28s} {f.downloads} downloads")
            return 0
        if args.action == "preview":
            fetched, wav, played = hub.preview(args.repo, out=Path(args.out) if args.out else None, registry=registry)
            print("\n".join(hub.attribution(fetched)))
            print(f"{'played' if played else 'wrote'} {wav}")
            return 0
        manifest = hub.pull(args.repo, accept_unlicensed=args.accept_unlicensed, registry=registry)
        print(f"pulled {manifest.id} ({manifest.kind} {manifest.format}, sha256 {manifest.sha256[:12]} verified, "
              f"license {manifest.license or 'none (accepted)'}, by {', '.join(manifest.authors) or 'unknown'})")
        print(f"name it in a persona as: {manifest.id}")
        return 0
    except hub.HubUnreachable as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 4


def _base_text(manifest: Any) -> str:
    base = manifest.base_model
    return "any model (voice profile)" if base is None else f"base {base.short}"


def _cmd_serve(args: argparse.Namespace) -> int:
    from turnflow.serve import LiveKitCredentials, MissingCredentialsError, run_room_agent

    try:
        credentials = LiveKitCredentials.from_env()
    except MissingCredentialsError as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 2
    personas = [persona.strip() for persona in args.personas.split(",") if persona.strip()]
    return run_room_agent(args.recipe, room=args.room, personas=personas, credentials=credentials, backend=args.backend)


def _cmd_worker(args: argparse.Namespace) -> int:
    from turnflow.serve import LiveKitCredentials, MissingCredentialsError

    try:
        from turnflow.worker import WorkerConfig, run_worker
    except ImportError as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 2
    try:
        LiveKitCredentials.from_env()
    except MissingCredentialsError as exc:
        print(f"turnflow: {exc}", file=sys.stderr)
        return 2
    config = WorkerConfig.checked(
        args.recipe, args.personas.split(","), backend=args.backend, agent_name=args.agent_name
    )
    run_worker(config, args.mode)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="turnflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check recipes, personas and backends files")
    validate.add_argument("paths", nargs="+", help="files or folders")
    validate.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    validate.set_defaults(fn=_cmd_validate)

    render = sub.add_parser("render", help="draw the turn DAG (tiers and cache keys visible)")
    render.add_argument("recipe", help="the recipe YAML file")
    render.add_argument("-o", "--output", required=True, help="OUT.dot, .svg, .png or .html")
    render.add_argument("--persona", help="(accepted for symmetry with run; the DAG is the same for every persona)")
    render.add_argument("--hears", action="store_true", help="draw the branch for a model that hears")
    render.add_argument("--speaks", action="store_true", help="draw the branch for a model that speaks")
    render.add_argument("--report", help="a turn report (run --json) to overlay: node timings and cache hits")
    render.set_defaults(fn=_cmd_render)

    run = sub.add_parser("run", help="run one turn")
    run.add_argument("recipe", help="the recipe YAML file")
    run.add_argument("--persona", required=True, help="the persona id that answers")
    run.add_argument("--room", default="default", help="consecutive runs with the same room continue it")
    run.add_argument("--speaker", default="user", help="who is speaking (a person's name)")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="what the speaker said")
    what.add_argument("--audio", help="a WAV (or FLAC/OGG) file of what the speaker said")
    run.add_argument("--image", action="append", help="an image the speaker shows (repeatable)")
    run.add_argument("--out", help="write the spoken reply to this WAV file")
    run.add_argument("--backend", help="override the recipe's backend")
    run.add_argument("--json", action="store_true", help="print the turn report as JSON")
    run.add_argument("--strict", action="store_true", help="a tier violation fails the turn")
    run.set_defaults(fn=_cmd_run)

    server = sub.add_parser("server", help="the embedded llama-server")
    server.add_argument("action", choices=["up", "down", "status"], help="start it, stop it, or say whether it runs")
    server.add_argument("--backend", help="which embedded backend, or a pool: every embedded member of it "
                        "(default: local for up, all for down/status)")
    server.add_argument("--recipe", help="use the backends beside this recipe")
    server.set_defaults(fn=_cmd_server)

    bench = sub.add_parser("bench", help="turnflow against a naive pipeline, same conversation, same model server")
    bench.add_argument("--quick", action="store_true", help="3 personas, ~4k-token prompts, 5 turns each (or at "
                       "the --personas/--slots given)")
    bench.add_argument("--personas", type=int, help="personas in the room (default 6)")
    bench.add_argument("--turns", type=int, help="turns per persona (default 20)")
    bench.add_argument("--prompt-tokens", type=int, help="prompt size at a persona's first turn (default 14000)")
    bench.add_argument("--out", help="output folder (default bench-runs/<timestamp>/)")
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.add_argument("--backend", metavar="URL", help="use this OpenAI-compatible server instead of an embedded one")
    bench.add_argument("--model", help="embedded model: bench (default; tiny with --backends), tiny, or a GGUF file")
    bench.add_argument("--backends", type=int, metavar="N",
                       help="N embedded servers in a pool: placement (rendezvous, random, round-robin), a member "
                       "killed mid-run, and what adding one would move")
    bench.add_argument("--no-audio", action="store_true", help="text turns only")
    bench.add_argument(
        "--rebuild", metavar="DIR", help="re-write the summary, table and plots of an earlier run from its turns.jsonl"
    )
    bench.add_argument("--slots", type=int, help="slots of the embedded server (default: one per persona)")
    bench.add_argument("--cache-ram", type=int, metavar="MB", help="llama-server's host prompt cache; 0 turns it off")
    bench.add_argument("--no-paging", action="store_true", help="turn turnflow's KV paging off (kv_paging: false)")
    bench.add_argument(
        "--baselines", metavar="LIST",
        help="modes run after turnflow: naive,append_only,no_pinning,no_composition_cache,no_ordering (default all; "
        "none for turnflow alone)",
    )
    bench.add_argument("--max-tokens", type=int, help="reply length cap (default: the recipe's, 48)")
    bench.add_argument("--no-joins", action="store_true", help="nobody joins the first room mid-conversation")
    bench.add_argument(
        "--rooms", choices=("per-persona", "shared"),
        help="per-persona (default): each persona in its own room; shared: all in one room, one shared history",
    )
    bench.set_defaults(fn=_cmd_bench)

    adapters = sub.add_parser("adapters", help="the adapter registry: voice and skill adapters of personas")
    actions = adapters.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a LoRA GGUF or a TTS voice profile (YAML/JSON)")
    add.add_argument("path", help="a .gguf LoRA, a .yaml/.json voice profile, or generated:<model>/<name>")
    add.add_argument("--kind", required=True, choices=("voice", "skill"),
                     help="what the adapter changes: the voice or a skill")
    add.add_argument("--id", help="the id personas name it by (default: the file name)")
    add.add_argument("--license", help="SPDX license id, e.g. Apache-2.0")
    add.add_argument("--author", action="append", help="an author (repeatable)")
    add.add_argument("--base", help="the base model of a LoRA: a GGUF file, generated:tiny, or an embedded backend")
    add.add_argument("--derived-from", action="append", help="what the adapter derives from (repeatable)")
    add.add_argument("--base-hub-id", metavar="OWNER/NAME",
                     help="the base model's Hugging Face Hub id (a published card's base_model); by default the "
                          "LoRA GGUF's general.base_model.0.repo_url, else the base model's when turnflow knows it")
    listing = actions.add_parser("list", help="the adapters in the registry")
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    show = actions.add_parser("show", help="one adapter: file, base model, license, authors, source, derivation")
    show.add_argument("id", help="the adapter's registry id")
    show.add_argument("--json", action="store_true", help="print the entry as JSON")
    remove = actions.add_parser("remove", help="remove an adapter from the registry")
    remove.add_argument("id", help="the adapter's registry id")
    publish = actions.add_parser(
        "publish", help="publish an adapter to the Hugging Face Hub: file, manifest, preview.wav, model card")
    publish.add_argument("id", help="the adapter's registry id")
    publish.add_argument("--repo", required=True, help="the Hub repo, OWNER/NAME")
    publish.add_argument("--private", action="store_true", help="create the repo private")
    publish.add_argument("--token", help="a Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    publish.add_argument("--dry-run", action="store_true", help="write what would be uploaded to --out, no network")
    publish.add_argument("--out", help="the folder for --dry-run (must be new or empty)")
    publish.add_argument("--base", help="which variant (a LoRA's base model: GGUF file, generated:tiny, backend)")
    publish.add_argument("--persona", help="a LoRA's preview is spoken in this persona's TTS voice (file or id)")
    search = actions.add_parser("search", help="find turnflow adapters on the Hub")
    search.add_argument("query", nargs="?", help="words in the repo's name")
    search.add_argument("--kind", choices=("voice", "skill"), help="only voice or only skill adapters")
    search.add_argument("--base", help="the base model's Hub id (OWNER/NAME) or GGUF sha256 prefix")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    preview = actions.add_parser("preview", help="license, attribution and preview.wav of a Hub adapter (no weights)")
    preview.add_argument("repo", help="OWNER/NAME[@REVISION]")
    preview.add_argument("--out", help="write preview.wav here instead of playing it")
    pull = actions.add_parser("pull", help="download a Hub adapter at a pinned commit into the registry")
    pull.add_argument("repo", help="OWNER/NAME[@REVISION]")
    pull.add_argument("--accept-unlicensed", action="store_true", help="pull a repo whose card names no license")
    adapters.set_defaults(fn=_cmd_adapters)

    serve = sub.add_parser("serve", help="join a LiveKit room as the personas and answer the people in it")
    serve.add_argument("recipe", help="the recipe YAML file")
    serve.add_argument("--room", required=True, help="the LiveKit room to join")
    serve.add_argument("--personas", required=True, help="comma-separated persona ids; the first one listens")
    serve.add_argument("--backend", help="override the recipe's backend")
    serve.set_defaults(fn=_cmd_serve)

    worker = sub.add_parser(
        "worker", help="a LiveKit Agents worker: rooms dispatched to it by name get the personas (see also serve)"
    )
    worker.add_argument("recipe", help="the recipe YAML file")
    worker.add_argument("--personas", required=True, help="comma-separated persona ids every dispatched room gets")
    worker.add_argument("--backend", help="override the recipe's backend")
    worker.add_argument("--agent-name", default="turnflow", help="the name rooms dispatch the worker by")
    worker.add_argument(
        "mode", nargs="?", default="start", choices=("start", "dev"),
        help="LiveKit Agents' mode: start (production: load threshold, warm processes) or dev",
    )
    worker.set_defaults(fn=_cmd_worker)
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
