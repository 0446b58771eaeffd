"""`turnflow validate`: every malformed recipe or persona gets `FILE:LINE: what is wrong, what would be right`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, copy_recipe_folder

from turnflow.recipe import RecipeError, load_recipe, validate_paths

GOOD_SOURCES = """\
sources:
  - {name: persona_identity, tier: invariant, cache_key: [persona_id, persona_version]}
  - {name: conversation_history, tier: semi_stable, cache_key: [room_id, persona_id, history_tail_msg_ids]}
  - {name: user_turn, tier: volatile}
"""


def run_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    """Run the real CLI, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "turnflow.cli", "validate", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_recipe(tmp_path: Path, body: str, name: str = "broken.yaml") -> Path:
    """A recipe in a folder that has the example personas beside it."""
    recipe = copy_recipe_folder(tmp_path)
    path = recipe.parent / name
    path.write_text(textwrap.dedent(body))
    return path


def test_example_recipes_are_valid() -> None:
    result = run_validate(REPO / "recipes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok:" in result.stdout


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        pytest.param(
            "recipe: x\nsources:\n  - {name: user_turn, tier: volatile\n  - name: b\n",
            4,
            ["YAML syntax error"],
            id="yaml-syntax",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - name: persona_identity\n    tier: stable\n"
            "  - {name: user_turn, tier: volatile}\n",
            4,
            ["unknown tier 'stable'", "invariant, semi_stable, volatile"],
            id="unknown-tier",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n  - {name: current_time, tier: volatile}\n"
            "  - {name: user_turn, tier: volatile}\n",
            5,
            ["duplicate source name 'user_turn'"],
            id="duplicate-source",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - name: persona_identity\n    tier: invariant\n    cache_key:\n      - persona_id\n"
            "      - persona_versoin\n  - {name: user_turn, tier: volatile}\n",
            7,
            ["unknown cache key 'persona_versoin'", "did you mean 'persona_version'"],
            id="unknown-cache-key",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n  - name: notes\n    tier: invariant\n"
            "    fn: no_such_module:notes\n",
            6,
            ["cannot import 'no_such_module:notes'", "No module named"],
            id="fn-not-importable",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n  - name: notes\n    tier: invariant\n"
            "    fn: my_sources:bad_param\n",
            6,
            ["parameter 'weather' of my_sources:bad_param is not a DAG value"],
            id="fn-wrong-parameter",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n  - name: notes\n    tier: invariant\n"
            "    fn: my_sources:returns_number\n",
            6,
            ["returns_number is annotated to return", "a source returns text (str) or a list of chat messages"],
            id="fn-wrong-return",
        ),
        pytest.param(
            "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n"
            "  - {name: conversation_histroy, tier: semi_stable}\n",
            4,
            ["unknown built-in source 'conversation_histroy'", "did you mean 'conversation_history'"],
            id="unknown-builtin",
        ),
        pytest.param(
            "recipe: x\npersonas: [maya, mya]\n" + GOOD_SOURCES,
            2,
            ["persona 'mya' not found", "did you mean 'maya'"],
            id="persona-not-found",
        ),
        pytest.param(
            "recipe: x\nsorces: []\n" + GOOD_SOURCES,
            2,
            ["unknown key 'sorces'", "did you mean 'sources'"],
            id="unknown-key",
        ),
        pytest.param(
            "recipe: x\nbackend: nowhere\n" + GOOD_SOURCES,
            2,
            ["unknown backend 'nowhere'"],
            id="unknown-backend",
        ),
        pytest.param(
            "recipe: x\n" + GOOD_SOURCES + "speech:\n  tts: espeak-ng\n  stt: whisperx\n",
            8,
            ["unknown stt bridge 'whisperx'", "'pocketsphinx', 'whisper' or {url: ..., model: ...}"],
            id="unknown-stt-bridge",
        ),
        pytest.param(
            "recipe: x\n" + GOOD_SOURCES + "speech:\n  tts: pipper\n",
            7,
            ["unknown tts bridge 'pipper'", "'espeak-ng', 'espeak', 'piper' or {url: ..., model: ...}"],
            id="unknown-tts-bridge",
        ),
        pytest.param(
            "recipe: x\n" + GOOD_SOURCES + "speech:\n  describe: {url: 'http://127.0.0.1:9', modle: vl}\n",
            7,
            ["the describe bridge does not take ['modle']", "url, model, api_key, timeout"],
            id="http-bridge-key",
        ),
        *[
            pytest.param(
                GOOD_SOURCES.replace("sources:\n", f"recipe: x\nsources:\n  - {{name: {name}, tier: volatile, "
                                                    f"fn: 'my_mod:f'}}\n"),
                3,
                [f"source name {name!r} is taken by a node of the turn DAG"],
                id=f"reserved-{name}",
            )
            for name in ("media", "speech", "transcript", "images", "kv")
        ],
    ],
)
def test_malformed_recipe_names_file_line_and_fix(tmp_path: Path, body: str, line: int, words: list[str]) -> None:
    path = write_recipe(tmp_path, body)
    (path.parent / "my_sources.py").write_text(
        "def bad_param(weather):\n    return 'x'\n\ndef returns_number(persona_id: str) -> int:\n    return 1\n"
    )
    result = run_validate(path)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(f"{path}:")]
    assert lines, result.stdout
    match = [ln for ln in lines if all(w in ln for w in words)]
    assert match, f"expected {words} in:\n{result.stdout}"
    assert match[0].startswith(f"{path}:{line}: "), match[0]


def test_persona_missing_fields_each_reported(tmp_path: Path) -> None:
    recipe = copy_recipe_folder(tmp_path)
    persona = recipe.parent / "personas" / "ghost.yaml"
    persona.write_text("persona: ghost\nname: Ghost\n# no version, no system_prompt\ntools: []\n")
    problems = validate_paths([persona])
    messages = [str(p) for p in problems]
    assert any("missing required key 'version'" in m and m.startswith(f"{persona}:1:") for m in messages), messages
    assert any("missing required key 'system_prompt'" in m for m in messages), messages


def test_persona_id_must_match_file_name(tmp_path: Path) -> None:
    recipe = copy_recipe_folder(tmp_path)
    persona = recipe.parent / "personas" / "maya.yaml"
    persona.write_text(persona.read_text().replace("persona: maya", "persona: maya2", 1))
    problems = validate_paths([persona])
    assert len(problems) == 1 and "differs from the file name" in problems[0].message


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n  - {name: a1, tier: invariant}\n"
        "  - {name: current_time, tier: volatile, cache_key: [room]}\n",
    )
    problems = [p for p in validate_paths([path]) if p.severity == "error"]
    assert {p.line for p in problems} == {4, 5}, problems


def test_load_recipe_raises_all_problems(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, "recipe: x\nsources:\n  - {name: nope, tier: invariant}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "unknown built-in source 'nope'" in text
    assert "no user_turn source" in text


def test_cache_key_that_misses_a_dependency_is_a_warning(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        "recipe: x\nsources:\n  - {name: user_turn, tier: volatile}\n"
        "  - {name: persona_identity, tier: invariant, cache_key: [recipe_id]}\n",
    )
    problems = validate_paths([path])
    warnings = [p for p in problems if p.severity == "warning"]
    assert warnings and "does not cover it" in warnings[0].message
    assert str(warnings[0]).startswith(f"{path}:4: warning: ")
    assert run_validate(path).returncode == 0  # warnings do not fail validation


@pytest.mark.parametrize(
    ("damage", "line", "words"),
    [
        ("duplicate", 12, ["'version' appears twice", "first on line 6"]),
        ("alias bomb", 15, ["YAML aliases", "200,000 values"]),
        ("latin-1", 8, ["not UTF-8", "0xe9", "save the file as UTF-8"]),
        ("utf-16", 1, ["UTF-16", "save the file as UTF-8"]),
        ("huge", 1, ["MB", "at most 1 MB"]),
    ],
)
def test_damaged_files_are_refused_at_their_line(tmp_path: Path, damage: str, line: int, words: list[str]) -> None:
    recipe = copy_recipe_folder(tmp_path)
    lines = recipe.read_text().splitlines(keepends=True)
    assert lines[5].startswith("version:")
    if damage == "duplicate":
        lines.insert(11, "version: 2\n")
        data = "".join(lines).encode()
    elif damage == "alias bomb":
        bomb = "x0: &x0 [a, a, a, a, a, a, a, a, a]\n" + "".join(
            f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 9))
        data = ("".join(lines[:6]) + bomb + "".join(lines[6:])).encode()
    elif damage == "latin-1":
        data = "".join(lines[:7]).encode() + b"# caf\xe9 (latin-1)\n" + "".join(lines[7:]).encode()
    elif damage == "utf-16":
        data = "".join(lines).encode("utf-16")
    else:
        data = "".join(lines).encode() + b"# " + b"x" * 1_100_000 + b"\n"
    recipe.write_bytes(data)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    problem = info.value.problems[0]
    assert (problem.file, problem.line) == (str(recipe), line), str(problem)
    for word in words:
        assert word in problem.message


def test_every_command_line_option_says_what_it_is() -> None:
    """`turnflow <command> --help` explains every argument of every command and subcommand."""
    import argparse

    from turnflow.cli import build_parser

    unexplained: list[str] = []

    def visit(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                    visit(sub)
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                unexplained.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")

    visit(build_parser())
    assert unexplained == []


def test_the_names_the_dataflows_declare_cover_every_node_of_every_route() -> None:
    from turnflow.driver import declared_names, is_reserved, reserved_node_names

    reserved = reserved_node_names()
    assert reserved <= declared_names()  # else `is_reserved` would let a source take a node's name
    assert {"media", "speech", "transcript", "slot_pinning", "composition_cache"} <= reserved
    assert all(is_reserved(name) for name in reserved)
    assert not is_reserved("participants") and not is_reserved("stt")  # declared (a parameter, a route) but no node
