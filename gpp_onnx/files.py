"""Writing files and folders atomically: the one place outputs are written from.

Everything is written under a temporary name in the destination's folder and renamed
into place, so a reader never sees a half-written file and a failure (or an
interruption) leaves nothing behind. Files get the permissions the user's umask gives a
new file, not the 0600 of a temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
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


def _hold_interruptions() -> object:
    """Block SIGINT and SIGTERM in the main thread; returns what :func:`_release_interruptions` needs."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release_interruptions(previous: object) -> None:
    """Restore the signal mask; an interruption that arrived meanwhile is delivered now."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # type: ignore[arg-type]


@contextmanager
def _temporary(create: Callable[[], Path], remove: Callable[[Path], None]) -> Iterator[Path]:
    """``create()``'s path, removed by ``remove`` on every exit path. SIGINT and SIGTERM are held back
    from before the creation until the removal is armed: an interruption in between would leak it."""
    held = _hold_interruptions()
    try:
        path = create()
    except BaseException:
        _release_interruptions(held)
        raise
    try:
        _release_interruptions(held)  # a pending interruption is raised here, inside the try
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
