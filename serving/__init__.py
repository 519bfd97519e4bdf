"""gptpipe serving: everything at run time (never imports torch).

``from serving import Client`` is the client library; the names below are loaded on first
use, so the Triton python-backend models that import ``serving.tensors`` do not pay for
the client's imports (tokenizers, gRPC).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Client": "serving.client",
    "AsyncClient": "serving.client",
    "GenerationConfig": "serving.client",
    "GenerationResult": "serving.generation",
    "Timings": "serving.generation",
    "GptpipeError": "serving.generation",
    "InvalidParameterError": "serving.generation",
    "PromptTooLongError": "serving.generation",
    "ServerBusyError": "serving.generation",
    "ServerUnavailableError": "serving.generation",
    "ServerError": "serving.generation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
