"""Probes of the machine: the memory-bandwidth limit of decoding, RSS sampling, machine info."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class BandwidthLimit:
    bandwidth_gb_s: float  # read bandwidth measured on the spot (best of a few)
    method: str
    weight_bytes: int  # bytes of weights one decode step reads
    tokens_per_s: float  # bandwidth / weight bytes: batch-1 decode cannot be faster

    @property
    def itl_ms(self) -> float:
        return 1e3 / self.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "itl_ms": self.itl_ms}


def measure_read_bandwidth(*, megabytes: int = 512, repeats: int = 5, threads: int = 1) -> float:
    """Bytes/s of reading a `megabytes` buffer (np.sum over float32, best of `repeats`).

    With threads > 1 the buffer is summed in that many chunks at once (numpy's reductions
    release the GIL)."""
    if megabytes < 1 or repeats < 1 or threads < 1:
        raise ValueError("megabytes, repeats and threads must be >= 1")
    buf = np.ones(megabytes * 2**20 // 4, dtype=np.float32)  # touched, so no page faults inside the timing
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            if threads == 1:
                buf.sum()
            else:
                list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def weight_bytes_per_token(config: Mapping[str, Any], *, bytes_per_param: float = 4.0) -> int:
    """Weight bytes one decode step of GPT-2 reads: every layer's weights and the tied LM head
    (the whole token-embedding matrix); the embedding lookups read one row each (ignored)."""
    V, C, L = int(config["vocab_size"]), int(config["n_embd"]), int(config["n_layer"])
    bias = bool(config.get("bias", True))
    per_layer = 12 * C * C + (13 * C if bias else 2 * C)  # qkv 3C², proj C², fc 4C², proj 4C²; biases + 2 LN
    params = L * per_layer + V * C + (2 * C if bias else C)  # + LM head (tied wte) + ln_f
    return int(params * bytes_per_param)


def bandwidth_limit(config: Mapping[str, Any], *, threads: int = 1, bandwidth_b_s: Optional[float] = None,
                    method: str = "") -> BandwidthLimit:
    """Tokens/s a batch-1 fp32 decode could reach if it only streamed its weights once."""
    if bandwidth_b_s is None:
        bandwidth_b_s = measure_read_bandwidth(threads=threads)
        method = f"numpy float32 sum over 512 MiB, {threads} thread(s), best of 5"
    wb = weight_bytes_per_token(config)
    return BandwidthLimit(bandwidth_gb_s=bandwidth_b_s / 1e9, method=method, weight_bytes=wb,
                          tokens_per_s=bandwidth_b_s / wb)


@dataclass
class RssSampler:
    """Samples the summed RSS of a process and all its descendants (tritonserver and its
    python-backend stubs) in a background thread; `peak_bytes` is the largest sum seen."""

    pid: int
    interval_s: float = 0.05
    peak_bytes: int = 0
    peak_by_process: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total, parts = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = f"{p.pid}:{p.name()}"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            parts[name] = rss
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_by_process = total, parts
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> RssSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak_bytes


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus_logical": os.cpu_count(),
        "cpus_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info
