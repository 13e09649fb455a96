"""The application layer of gpp-onnx: data loaders, evaluation, recovery, sweeps, plots and the CLI.

The only package that sees both the pruning core (:mod:`gpp_onnx`) and the VTA backend
(:mod:`vta_backend`), and the only one that imports torch (optionally) and matplotlib.
"""
