"""Run one program of a written bundle from its files alone, with our ISA interpreter.

For people who check the files against a board or another simulator: the inputs are the raw
files such a host would give VTA (packed int8, as summary.json describes them), the output is
the raw OUT buffer VTA would write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpp_onnx.errors import UserError
from gpp_onnx.files import read_json
from vta_backend.bundle import FORMAT, SUMMARY, VERSION
from vta_backend.config import VTAConfig
from vta_backend.isa import MemType
from vta_backend.simulator import execute


@dataclass(frozen=True)
class BundleProgram:
    """One program of a bundle: its summary entry, configuration and folder."""

    folder: Path
    entry: dict
    config: VTAConfig

    def file(self, key: str) -> bytes:
        """The bytes of the file summary.json names for ``key`` (``instructions``, ``constants`` or a buffer)."""
        description = self.entry[key] if key in ("instructions", "constants") else self.entry["buffers"][key]
        path = self.folder / description["file"]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {path} ({exc.strerror}); re-run gpp-onnx compile") from None

    def expected_bytes(self, tensor: str) -> int:
        """Bytes of the raw packed ``input`` or ``residual`` file."""
        return int(self.entry[tensor]["elements"]) * self.config.inp_vector_bytes


def _summary(folder: Path) -> dict:
    path = folder / SUMMARY
    missing = f"{folder} holds no {SUMMARY}; pass a folder written by gpp-onnx compile"
    summary = read_json(path, missing, f"{path} is not readable JSON; re-run gpp-onnx compile")
    if not isinstance(summary, dict) or summary.get("format") != FORMAT or summary.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} program bundle; re-run gpp-onnx compile")
    return summary


# What reading a summary entry or program file that was edited by hand raises.
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _malformed(folder: Path, exc: Exception) -> UserError:
    """The one-line error for a bundle whose summary.json or program files do not fit together."""
    return UserError(
        f"{folder / SUMMARY} or its program files are malformed ({type(exc).__name__}: {exc}); re-run gpp-onnx compile"
    )


def open_program(folder: str | Path, name: str) -> BundleProgram:
    """The program ``name`` of the bundle in ``folder`` (UserError listing the names when absent)."""
    folder = Path(folder)
    summary = _summary(folder)
    try:
        names = [str(entry["name"]) for entry in summary["programs"]]
        if name not in names:
            raise UserError(f"no program {name!r} in {folder}; programs: {', '.join(names)}")
        entry = summary["programs"][names.index(name)]
        if not isinstance(entry, dict):
            raise TypeError(f"program {name!r} is described by a {type(entry).__name__}")
        config = VTAConfig.from_dict(summary["config"], str(folder / SUMMARY))
    except MALFORMED as exc:
        raise _malformed(folder, exc) from None
    return BundleProgram(folder, entry, config)


def _raw_input(program: BundleProgram, tensor: str, data: bytes | None) -> bytes:
    """The raw file for ``tensor``, checked against the size summary.json gives (b"" when not used)."""
    needed = program.entry[tensor] is not None
    if needed != (data is not None):
        what = f"needs a {tensor} file" if needed else f"takes no {tensor} file"
        raise UserError(f"program {program.entry['name']} {what} (summary.json: {tensor})")
    if data is None:
        return b""
    expected = program.expected_bytes(tensor)
    if len(data) != expected:
        shape = program.entry[tensor]["packed_shape"]
        raise UserError(
            f"the {tensor} file has {len(data)} bytes; program {program.entry['name']} expects {expected} "
            f"(int8 packed {shape})"
        )
    return data


def run_program(program: BundleProgram, inputs: bytes, residual: bytes | None = None) -> bytes:
    """The raw OUT buffer the program writes for one image, given the raw input (and residual) files;
    UserError when summary.json and the program files do not fit together."""
    try:
        return _run(program, inputs, residual)
    except MALFORMED as exc:
        raise _malformed(program.folder, exc) from None


def _run(program: BundleProgram, inputs: bytes, residual: bytes | None) -> bytes:
    """:func:`run_program` without the translation of malformed-bundle errors."""
    c = program.config
    images = _raw_input(program, "input", inputs) + _raw_input(program, "residual", residual)
    if program.entry["constants"] is not None:  # the input buffer: input, residual, then the constants
        images += program.file("constants")
    buffers = program.entry["buffers"]
    dram = {
        MemType.INP: np.frombuffer(images, np.int8).reshape(1, -1, c.BLOCK_IN),
        MemType.UOP: np.frombuffer(program.file("uop"), np.uint32),
        MemType.WGT: np.frombuffer(program.file("wgt"), np.int8).reshape(-1, c.BLOCK_OUT, c.BLOCK_IN),
        MemType.ACC: np.frombuffer(program.file("acc"), np.int32).reshape(-1, c.BLOCK_OUT),
    }
    out = execute(program.file("instructions"), dram, int(buffers["out"]["elements"]), c)
    return out.tobytes()
