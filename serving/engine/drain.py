"""The drain flag: how `gptpipe serve` tells the `gpt` model that the server is shutting down.

The supervisor writes one word into a file whose path the models find in the environment
(``GPTPIPE_DRAIN_FILE``, inherited by every python-backend stub): ``drain`` (refuse new
sequences, let running ones finish, end the ones idle longer than ``idle_s``) or ``stop`` (end
every sequence now). A file, not a control request, because it needs no port, key or model
of its own, works while the server is too busy to answer, and is cheap to poll (one stat).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

DRAIN_FILE_ENV = "GPTPIPE_DRAIN_FILE"
RUNNING, DRAINING, STOPPING = "running", "drain", "stop"
SHUTTING_DOWN = "server shutting down"
# While draining, a sequence without a step for this long is ended (its client is idle).
DRAIN_IDLE_S = 1.0


def write_drain_state(path: Path, state: str) -> None:
    """Set the state the models read (atomically: a reader never sees half a word)."""
    if state not in (DRAINING, STOPPING):
        raise ValueError(f"drain state: {state!r} is not {DRAINING!r} or {STOPPING!r}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state, encoding="ascii")
    os.replace(tmp, path)


class DrainFlag:
    """Reads the state from ``GPTPIPE_DRAIN_FILE`` (none set: always running), at most every
    ``interval_s`` seconds."""

    def __init__(self, path: Optional[str] = None, *, interval_s: float = 0.05) -> None:
        path = os.environ.get(DRAIN_FILE_ENV) if path is None else path
        self.path = Path(path) if path else None
        self.interval_s = interval_s
        self._state, self._read_at = RUNNING, -1.0

    def state(self) -> str:
        if self.path is None or self._state == STOPPING:
            return self._state
        now = time.monotonic()
        if now - self._read_at >= self.interval_s:
            self._read_at = now
            try:
                word = self.path.read_text(encoding="ascii").strip()
            except (FileNotFoundError, UnicodeDecodeError):
                word = RUNNING
            self._state = word if word in (DRAINING, STOPPING) else RUNNING
        return self._state

    def refusal(self, *, start: bool) -> Optional[str]:
        """The error for a step in this state: new sequences while draining, every step once stopping."""
        state = self.state()
        if state == STOPPING or (state == DRAINING and start):
            return f"{SHUTTING_DOWN}: {'no new sequences are taken' if start else 'the sequence was ended'}"
        return None
