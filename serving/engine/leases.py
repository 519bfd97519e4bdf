"""Leases: a client-side sequence's open last step, whose cancellation frees a dead client's KV slot at once.

A step that asks for a lease (the request parameter ``tensors.LEASE_PARAMETER``; the gptpipe
client's stream steps do) is answered without the FINAL flag, and its request stays open until
the sequence's next step arrives, or for ``hold_s`` at most. When the client's gRPC stream dies
(the process is killed, the connection drops), Triton reports that open request cancelled and
:meth:`Leases.sweep` frees the sequence's slot, instead of the idle timeout doing it a minute
later. The hold is bounded because Triton's shutdown waits for open requests: a client that
pauses longer than ``hold_s`` between steps, and dies then, is reaped by the idle timeout.

Triton-free: the adapter passes in how a sender is completed and asked whether it is cancelled.
Every method is called with the engine's lock held.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from serving.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

LEASE_HOLD_S = 5.0  # the longest a lease stays open after its step's answer
WATCH_INTERVAL_S = 0.25  # how often the watcher sweeps (dead clients, idle sequences, gauges)


class Leases:
    def __init__(self, *, complete: Callable[[Any], None], cancelled: Callable[[Any], bool],
                 hold_s: float = LEASE_HOLD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._complete, self._cancelled = complete, cancelled
        self.hold_s, self._clock = hold_s, clock
        self._open: dict[int, tuple[Any, float]] = {}  # sequence id -> (sender, when answered)

    def __len__(self) -> int:
        return len(self._open)

    def hold(self, sequence_id: int, sender: Any) -> None:
        self.end(sequence_id)
        self._open[sequence_id] = (sender, self._clock())

    def end(self, sequence_id: int) -> None:
        """Complete the open request of the sequence's previous step, if any."""
        sender, _ = self._open.pop(sequence_id, (None, 0.0))
        if sender is not None:
            try:
                self._complete(sender)
            except Exception:  # noqa: BLE001 - the client may be gone already
                logger.debug("could not complete the lease of sequence %d", sequence_id)

    def end_all(self) -> None:
        for sequence_id in list(self._open):
            self.end(sequence_id)

    def sweep(self, scheduler: Scheduler) -> list[int]:
        """Free the slots of sequences whose client went away (their ids), end leases held
        long enough or of sequences that no longer hold a slot."""
        dead, expired = [], self._clock() - self.hold_s
        active = scheduler.sequence_ids()
        for sequence_id, (sender, answered) in list(self._open.items()):
            if self._cancelled(sender):
                logger.info("the client of sequence %d went away; freeing its slot", sequence_id)
                scheduler.release(sequence_id)
                dead.append(sequence_id)
                self.end(sequence_id)
            elif answered < expired or sequence_id not in active:
                self.end(sequence_id)
        return dead
