"""gpp-onnx: group pattern-wise pruning of ONNX CNNs for VTA's GEMM core."""

from gpp_onnx._version import __version__
from gpp_onnx.annotation import (
    ANNOTATION_KEY,
    Annotation,
    AnnotationError,
    SkippedLayer,
    WeightAnnotation,
    read_annotation,
    validate_annotation,
    write_annotation,
)
from gpp_onnx.errors import UserError
from gpp_onnx.model_io import load_model, save_model
from gpp_onnx.pruner import inspect, prune
from gpp_onnx.report import LayerReport, Report
from gpp_onnx.tiles import TileShape

__all__ = [
    "ANNOTATION_KEY",
    "Annotation",
    "AnnotationError",
    "LayerReport",
    "Report",
    "SkippedLayer",
    "TileShape",
    "UserError",
    "WeightAnnotation",
    "__version__",
    "inspect",
    "load_model",
    "prune",
    "read_annotation",
    "save_model",
    "validate_annotation",
    "write_annotation",
]
