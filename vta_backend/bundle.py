"""Write a compiled model's programs to a folder: per conv (and group) its binaries, plus summary.json.

summary.json (``format`` / ``version``) describes every program well enough to run the files
without this code: its input, output and residual tensors (shape, dtype, packed layout, which
DRAM buffer and element offset), each DRAM buffer (memory type, file or what the host fills
in, size, element size) and the relocation rule (``dram``). ``docs/vta-backend.md`` explains it.

Everything is written into a staging folder beside the output folder first
(:func:`gpp_onnx.files.staging_folder`), so a failure leaves nothing behind. A new output
folder is then renamed into place whole; into an existing one the new files are moved,
and the program files and summary.json of an earlier compile that this one did not write
are removed (no other file of the folder is touched).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from gpp_onnx.errors import UserError
from gpp_onnx.files import publish, staging_folder
from vta_backend.compiler import Program
from vta_backend.isa import MemType
from vta_backend.model import CompiledModel

SUMMARY = "summary.json"
FORMAT, VERSION = "gpp-onnx VTA program bundle", 2
RELOCATION = (
    "Each memory type has its own DRAM buffer; a LOAD or STORE's dram_base is an element index into the "
    "buffer of its memory type, counted from 0 in elements of element_bytes. A host that passes one pointer "
    "per port (VTA's HLS top function) runs the words as written; a host that places each buffer at a "
    "physical address (VTA's runtime) adds physical_address / element_bytes to the dram_base of every LOAD "
    "and STORE of that memory type, so each buffer must start at a multiple of its element_bytes."
)
SUFFIXES = (".insn.bin", ".uop.bin", ".wgt.bin", ".acc.bin", ".const.bin")
PROGRAM_FILE = re.compile(r"\d{3}_.*(" + "|".join(re.escape(s) for s in SUFFIXES) + r")")


def file_stem(index: int, name: str) -> str:
    """``NNN_name`` with the characters a file name should not hold replaced."""
    return f"{index:03d}_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "conv")


def _program_files(program: Program, stem: str) -> dict[str, bytes]:
    """File name -> contents of one program's four binaries."""
    images = (program.binary(), program.uops.tobytes(), program.weights.tobytes(), program.acc_image.tobytes())
    files = {stem + suffix: data for suffix, data in zip(SUFFIXES, images)}
    if len(program.constants):  # the constant input vectors, when the program has any
        files[stem + SUFFIXES[4]] = program.constants.tobytes()
    return files


def _tensor(channels: int, height: int, width: int, block: int, buffer: str, offset: int) -> dict[str, object]:
    """An int8 activation as the program reads or writes it: NCHW, packed NCHW1n{block}c in DRAM."""
    tiles = -(-channels // block)
    return {
        "shape": [1, channels, height, width],
        "dtype": "int8",
        "layout": f"NCHW1n{block}c",
        "packed_shape": [1, tiles, height, width, 1, block],
        "note": f"channels zero-padded to {tiles * block}",
        "buffer": buffer,
        "offset": offset,
        "elements": tiles * height * width,
    }


def _buffer(memory_type: MemType, elements: int, element_bytes: int, file: str | None) -> dict[str, object]:
    return {
        "memory_type": memory_type.name,
        "memory_type_id": int(memory_type),
        "file": file,
        "elements": elements,
        "element_bytes": element_bytes,
        "bytes": elements * element_bytes,
    }


def program_entry(program: Program, stem: str) -> dict[str, object]:
    """The self-description of one program in summary.json."""
    g, c = program.geometry, program.config
    residual = program.conv.residual_shift is not None
    constants_at = g.input_vectors + (g.output_vectors if residual else 0)
    constants = {
        "file": stem + SUFFIXES[4],
        "buffer": "inp",
        "offset": constants_at,
        "elements": len(program.constants),
    }
    first = program.group * g.in_channels, program.group * g.out_channels
    return {
        "name": program.name,
        "layer": program.conv.name,
        "group": program.group,
        "channels": {"input": [first[0], first[0] + g.in_channels], "output": [first[1], first[1] + g.out_channels]},
        "input": _tensor(g.in_channels, g.height, g.width, c.BLOCK_IN, "inp", 0),
        "residual": _tensor(g.out_channels, g.out_height, g.out_width, c.BLOCK_OUT, "inp", g.input_vectors)
        if residual
        else None,
        "output": _tensor(g.out_channels, g.out_height, g.out_width, c.BLOCK_OUT, "out", 0),
        "constants": constants if len(program.constants) else None,
        "instructions": {"file": stem + SUFFIXES[0], "count": len(program.insns), "element_bytes": 16},
        "buffers": {
            "uop": _buffer(MemType.UOP, len(program.uops), 4, stem + SUFFIXES[1]),
            "wgt": _buffer(MemType.WGT, len(program.weights), c.wgt_tile_bytes, stem + SUFFIXES[2]),
            "inp": _buffer(MemType.INP, constants_at + len(program.constants), c.inp_vector_bytes, None),
            "acc": _buffer(MemType.ACC, len(program.acc_image), c.acc_vector_bytes, stem + SUFFIXES[3]),
            "out": _buffer(MemType.OUT, g.output_vectors, c.BATCH * c.BLOCK_OUT, None),
        },
        "residual_path": program.residual_path,
        "tiling": vars(program.tiling),
    }


def _write_bundle(compiled: CompiledModel, folder: Path) -> list[str]:
    """Write every file into ``folder``; returns their names, summary.json last."""
    written, programs = [], []
    for i, layer in enumerate(compiled.layers.values()):
        for program in layer.programs:
            stem = file_stem(i, program.name)
            for name, data in _program_files(program, stem).items():
                (folder / name).write_bytes(data)
                written.append(name)
            programs.append(program_entry(program, stem))
    summary = {"format": FORMAT, "version": VERSION} | compiled.report().to_dict()
    summary |= {"config": compiled.config.to_dict(), "dram": RELOCATION, "programs": programs}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return written + [SUMMARY]


def _is_earlier_output(path: Path) -> bool:
    """A program file or summary.json that a compile writes (never a folder or another file)."""
    return path.is_file() and (path.name == SUMMARY or PROGRAM_FILE.fullmatch(path.name) is not None)


def write_programs(compiled: CompiledModel, out_dir: str | os.PathLike[str]) -> list[str]:
    """Write per conv (and group) the instruction, micro-op, weight and bias binaries plus summary.json.

    Returns the names written. ``out_dir`` is created only when everything was written; an
    OSError becomes a UserError naming it.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is a file; give a folder path")
    with staging_folder(out_dir) as staging:
        new = staging / "programs"
        new.mkdir()  # with the permissions the umask gives a new folder
        names = _write_bundle(compiled, new)
        if not out_dir.exists():
            os.replace(new, out_dir)
            return names
        for name in names:
            publish(new / name, out_dir / name)
        for path in out_dir.iterdir():
            if path.name not in names and _is_earlier_output(path):
                path.unlink()
    return names
