"""The admin key a client sends when the server restricts the model config (as deploy/k8s does):
GPTPIPE_ADMIN_KEY, read when the client asks for `gpt`'s config to choose how to step it."""

from __future__ import annotations

import os

from serving.server.common import ADMIN_KEY_HEADER, GRPC_KEY_PREFIX


def admin_headers() -> dict[str, str]:
    """HTTP: the admin-key header from GPTPIPE_ADMIN_KEY, or none."""
    key = os.environ.get("GPTPIPE_ADMIN_KEY")
    return {ADMIN_KEY_HEADER: key} if key else {}


def admin_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC: the same as metadata (Triton expects its protocol prefix on the key)."""
    return tuple((GRPC_KEY_PREFIX + name, value) for name, value in admin_headers().items())
