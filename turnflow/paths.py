"""Where turnflow keeps its state on disk: conversation store, composition cache, models, servers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def file_stamp(path: Path) -> tuple[int, int]:
    """A file's size and modification time (ns): what says it may have changed without reading it."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` by renaming a finished temporary file over it: a reader sees the old file or the
    new one, and the new one is a new inode (which `replaced_stamp` tells apart)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def replaced_stamp(path: Path) -> tuple[int, int, int]:
    """A file's inode, size and modification time (ns): changes whenever `replace_text` wrote it again."""
    return stamp_of(path.stat())


def stamp_of(stat: os.stat_result) -> tuple[int, int, int]:
    """`replaced_stamp` of a file already `stat`ed."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def home() -> Path:
    """The state directory: `$TURNFLOW_HOME`, else `~/.local/share/turnflow`."""
    root = os.environ.get("TURNFLOW_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "turnflow"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Generated models (text model, audio projector, adapters): `$TURNFLOW_MODELS`, else `~/.cache/turnflow/models`.

    Kept apart from `home()` so tests with a throw-away home still share one set of generated models.
    """
    root = os.environ.get("TURNFLOW_MODELS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "turnflow", "models"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def servers_dir() -> Path:
    """Pid and port files of the embedded model servers."""
    path = home() / "servers"
    path.mkdir(parents=True, exist_ok=True)
    return path
