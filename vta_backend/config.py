"""VTA hardware configuration under VTA's own parameter names (see vta_config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from gpp_onnx.errors import UserError
from gpp_onnx.files import read_json
from gpp_onnx.tiles import DEFAULT_BLOCK

BOARDS: dict[str, tuple[float, int, str]] = {
    # board: (clock in MHz, memory bus width in bits, the VTA hardware design its bitstream is built from)
    "pynq": (100.0, 64, "xilinx-hls"),
    "de10nano": (100.0, 64, "chisel"),
    "ultra96": (333.0, 128, "xilinx-hls"),
    "zcu104": (333.0, 128, "xilinx-hls"),
}

# The memory types each design's LOAD implements. The Xilinx HLS design (hardware/xilinx/src/vta.cc)
# loads UOP, INP, WGT and ACC and silently skips any other type (ACC_8BIT among them); the
# functional simulator implements more, so programs are checked against the board's design.
DESIGN_LOADS: dict[str, frozenset[str]] = {
    "xilinx-hls": frozenset({"UOP", "INP", "WGT", "ACC"}),
    "chisel": frozenset({"UOP", "INP", "WGT", "ACC"}),
}

# vta_config.json keys that describe the build rather than the hardware; accepted and ignored.
_IGNORED_KEYS = {"TARGET", "HW_VER", "HW_TARGET"}


@dataclass(frozen=True)
class VTAConfig:
    """The parameters of one VTA build; defaults equal VTA's ``config/vta_config.json``.

    ``LOG_BLOCK`` sets both tile sides; ``LOG_BLOCK_IN`` / ``LOG_BLOCK_OUT`` (as older
    VTA configs spell them) override one side each.
    """

    LOG_INP_WIDTH: int = 3
    LOG_WGT_WIDTH: int = 3
    LOG_ACC_WIDTH: int = 5
    LOG_BATCH: int = 0
    LOG_BLOCK: int = DEFAULT_BLOCK.bit_length() - 1
    LOG_BLOCK_IN: int | None = None
    LOG_BLOCK_OUT: int | None = None
    LOG_UOP_BUFF_SIZE: int = 15
    LOG_INP_BUFF_SIZE: int = 15
    LOG_WGT_BUFF_SIZE: int = 18
    LOG_ACC_BUFF_SIZE: int = 17
    BOARD: str = "pynq"

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "BOARD":
                if value not in BOARDS:
                    raise UserError(f"VTA config: unknown BOARD {value!r}; use one of {', '.join(BOARDS)}")
            elif value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise UserError(f"VTA config: {field.name} must be an integer, got {value!r}")
            elif value is not None and not 0 <= value <= 24:
                raise UserError(f"VTA config: {field.name}={value} is outside 0..24")
        if self.LOG_INP_WIDTH != 3 or self.LOG_WGT_WIDTH != 3 or self.LOG_ACC_WIDTH != 5:
            raise UserError(
                "VTA config: only int8 inputs/weights and int32 accumulators are supported "
                "(LOG_INP_WIDTH=3, LOG_WGT_WIDTH=3, LOG_ACC_WIDTH=5)"
            )
        for name, entry_bytes in (
            ("LOG_UOP_BUFF_SIZE", 4),
            ("LOG_INP_BUFF_SIZE", self.inp_vector_bytes),
            ("LOG_WGT_BUFF_SIZE", self.wgt_tile_bytes),
            ("LOG_ACC_BUFF_SIZE", self.acc_vector_bytes),
        ):
            if 2 ** getattr(self, name) < entry_bytes:
                raise UserError(
                    f"VTA config: {name}={getattr(self, name)} holds less than one {entry_bytes}-byte entry"
                )

    @classmethod
    def from_json(cls, path: str | Path) -> "VTAConfig":
        """Load a ``vta_config.json``; unknown keys are an error."""
        path = Path(path)
        missing = f"VTA config {path} does not exist; pass an existing JSON file"
        data = read_json(path, missing, f"VTA config {path} is not readable JSON")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, source: str) -> "VTAConfig":
        """The configuration a ``vta_config.json`` object describes; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise UserError(f"VTA config {source} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_KEYS)
        if unknown:
            raise UserError(
                f"VTA config {source}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, object]:
        """The parameters as a ``vta_config.json`` dict (unset per-side block sizes left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def BATCH(self) -> int:
        """Images per GEMM micro-op."""
        return 2**self.LOG_BATCH

    @property
    def BLOCK_IN(self) -> int:
        """Input channels per tile (the GEMM's reduction width)."""
        return 2 ** (self.LOG_BLOCK if self.LOG_BLOCK_IN is None else self.LOG_BLOCK_IN)

    @property
    def BLOCK_OUT(self) -> int:
        """Output channels per tile."""
        return 2 ** (self.LOG_BLOCK if self.LOG_BLOCK_OUT is None else self.LOG_BLOCK_OUT)

    @property
    def inp_vector_bytes(self) -> int:
        """Bytes of one input-buffer entry."""
        return self.BATCH * self.BLOCK_IN * 2**self.LOG_INP_WIDTH // 8

    @property
    def wgt_tile_bytes(self) -> int:
        """Bytes of one weight tile."""
        return self.BLOCK_OUT * self.BLOCK_IN * 2**self.LOG_WGT_WIDTH // 8

    @property
    def acc_vector_bytes(self) -> int:
        """Bytes of one accumulator-buffer entry (int32)."""
        return self.BATCH * self.BLOCK_OUT * 2**self.LOG_ACC_WIDTH // 8

    @property
    def uop_depth(self) -> int:
        """Micro-ops the micro-op buffer holds."""
        return 2**self.LOG_UOP_BUFF_SIZE // 4

    @property
    def inp_depth(self) -> int:
        """Input vectors the input buffer holds."""
        return 2**self.LOG_INP_BUFF_SIZE // self.inp_vector_bytes

    @property
    def wgt_depth(self) -> int:
        """Weight tiles the weight buffer holds."""
        return 2**self.LOG_WGT_BUFF_SIZE // self.wgt_tile_bytes

    @property
    def acc_depth(self) -> int:
        """Accumulator vectors the accumulator buffer holds."""
        return 2**self.LOG_ACC_BUFF_SIZE // self.acc_vector_bytes

    @property
    def clock_mhz(self) -> float:
        """The board's clock in MHz."""
        return BOARDS[self.BOARD][0]

    @property
    def bus_bits(self) -> int:
        """The board's memory bus width in bits."""
        return BOARDS[self.BOARD][1]

    @property
    def design(self) -> str:
        """The VTA hardware design behind the board."""
        return BOARDS[self.BOARD][2]

    @property
    def loadable(self) -> frozenset[str]:
        """Names of the memory types the board's design can LOAD."""
        return DESIGN_LOADS[self.design]
