"""The GPU libraries of the TensorRT path: the pinned TensorRT and cuda-python releases, and
their imports, which raise an error that says what to install (importable without a GPU)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# The TensorRT release gptpipe builds with and serves: the same in export/tensorrt/build.py (builder),
# export/data/tensorrt_onnx_ops.json (the parser's operator list), docker/Dockerfile.tensorrt
# (Triton 24.11, TensorRT 10.6) and scripts/gpu_check.sh. An engine only runs on the TensorRT
# version that built it (unless built version-compatible, and then only on later ones).
TENSORRT_VERSION = "10.6"
# pip names on PyPI. The `tensorrt-cu12` sdist only adds the `tensorrt` module (a re-export of
# `tensorrt_bindings`); its own install step asks pypi.nvidia.com, which
# NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 skips: the two wheels come from PyPI by name.
TENSORRT_PIP = ("tensorrt-cu12==10.6.0", "tensorrt-cu12-libs==10.6.0", "tensorrt-cu12-bindings==10.6.0")
CUDA_PYTHON_PIP = "cuda-python>=12.3,<13"


class TensorRTUnavailableError(ImportError):
    """`tensorrt` (or cuda-python) is not installed, or no GPU: the message says what to do."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or TensorRTUnavailableError naming what to install."""
    try:
        import tensorrt as trt  # the tensorrt-cu12 metapackage
    except ImportError:
        try:
            import tensorrt_bindings as trt  # the bindings wheel alone
        except ImportError as e:
            raise TensorRTUnavailableError(
                f"TensorRT is not installed: it needs an NVIDIA GPU and TensorRT {TENSORRT_VERSION} "
                f"(NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 pip install {' '.join(TENSORRT_PIP)})") from e
    if not str(trt.__version__).startswith(TENSORRT_VERSION + "."):
        logger.warning("TensorRT %s is installed; gptpipe pins %s (engines only load on the version "
                       "that built them)", trt.__version__, TENSORRT_VERSION)
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime API module (both of its import paths)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python 12.x
        except ImportError as e:
            raise TensorRTUnavailableError(
                f"cuda-python is not installed (pip install '{CUDA_PYTHON_PIP}'): the TensorRT "
                "runtime uses it for device memory, copies, streams and CUDA graphs") from e
    return cudart
