"""Rendering the turn DAG for review: DOT, SVG, PNG or HTML, with tiers, cache keys and user sources visible.

The graph comes from the built Hamilton driver (`list_available_variables`), so what is drawn is what
runs. Given a turn report, the drawing is overlaid with that turn's node timings and cache hits.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import graphviz

from turnflow.driver import build_driver
from turnflow.recipe import Recipe

TIER_COLOURS = {"invariant": "#cfe8cf", "semi_stable": "#fff2b3", "volatile": "#f9d0c4"}
TIER_LABELS = {"invariant": "invariant (byte-identical)", "semi_stable": "semi-stable (append-only)",
               "volatile": "volatile (new every turn)"}
_FIXED_COLOUR = "#dde6f5"
_INPUT_COLOUR = "#f2f2f2"


def _type_name(value: Any) -> str:
    name = getattr(value, "__name__", None) or str(value)
    return name.replace("typing.", "")


def _node_label(node: Any, overlay: dict[str, Any]) -> str:
    tags = node.tags
    rows = [f'<tr><td><b>{html.escape(node.name)}</b></td></tr>']
    tier = tags.get("tier")
    if tier:
        rows.append(f'<tr><td><font point-size="10">{html.escape(TIER_LABELS[tier])}</font></td></tr>')
        keys = tags.get("cache_key", "none")
        cache_text = "not cached" if keys == "none" else "cache: " + keys.replace(",", ", ")
        rows.append(f'<tr><td><font point-size="9">{html.escape(cache_text)}</font></td></tr>')
        if tags.get("source") == "user":
            rows.append(f'<tr><td><font point-size="9"><i>{html.escape(tags["source_fn"])}</i></font></td></tr>')
    else:
        rows.append(f'<tr><td><font point-size="9"><i>{html.escape(_type_name(node.type))}</i></font></td></tr>')
    timing = overlay.get("nodes", {}).get(node.name)
    if timing is not None:
        extra = f"{timing:.2f} ms"
        hit = overlay.get("cache", {}).get(node.name)
        if hit:
            extra += f" · {hit}"
        rows.append(f'<tr><td><font point-size="9" color="#1a5fb4">{html.escape(extra)}</font></td></tr>')
    return "<<table border=\"0\" cellborder=\"0\" cellspacing=\"0\">" + "".join(rows) + "</table>>"


def build_graph(recipe: Recipe, profile: dict[str, str], report: dict[str, Any] | None = None) -> graphviz.Digraph:
    """The turn DAG as a graphviz Digraph; `report` (a turn report) adds that turn's timings."""
    dr = build_driver(recipe, profile)
    nodes = dr.list_available_variables()
    overlay: dict[str, Any] = {}
    if report:
        overlay["nodes"] = (report.get("timings_ms") or {}).get("nodes", {})
        overlay["cache"] = report.get("composition_cache", {}).get("by_source", {})
    graph = graphviz.Digraph(
        name=f"turn:{recipe.recipe}",
        graph_attr={
            "rankdir": "LR",
            "label": f"{recipe.recipe} v{recipe.version} — turn DAG "
            f"({', '.join(f'{k}={v}' for k, v in sorted(profile.items()))})",
            "labelloc": "t",
            "fontname": "Helvetica",
        },
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "11"},
        edge_attr={"color": "#777777"},
    )
    used = {dep for node in nodes for dep in (*node.required_dependencies, *node.optional_dependencies)}
    nodes = [node for node in nodes if not node.is_external_input or node.name in used]  # drop bare config
    for node in nodes:
        if node.is_external_input:
            graph.node(node.name, label=f"{node.name}\n({_type_name(node.type)})", shape="ellipse",
                       fillcolor=_INPUT_COLOUR, style="filled", fontsize="9")
            continue
        tier = node.tags.get("tier")
        attrs = {"fillcolor": TIER_COLOURS.get(tier, _FIXED_COLOUR)} if tier else {"fillcolor": _FIXED_COLOUR}
        if node.tags.get("source") == "user":
            attrs.update(style="rounded,filled,dashed", penwidth="2")
        attrs["tooltip"] = (node.documentation or node.name).replace("\n", " ")
        graph.node(node.name, label=_node_label(node, overlay), **attrs)
    for node in nodes:
        for dep in (*node.required_dependencies, *node.optional_dependencies):
            graph.edge(dep, node.name)
    with graph.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", fontsize="10", style="dashed")
        for tier, colour in TIER_COLOURS.items():
            legend.node(f"legend_{tier}", TIER_LABELS[tier], fillcolor=colour, fontsize="9")
        legend.node("legend_fixed", "fixed node of the turn", fillcolor=_FIXED_COLOUR, fontsize="9")
        legend.node("legend_user", "your own source (fn:)", fillcolor="white", style="rounded,filled,dashed",
                    penwidth="2", fontsize="9")
    return graph


def sources_table(recipe: Recipe) -> list[dict[str, str]]:
    """One row per recipe source: name, tier, cache key, implementation."""
    return [
        {"name": s.name, "tier": s.tier, "cache_key": ", ".join(s.cache_key) or "not cached",
         "fn": s.fn or f"built-in {s.name}"}
        for s in recipe.sources
    ]


def _html_page(recipe: Recipe, svg: str) -> str:
    rows = "".join(
        f"<tr style='background:{TIER_COLOURS[r['tier']]}'><td>{html.escape(r['name'])}</td>"
        f"<td>{html.escape(r['tier'])}</td><td>{html.escape(r['cache_key'])}</td><td><code>{html.escape(r['fn'])}"
        f"</code></td></tr>"
        for r in sources_table(recipe)
    )
    title = html.escape(f"{recipe.recipe} — turn DAG")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left}}svg{{max-width:100%;height:auto}}</style></head>
<body><h1>{title}</h1><p>{html.escape(recipe.description)}</p>
<p>Sources are assembled stable-first: invariant, then semi-stable, then volatile, sorted by name in each tier.</p>
<table><tr><th>source</th><th>tier</th><th>cache key</th><th>function</th></tr>{rows}</table>
<div>{svg}</div>
<script type="application/json" id="recipe">{html.escape(json.dumps(sources_table(recipe)))}</script>
</body></html>
"""


def render(recipe: Recipe, out: Path, *, profile: dict[str, str], report: dict[str, Any] | None = None) -> Path:
    """Write the DAG to `out`; the format follows the suffix (.dot, .svg, .png, .html)."""
    graph = build_graph(recipe, profile, report)
    suffix = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".dot", ".gv"):
        out.write_text(graph.source)
        return out
    if suffix not in (".svg", ".png", ".html"):
        raise ValueError(f"cannot render to {out.name!r}: use .dot, .svg, .png or .html")
    if shutil.which("dot") is None:
        raise RuntimeError(
            f"rendering {suffix} needs Graphviz's `dot` (apt-get install graphviz); .dot output works without it"
        )
    if suffix == ".png":
        out.write_bytes(graph.pipe(format="png"))
    else:
        svg = graph.pipe(format="svg").decode()
        out.write_text(_html_page(recipe, svg) if suffix == ".html" else svg)
    return out
