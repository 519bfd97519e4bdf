"""The keys a client sends to a `gptpipe serve` with restricted APIs: GPTPIPE_ADMIN_KEY for the
model config (the client reads `gpt`'s to find out how to step it)."""

from __future__ import annotations

import os

from serving.server.common import ADMIN_KEY_HEADER


def admin_headers() -> dict[str, str]:
    """The admin-key header from GPTPIPE_ADMIN_KEY, or none."""
    key = os.environ.get("GPTPIPE_ADMIN_KEY")
    return {ADMIN_KEY_HEADER: key} if key else {}
