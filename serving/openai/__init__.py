"""OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) in front of Triton.

A FastAPI app (``create_app``) that talks to Triton over gRPC through :class:`serving.AsyncClient`,
so it can run beside ``gptpipe serve`` or in its own process (``gptpipe openai --url HOST:8001``).
Layers, as in vLLM's and Triton's frontends: ``protocol`` (request/response models), one module
per endpoint (``completions``, ``chat``, ``models``), ``engine`` (the one way to Triton),
``errors`` (one exception type, mapped to OpenAI's error JSON in one place) and ``app`` (wiring).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "FrontendConfig"]


def __getattr__(name: str) -> Any:  # fastapi is imported only when the app is built
    if name in __all__:
        from serving.openai import app

        return getattr(app, name)
    raise AttributeError(f"module 'serving.openai' has no attribute {name!r}")
