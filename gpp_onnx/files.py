"""Writing files and folders atomically: the one place outputs are written from.

Everything is written under a temporary name in the destination's folder and renamed
into place, so a reader never sees a half-written file and a failure (or an
interruption: applications install :func:`interruption_handler` for SIGINT and SIGTERM, which
never lands between a temporary's creation and the arming of its removal) leaves nothing
behind. Files get the permissions the user's umask gives a new file, not the 0600 of a
temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gpp_onnx.errors import UserError


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write {path} ({exc.strerror or exc}); choose a writable location")


class _Interruptions:
    """Whether SIGINT / SIGTERM are being deferred, and whether one arrived meanwhile."""

    deferring = 0
    pending = False


def interruption_handler(signum: int, frame: object) -> None:
    """A SIGINT / SIGTERM handler for applications: raises KeyboardInterrupt (which unwinds, removing
    every temporary file and folder on the way out), except while a temporary is between its creation
    and the arming of its removal - then the interruption is raised as soon as that is armed."""
    if _Interruptions.deferring:
        _Interruptions.pending = True
        return
    raise KeyboardInterrupt


def _defer_interruptions() -> None:
    _Interruptions.deferring += 1


def _resume_interruptions() -> None:
    """End a deferral; raise the interruption that arrived during it."""
    _Interruptions.deferring -= 1
    if not _Interruptions.deferring and _Interruptions.pending:
        _Interruptions.pending = False
        raise KeyboardInterrupt


@contextmanager
def _temporary(create: Callable[[], Path], remove: Callable[[Path], None]) -> Iterator[Path]:
    """``create()``'s path, removed by ``remove`` on every exit path. Under :func:`interruption_handler`,
    an interruption between the creation and the arming of the removal is raised once it is armed
    (signals reach Python in whichever thread, so blocking them in this one would not do)."""
    _defer_interruptions()
    try:
        path = create()
    except BaseException:
        _Interruptions.deferring -= 1
        raise
    try:
        _resume_interruptions()
        yield path
    finally:
        remove(path)


def _new_file(prefix: str, folder: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    The temporary file is removed on every exit path; an OSError becomes a UserError.
    """
    path = Path(path)
    try:
        with _temporary(lambda: _new_file(f".{path.name[:200]}.", path.parent), _unlink) as tmp:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except OSError as exc:
        raise _cannot_write(path, exc) from None


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _remove_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def temporary_folder(prefix: str) -> Iterator[Path]:
    """A folder in the system's temporary directory, removed on every exit path (interruptions included)."""
    with _temporary(lambda: Path(tempfile.mkdtemp(prefix=prefix)), _remove_folder) as folder:
        yield folder


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def staging_folder(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``destination``, removed on every exit path.

    The caller writes its files there and moves them into place (``os.replace``) at the end,
    so a failure never leaves a partial set of files.
    """
    destination = Path(destination)
    prefix = f".{destination.name[:200]}."
    try:
        with _temporary(lambda: Path(tempfile.mkdtemp(prefix=prefix, dir=destination.parent)), _remove_folder) as tmp:
            yield tmp
    except OSError as exc:
        raise _cannot_write(destination, exc) from None


def publish(tmp_file: Path, destination: Path) -> None:
    """Move a file written in a staging folder onto ``destination`` with the umask's permissions."""
    os.chmod(tmp_file, 0o666 & ~_umask())
    os.replace(tmp_file, destination)


def read_json(path: Path, missing: str, unreadable: str) -> object:
    """The JSON document in ``path``; UserError ``missing`` when there is no such file, and
    ``unreadable`` followed by the cause when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{unreadable} ({exc})") from None
