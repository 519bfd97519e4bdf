"""The frontend's Prometheus metrics (text format 0.0.4), kept in process: no extra dependency.

gptpipe_openai_requests_total{endpoint,status}, gptpipe_openai_requests_in_flight,
gptpipe_openai_{prompt,completion}_tokens_total, and histograms of time to first token and
end-to-end latency (seconds).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(BUCKETS, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = _Histogram()
        self.e2e = _Histogram()

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if endpoint.startswith("/v1/") and status == 200:
                self.e2e.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP gptpipe_openai_requests_total HTTP requests by endpoint and status.",
                     "# TYPE gptpipe_openai_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'gptpipe_openai_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += ["# HELP gptpipe_openai_requests_in_flight Requests being answered now.",
                      "# TYPE gptpipe_openai_requests_in_flight gauge",
                      f"gptpipe_openai_requests_in_flight {self.in_flight}",
                      "# HELP gptpipe_openai_prompt_tokens_total Prompt tokens of answered requests.",
                      "# TYPE gptpipe_openai_prompt_tokens_total counter",
                      f"gptpipe_openai_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP gptpipe_openai_completion_tokens_total Tokens generated.",
                      "# TYPE gptpipe_openai_completion_tokens_total counter",
                      f"gptpipe_openai_completion_tokens_total {self.completion_tokens}",
                      "# HELP gptpipe_openai_time_to_first_token_seconds Time to first token.",
                      "# TYPE gptpipe_openai_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("gptpipe_openai_time_to_first_token_seconds")
            lines += ["# HELP gptpipe_openai_e2e_request_latency_seconds End-to-end latency of successful requests.",
                      "# TYPE gptpipe_openai_e2e_request_latency_seconds histogram"]
            lines += self.e2e.lines("gptpipe_openai_e2e_request_latency_seconds")
            return "\n".join(lines) + "\n"
