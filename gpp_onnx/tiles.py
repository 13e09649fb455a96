"""The hardware tile shape that pruning patterns are cut to."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpp_onnx.errors import UserError

# VTA's default BLOCK_OUT = BLOCK_IN (vta_config.json: LOG_BLOCK 4); VTAConfig derives its default from it.
DEFAULT_BLOCK = 16


@dataclass(frozen=True)
class TileShape:
    """A BLOCK_OUT x BLOCK_IN weight tile, the unit one GEMM micro-op consumes."""

    block_out: int = DEFAULT_BLOCK
    block_in: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        for name in ("block_out", "block_in"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"tile {name} must be a positive integer, got {value!r}")

    def __str__(self) -> str:
        return f"{self.block_out}x{self.block_in}"

    @classmethod
    def parse(cls, text: str) -> "TileShape":
        """Parse ``OUTxIN`` (e.g. ``16x16``); a VTA config file is read by ``vta_backend.VTAConfig.from_json``."""
        if text.strip().lower().endswith(".json"):
            raise UserError(
                f"tile {text!r} is a file name; pass vta_backend.VTAConfig.from_json({text!r}) as the tile "
                "(the command line's --tile reads the file itself)"
            )
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise UserError(
                f"tile shape {text!r} is not two positive integers; write OUTxIN, e.g. 16x16, "
                "or give a VTA config .json"
            )
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_config(cls, config: object) -> "TileShape":
        """The tile of a hardware config object with ``BLOCK_OUT`` / ``BLOCK_IN``."""
        return cls(int(config.BLOCK_OUT), int(config.BLOCK_IN))  # type: ignore[attr-defined]
