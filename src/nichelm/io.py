"""Atomic, durable writes: a temporary file in the same folder, fsync, rename, fsync the folder.

A reader never sees half a file, and once a write returns a power loss cannot undo it: the
rename is only on disk once the folder itself is fsync'd.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


@contextmanager
def atomic_file(path: Path):
    """A binary file to write in a `with` block; it replaces `path` (file and folder fsync'd) only when
    the block ends without an error. For outputs written piece by piece, too big to build in memory first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())          # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)                         # the rename itself, on disk


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (files created, renamed or deleted in it) durable.

    A rename is recorded in the folder, not in the file: without this a power loss right
    after a rename can bring back the old name. No-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                                # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else's writer (safetensors, tokenizers) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (itself included): a whole staged folder on disk."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(parent) / name)
        fsync_dir(Path(parent))


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in `parent` to build an output in before replace_dir puts it in place;
    with the usual folder mode (mkdtemp makes 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())
    return path


def replace_dir(staged: Path, dest: Path) -> None:
    """Swap a finished folder (fsync'd by the caller) into place: the old one is renamed aside, the
    new one renamed in and the parent fsync'd, and only then is the old one deleted. A reader sees
    the whole old folder or the whole new one; a crash between the two renames leaves the old one
    as .NAME.old-PID beside it."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    staged.rename(dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
