"""VTA hardware model: configuration (compiler and simulator follow in later work)."""

from vta_backend.config import BOARDS, VTAConfig

__all__ = ["BOARDS", "VTAConfig"]
