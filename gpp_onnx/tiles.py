"""The hardware tile shape that pruning patterns are cut to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gpp_onnx.errors import UserError


@dataclass(frozen=True)
class TileShape:
    """A BLOCK_OUT x BLOCK_IN weight tile, the unit one GEMM micro-op consumes."""

    block_out: int = 16
    block_in: int = 16

    def __post_init__(self) -> None:
        for name in ("block_out", "block_in"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"tile {name} must be a positive integer, got {value!r}")

    def __str__(self) -> str:
        return f"{self.block_out}x{self.block_in}"

    @classmethod
    def parse(cls, text: str) -> "TileShape":
        """Parse ``OUTxIN`` (e.g. ``16x16``) or the path of a VTA config JSON."""
        if text.endswith(".json"):
            from vta_backend.config import VTAConfig

            return cls.from_config(VTAConfig.from_json(Path(text)))
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
