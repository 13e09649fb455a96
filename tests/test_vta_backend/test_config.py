"""The VTA hardware configuration object and the tile shape taken from it."""

from __future__ import annotations

import json

import pytest

from gpp_onnx import TileShape, UserError
from vta_backend import VTAConfig


def test_defaults_match_vta_config_json():
    c = VTAConfig()
    assert (c.BATCH, c.BLOCK_IN, c.BLOCK_OUT) == (1, 16, 16)
    assert (c.uop_depth, c.inp_depth, c.wgt_depth, c.acc_depth) == (8192, 2048, 1024, 2048)
    assert (c.clock_mhz, c.bus_bits) == (100.0, 64)
    assert TileShape.from_config(c) == TileShape(16, 16)


def test_load_from_json(tmp_path):
    path = tmp_path / "vta_config.json"
    path.write_text(
        json.dumps({"TARGET": "sim", "HW_VER": "0.0.2", "LOG_BLOCK": 5, "LOG_WGT_BUFF_SIZE": 19, "BOARD": "ultra96"})
    )
    c = VTAConfig.from_json(path)
    assert (c.BLOCK_IN, c.wgt_depth, c.clock_mhz, c.bus_bits) == (32, 512, 333.0, 128)
    assert TileShape.from_config(c) == TileShape(32, 32)


@pytest.mark.parametrize(
    "content,message",
    [
        ({"LOG_BLOK": 4}, "unknown key"),
        ({"LOG_BLOCK": -1}, "outside"),
        ({"LOG_BLOCK": "4"}, "must be an integer"),
        ({"LOG_INP_WIDTH": 4}, "int8"),
        ({"LOG_WGT_BUFF_SIZE": 7}, "less than one"),
        ({"BOARD": "nano"}, "unknown BOARD"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        VTAConfig.from_json(path)


def test_non_square_tile_from_older_config_keys():
    c = VTAConfig(LOG_BLOCK_IN=4, LOG_BLOCK_OUT=3)
    assert TileShape.from_config(c) == TileShape(8, 16)
