"""Write a compiled model's programs to a folder: per conv (and group) its binaries, plus summary.json.

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
from vta_backend.model import CompiledModel

SUMMARY = "summary.json"
SUFFIXES = (".insn.bin", ".uop.bin", ".wgt.bin", ".acc.bin")
PROGRAM_FILE = re.compile(r"\d{3}_.*(" + "|".join(re.escape(s) for s in SUFFIXES) + r")")


def file_stem(index: int, name: str) -> str:
    """``NNN_name`` with the characters a file name should not hold replaced."""
    return f"{index:03d}_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "conv")


def _program_files(program: Program, stem: str) -> dict[str, bytes]:
    """File name -> contents of one program's four binaries."""
    images = (program.binary(), program.uops.tobytes(), program.weights.tobytes(), program.acc_image.tobytes())
    return {stem + suffix: data for suffix, data in zip(SUFFIXES, images)}


def _write_bundle(compiled: CompiledModel, folder: Path) -> list[str]:
    """Write every file into ``folder``; returns their names, summary.json last."""
    written, files = [], {}
    for i, layer in enumerate(compiled.layers.values()):
        for program in layer.programs:
            stem = file_stem(i, program.name)
            for name, data in _program_files(program, stem).items():
                (folder / name).write_bytes(data)
                written.append(name)
            files[program.name] = {
                "stem": stem,
                "instructions": len(program.insns),
                "uops": len(program.uops),
                "weight_tiles": len(program.weights),
                "tiling": vars(program.tiling),
            }
    summary = compiled.report().to_dict() | {"files": files, "config": compiled.config.to_dict()}
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
