"""The one atomic-write helper: whole files or nothing, no temporary left behind, the user's umask."""

from __future__ import annotations

import os
import stat

import pytest

from gpp_onnx import UserError
from gpp_onnx.files import atomic_path, publish, staging_folder, write_text


def test_a_written_file_appears_whole_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "out.txt", "hello")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_an_unwritable_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot write"):
        write_text(tmp_path / "missing" / "out.txt", "x")


def test_a_staging_folder_is_removed_on_every_exit(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_folder(tmp_path / "result") as tmp:
            (tmp / "a.bin").write_bytes(b"1")
            raise RuntimeError("failed half-way")
    assert list(tmp_path.iterdir()) == []
    with staging_folder(tmp_path / "result") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        publish(tmp / "a.bin", tmp_path / "a.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("kind", ["file", "folder", "staging"])
def test_an_interruption_right_after_creation_leaves_nothing(tmp_path, monkeypatch, kind):
    """SIGTERM arriving just after the temporary file or folder exists, before its cleanup is armed: the
    CLI's handler defers it, and it is raised (KeyboardInterrupt) inside the block that removes it."""
    import os
    import signal
    import tempfile

    from gpp_onnx import files

    previous = signal.signal(signal.SIGTERM, files.interruption_handler)  # as the CLI installs it
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def then_signal(real):
        def create(*args, **kwargs):
            made = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            return made

        return create

    monkeypatch.setattr(tempfile, "mkstemp", then_signal(real_mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", then_signal(real_mkdtemp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        with pytest.raises(KeyboardInterrupt):
            if kind == "file":
                with files.atomic_path(tmp_path / "out.bin") as tmp:
                    tmp.write_bytes(b"x")
            elif kind == "folder":
                with files.temporary_folder("t."):
                    pass
            else:
                with files.staging_folder(tmp_path / "bundle"):
                    pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []
