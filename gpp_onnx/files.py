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
import tempfile
from collections.abc import Iterator
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


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    The temporary file is removed on every exit path; an OSError becomes a UserError.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


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
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name[:200]}.", dir=destination.parent))
    except OSError as exc:
        raise _cannot_write(destination, exc) from None
    try:
        yield tmp
    except OSError as exc:
        raise _cannot_write(destination, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
