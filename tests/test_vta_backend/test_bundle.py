"""write_programs: all files or none, no staging folder left behind, stale programs of an earlier compile removed."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from helpers import conv_model

from gpp_onnx import UserError
from vta_backend import VTAConfig
from vta_backend.bundle import write_programs
from vta_backend.isa import decode_program
from vta_backend.model import compile_model

CONFIG = VTAConfig()


@pytest.fixture
def compiled(rng):
    weights = [
        rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        rng.standard_normal((16, 32, 1, 1)).astype(np.float32),
    ]
    return compile_model(conv_model(weights, [1, 16, 8, 8], attrs=[{"pads": [1] * 4}, {}]), CONFIG)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_new_folder_holds_the_programs_and_the_summary(compiled, tmp_path):
    out = tmp_path / "vta"
    names = write_programs(compiled, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(names) and names[-1] == "summary.json"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    summary = json.loads((out / "summary.json").read_text())
    assert set(compiled.report().to_dict()) | {"format", "version", "programs", "config", "dram"} == set(summary)
    assert summary["version"] == 2 and summary["config"]["BOARD"] == "pynq"
    conv1 = summary["programs"][1]
    assert conv1["name"] == "conv1" and conv1["instructions"]["file"] == "001_conv1.insn.bin"
    assert conv1["input"]["shape"] == [1, 32, 8, 8] and conv1["input"]["packed_shape"] == [1, 2, 8, 8, 1, 16]
    assert conv1["output"]["elements"] == conv1["buffers"]["out"]["elements"] == 8 * 8 and conv1["residual"] is None
    for buffer in conv1["buffers"].values():  # every file summary.json names has the size it gives
        if buffer["file"] is not None:
            assert (out / buffer["file"]).stat().st_size == buffer["bytes"]
    program = compiled.layers["conv0"].programs[0]
    assert decode_program((out / "000_conv0.insn.bin").read_bytes(), CONFIG) == program.insns
    assert [p for p in tmp_path.iterdir() if p.name != "vta"] == []  # no staging folder left


def test_rewrite_removes_stale_programs_and_keeps_other_files(compiled, tmp_path):
    out = tmp_path / "vta"
    out.mkdir()
    stale = ["000_conv0.insn.bin", "005_old.wgt.bin", "002_x.acc.bin", "summary.json"]
    unrelated = ["notes.txt", "005_old.wgt.bin.bak", "model.onnx", "abc_conv.insn.bin"]
    for name in stale + unrelated:
        (out / name).write_text("old")
    (out / "003_folder.uop.bin").mkdir()  # a folder is never a program file of ours
    names = write_programs(compiled, out)
    present = {p.name for p in out.iterdir()}
    assert present == set(names) | set(unrelated) | {"003_folder.uop.bin"}
    assert (out / "notes.txt").read_text() == "old" and (out / "000_conv0.insn.bin").read_bytes() != b"old"
    assert [p for p in tmp_path.iterdir() if p.name != "vta"] == []


@pytest.mark.parametrize("existing", [False, True])
def test_failure_leaves_nothing_behind(compiled, tmp_path, monkeypatch, existing):
    out = tmp_path / "vta"
    if existing:
        out.mkdir()
        (out / "000_conv0.insn.bin").write_text("earlier")

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)  # the binaries are written, then summary.json fails
    with pytest.raises(UserError, match="No space left on device"):
        write_programs(compiled, out)
    assert [p.name for p in tmp_path.iterdir()] == (["vta"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["000_conv0.insn.bin"]
        assert (out / "000_conv0.insn.bin").read_bytes() == b"earlier"


def test_output_that_is_a_file_is_an_error(compiled, tmp_path):
    (tmp_path / "vta").write_text("")
    with pytest.raises(UserError, match="is a file"):
        write_programs(compiled, tmp_path / "vta")
