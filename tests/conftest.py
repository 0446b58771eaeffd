"""Shared fixtures: a throw-away turnflow home per test module, and a real embedded llama-server in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from turnflow.recipe import default_backends_path, load_backends
from turnflow.server import EmbeddedServer, ServerError, llama_server_binary

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "voice-chat.yaml"


def llama_server_or_skip() -> str:
    """The llama-server binary, or a visible skip when the `server` extra is not installed."""
    try:
        return llama_server_binary()
    except ServerError as exc:
        pytest.skip(f"needs the embedded llama-server: {exc}")


@pytest.fixture(scope="session")
def example_adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding the example personas' adapters, added through the CLI as `make demo` adds them."""
    template = tmp_path_factory.mktemp("adapters-home")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "TURNFLOW_HOME": str(template), "TURNFLOW": str(bin_dir / "turnflow"),
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    subprocess.run([str(REPO / "scripts" / "example-adapters.sh")], env=env, check=True, capture_output=True)
    return template / "adapters"


def add_example_adapters(home: Path, registry: Path) -> None:
    """Give a turnflow home the example adapters (a copy of the session's registry)."""
    shutil.copytree(registry, home / "adapters", dirs_exist_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _default_home(tmp_path_factory: pytest.TempPathFactory, example_adapters: Path) -> Iterator[None]:
    """No test touches the user's own turnflow home: the default one is a throw-away with the example adapters."""
    path = tmp_path_factory.mktemp("default-home")
    add_example_adapters(path, example_adapters)
    previous = os.environ.get("TURNFLOW_HOME")
    os.environ["TURNFLOW_HOME"] = str(path)
    try:
        yield
    finally:
        for name, spec in load_backends(default_backends_path()).items():
            if spec.kind == "embedded":
                EmbeddedServer(name, spec).down()
        if previous is None:
            os.environ.pop("TURNFLOW_HOME", None)
        else:
            os.environ["TURNFLOW_HOME"] = previous


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, example_adapters: Path) -> Iterator[Path]:
    """A fresh TURNFLOW_HOME for the module, with the example adapters; its embedded servers stop afterwards."""
    path = tmp_path_factory.mktemp("turnflow-home")
    add_example_adapters(path, example_adapters)
    previous = os.environ.get("TURNFLOW_HOME")
    os.environ["TURNFLOW_HOME"] = str(path)
    try:
        yield path
    finally:
        for name, spec in load_backends(default_backends_path()).items():
            if spec.kind == "embedded":
                EmbeddedServer(name, spec).down()
        if previous is None:
            os.environ.pop("TURNFLOW_HOME", None)
        else:
            os.environ["TURNFLOW_HOME"] = previous


@pytest.fixture(scope="module")
def local_url(home: Path) -> str:
    """URL of the embedded `local` backend (text-only tiny model), started for this module."""
    llama_server_or_skip()
    spec = load_backends(default_backends_path())["local"]
    return EmbeddedServer("local", spec).up()


def copy_recipe_folder(tmp_path: Path) -> Path:
    """A private copy of the example recipes, to edit in a test; returns the recipe's path."""
    target = tmp_path / "recipes"
    shutil.copytree(REPO / "recipes", target, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return target / "voice-chat.yaml"


@pytest.fixture(autouse=True)
def _server_tests_need_llama_server(request: pytest.FixtureRequest) -> None:
    """Tests marked `server` are skipped, visibly, where llama-server is not installed."""
    if request.node.get_closest_marker("server") is not None:
        llama_server_or_skip()


def without_adapters(recipe: Path, persona_id: str) -> None:
    """Drop a persona's LoRA adapters in a copied recipe folder (for stand-in servers that load none)."""
    import yaml

    path = recipe.parent / "personas" / f"{persona_id}.yaml"
    data = yaml.safe_load(path.read_text())
    data["voice"].pop("adapter", None)
    data["skills"] = []
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def postgres_binaries() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl), or None when the server is not installed."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "pg_ctl").exists() and (folder / "initdb").exists():
            return folder
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for the session: initdb into a temporary folder, started on a free port (its unix
    socket in that folder too), stopped afterwards. Skipped, visibly, when the server binaries are missing."""
    import pwd
    import socket
    import tempfile

    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("needs PostgreSQL's server binaries: apt-get install postgresql (scripts/install-system-deps.sh)")
    root = Path(tempfile.mkdtemp(prefix="turnflow-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres (or nobody) user
        user = next((u for u in ("postgres", "nobody") if _user_exists(pwd, u)), None)
        if user is None:
            pytest.skip("running as root and no postgres or nobody user to run PostgreSQL as")
        shutil.chown(root, user)
        run_as = ["runuser", "-u", user, "--"]
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([*run_as, str(binaries / "initdb"), "-D", str(data), "-U", "turnflow", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run([*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                    "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://turnflow@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(pwd: object, name: str) -> bool:
    try:
        pwd.getpwnam(name)  # type: ignore[attr-defined]
    except KeyError:
        return False
    return True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Shut LiveKit's native runtime down while the interpreter is still whole: the tests make real
    `rtc.AudioSource`s, and its `atexit` disposal can abort a finalizing process (see the helper)."""
    from turnflow.serve.run import release_livekit_runtime

    release_livekit_runtime()
