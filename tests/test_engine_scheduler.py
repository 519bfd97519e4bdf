"""serving/engine/scheduler.py: StepQueue, the in-flight batcher's queue (no server; the
Scheduler itself runs against PyTorch in tests/test_engine_runtime_trt.py and on a real
tritonserver in tests/test_serving.py and tests/test_inflight.py)."""

from __future__ import annotations

import threading
import time

import pytest

from serving.engine.scheduler import StepQueue


def _put_later(q, delay_s: float, sequence_id: int) -> threading.Timer:
    timer = threading.Timer(delay_s, q.put, args=(sequence_id, f"step {sequence_id}"))
    timer.start()
    return timer


def test_step_queue_waits_for_the_cohort_and_no_longer():
    q = StepQueue(wait_s=2.0)
    q.put(1, "step 1")
    _put_later(q, 0.15, 2)
    start = time.monotonic()
    items, ids = q.gather({1, 2})  # 2 was in the last call: wait for it
    assert items == ["step 1", "step 2"] and ids == {1, 2}
    assert 0.1 < time.monotonic() - start < 1.5

    q.put(1, "step 1")
    _put_later(q, 0.3, 3).join()  # 3 arrives before gather: taken without waiting
    start = time.monotonic()
    assert q.gather({1}) == (["step 1", "step 3"], {1, 3})
    assert time.monotonic() - start < 0.2

    q = StepQueue(wait_s=0.3)
    q.put(1, "step 1")
    start = time.monotonic()
    assert q.gather({1, 7}) == (["step 1"], {1})  # 7 never comes: the wait is bounded
    assert 0.25 < time.monotonic() - start < 1.5


def test_step_queue_without_a_cohort_or_a_wait_takes_only_what_is_queued():
    q = StepQueue(wait_s=5.0)
    q.put(4, "a")
    start = time.monotonic()
    assert q.gather(set()) == (["a"], {4})  # the first batch of a stream: nobody to wait for
    q.put(4, "b")
    assert q.gather({4}) == (["b"], {4})
    assert time.monotonic() - start < 0.5
    q = StepQueue(wait_s=0)
    q.put(1, "a")
    start = time.monotonic()
    assert q.gather({1, 2}) == (["a"], {1})
    assert time.monotonic() - start < 0.5
    with pytest.raises(ValueError, match="wait_s must be >= 0"):
        StepQueue(wait_s=-1)


def test_step_queue_close_ends_after_what_is_queued():
    q = StepQueue(wait_s=5.0)
    q.put(1, "a")
    q.put(None, "malformed")  # a step without a sequence id is batched, not waited for
    q.close()
    start = time.monotonic()
    assert q.gather({1, 2}) == (["a", "malformed"], {1})
    assert q.gather({1}) == ([], set())
    assert time.monotonic() - start < 0.5
