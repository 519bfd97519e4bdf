"""`gptpipe serve`'s supervisor: a small state machine that keeps a local tritonserver serving.

States: starting -> ready -> (restarting -> ready)* -> draining -> stopped. Every transition is
logged; every wait is bounded.

* **Watch for real.** Triton's ready flags stay green when a python-backend stub is dead, so each
  check (every ``probe_interval_s``) looks at the process, at the stubs (psutil children of
  tritonserver: one that disappears is a failure at once) and sends a tiny real request through
  the models: ``tokenizer`` is asked for its config, ``generate`` generates one token (a BLS
  START/END on ``gpt``), other models are asked their ready flag. A model that answers "server
  busy" is alive, and so is one whose probe times out while it completes other requests (loaded,
  not hung: a liveness probe must not restart a server for being busy).
* **Restart** (``restart="on-failure"``): kill the server's process group (in-flight requests
  get a connection error at once), remove its /dev/shm regions, start it again with the same
  repository and ports, with bounded retries and backoff. ``restart="never"``: a failure ends
  :meth:`Supervisor.run` with :class:`SupervisorError`.
* **Drain** (:meth:`Supervisor.drain`): the models are told through the drain file
  (serving.engine.drain): new sequences are refused with "server shutting down", running ones
  finish up to ``drain_timeout_s`` (idle ones are ended), the rest are ended, then tritonserver
  gets SIGTERM and exits by itself.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from serving.engine.drain import DRAIN_FILE_ENV, DRAINING, STOPPING, write_drain_state
from serving.server.common import API_KEY_HEADER, TritonServerError, check_repository
from serving.server.process import TritonServer

logger = logging.getLogger(__name__)

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for loopback
# Answers of a model that is alive but refuses work right now.
_ALIVE_REFUSALS = ("server busy", "server shutting down")
_TIMED_OUT = "no answer within"  # how _send words a probe that timed out
# Lines of the failed server's log kept on a restart: enough for a stub's faulthandler dump (every thread).
RESTART_LOG_LINES = 250


# Triton's --exit-timeout-secs under the supervisor: after the drain nothing should be in flight.
EXIT_TIMEOUT_S = 3


class State(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    DRAINING = "draining"
    STOPPED = "stopped"


class SupervisorError(TritonServerError):
    """The server failed and is not (or no longer) restarted."""


@dataclass(frozen=True)
class SupervisorOptions:
    restart: str = "on-failure"  # or "never"
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 10.0
    probe_failures: int = 2  # consecutive failed probes before a restart (a dead stub or process: at once)
    max_restarts: int = 5  # within restart_window_s; then give up
    restart_window_s: float = 600.0
    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    ready_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    # SIGTERM to exit after the drain: Triton's own exit timeout (EXIT_TIMEOUT_S) and 1 s more. Past
    # its timeout 2.51 logs "Exiting immediately" and, when a client's gRPC stream kept `gpt` loaded,
    # hangs: waiting longer only delays the kill (3 s more made SIGTERM-to-exit 7.5 s of the 8 allowed)
    stop_timeout_s: float = EXIT_TIMEOUT_S + 1.0

    def __post_init__(self) -> None:
        if self.restart not in ("on-failure", "never"):
            raise ValueError(f"restart: {self.restart!r} is not 'on-failure' or 'never'")
        for name in ("probe_interval_s", "probe_timeout_s", "ready_timeout_s", "stop_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be > 0")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s: {self.drain_timeout_s!r} must be >= 0")


class Supervisor:
    """Starts ``server``, watches it, restarts it on failure and drains it on :meth:`drain`."""

    def __init__(self, server: TritonServer, options: SupervisorOptions = SupervisorOptions(), *,
                 on_state: Optional[Callable[[State, str], None]] = None) -> None:
        """``on_state(state, reason)`` is called on every transition (the CLI prints them)."""
        self.server, self.options, self.on_state = server, options, on_state
        self.models = check_repository(server.repository)
        self._control = Path(tempfile.mkdtemp(prefix="gptpipe-serve-"))
        self.drain_file = self._control / "drain"
        server.env[DRAIN_FILE_ENV] = str(self.drain_file)
        self.state = State.STOPPED
        self.transitions: list[tuple[float, State, str]] = []
        self.restarts: list[float] = []  # monotonic times of restarts
        self._stubs: dict[str, int] = {}  # stub name -> pid, as found once the server was ready
        self._failures = 0
        self._last_completed: dict[str, float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ states

    def _enter(self, state: State, reason: str) -> None:
        with self._lock:
            previous, self.state = self.state, state
            self.transitions.append((time.monotonic(), state, reason))
        logger.info("supervisor: %s -> %s (%s)", previous.value, state.value, reason)
        if self.on_state is not None:
            self.on_state(state, reason)

    def start(self) -> float:
        """Start tritonserver and wait until it is ready; the seconds it took."""
        self._enter(State.STARTING, f"serving {self.server.repository}")
        self.drain_file.unlink(missing_ok=True)
        self.server.start()
        try:
            seconds = self.server.wait_ready(self.options.ready_timeout_s)
        except BaseException:
            self.server.kill()
            self._enter(State.STOPPED, "start failed")
            raise
        self._stubs = dict(self.server.stubs())
        self._failures, self._last_completed = 0, self._completed()
        self._enter(State.READY, f"ready in {seconds:.1f} s, stubs {sorted(self._stubs)}")
        return seconds

    # ------------------------------------------------------------------ watching

    def check(self) -> Optional[str]:
        """Why the server is broken, or None. A dead process or stub counts at once; a failed
        probe after ``probe_failures`` in a row. A probe that times out while its model completes
        other requests is a busy server, not a hung one, and does not count (a liveness probe
        must not restart a server for being loaded)."""
        if not self.server.is_running():
            return f"tritonserver exited (code {self.server.exit_code})"
        # the pids found at start, not a fresh listing: a listing can miss a live stub for a moment
        missing = [name for name, pid in self._stubs.items() if not _alive(pid)]
        if missing:
            return f"python-backend stub(s) {sorted(missing)} died"
        before, self._last_completed = self._last_completed, self._completed()
        problem = self.probe()
        if problem is None:
            self._failures = 0
            return None
        if _TIMED_OUT in problem and self._progressed(problem, before):
            # answers are coming out of that model: the probe waited in a queue, the server is busy, not hung
            logger.info("supervisor: probe slow under load, not a failure (the model completed other "
                        "requests meanwhile): %s", problem)
            self._failures = 0
            return None
        self._failures += 1
        logger.warning("supervisor: probe failed (%d of %d): %s", self._failures, self.options.probe_failures,
                       problem)
        return problem if self._failures >= self.options.probe_failures else None

    def _completed(self) -> dict[str, float]:
        """Each model's completed requests (Triton's success + failure counters; {} if unreadable)."""
        try:
            with _LOCAL.open(self.server.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return {}
        done: dict[str, float] = {}
        for model, value in re.findall(r'^nv_inference_request_(?:success|failure)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$',
                                       text, re.M):
            done[model] = done.get(model, 0.0) + float(value)
        return done

    def _progressed(self, problem: str, before: dict[str, float]) -> bool:
        """Whether the model the failed probe names completed requests since ``before`` (the counts
        of the previous check, one probe interval ago)."""
        match = re.match(r"model (\S+): ", problem)
        if match is None or match.group(1) not in before:
            return False
        return self._completed().get(match.group(1), 0.0) > before[match.group(1)]

    def probe(self) -> Optional[str]:
        """One tiny real request to each model; the first problem, or None."""
        for model in self.models:
            if model == "tokenizer":
                problem = self._post(f"/v2/models/{model}/infer", {"inputs": [], "outputs": [{"name": "generation_config"}]})
            elif model == "generate":
                problem = self._post(f"/v2/models/{model}/generate",
                                     {"text_input": "a", "max_tokens": 1, "temperature": 0})
            elif model == "gpt" and "generate" in self.models:
                continue  # probed through generate's BLS steps
            else:
                problem = self._get(f"/v2/models/{model}/ready")
            if problem is not None:
                return f"model {model}: {problem}"
        return None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.server.api_key:
            headers[API_KEY_HEADER] = self.server.api_key
        return headers

    def _post(self, path: str, body: dict) -> Optional[str]:
        request = urllib.request.Request(f"http://{self.server.http_url}{path}", data=json.dumps(body).encode(),
                                         headers=self._headers(), method="POST")
        return self._send(request)

    def _get(self, path: str) -> Optional[str]:
        return self._send(urllib.request.Request(f"http://{self.server.http_url}{path}", headers=self._headers()))

    def _send(self, request: urllib.request.Request) -> Optional[str]:
        try:
            with _LOCAL.open(request, timeout=self.options.probe_timeout_s) as response:
                response.read()
                return None
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            if any(refusal in text for refusal in _ALIVE_REFUSALS):
                return None
            return f"HTTP {e.code} {text[:300]}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            return f"no answer within {self.options.probe_timeout_s:g} s ({e})"

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set; restart on failure (or raise SupervisorError)."""
        while not stop.wait(self.options.probe_interval_s):
            problem = self.check()
            if problem is None:
                continue
            if self.options.restart == "never":
                self.server.kill()
                self._enter(State.STOPPED, f"{problem}; --restart never")
                raise SupervisorError(f"{problem}; not restarted (--restart never)")
            self.restart(problem, stop)

    def restart(self, reason: str, stop: Optional[threading.Event] = None) -> None:
        """Kill the server, back off, start it again; bounded retries (SupervisorError when spent)."""
        stop = stop or threading.Event()
        self._enter(State.RESTARTING, reason)
        logger.warning("supervisor: tritonserver's last log lines before the restart:\n%s", self.server.log_tail(RESTART_LOG_LINES))
        self.server.kill()
        attempt = 0
        while not stop.is_set():
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.options.restart_window_s]
            if len(self.restarts) >= self.options.max_restarts:
                self._enter(State.STOPPED, f"gave up: {len(self.restarts)} restarts within "
                                           f"{self.options.restart_window_s:g} s")
                raise SupervisorError(f"{reason}; gave up after {len(self.restarts)} restarts")
            delay = self.options.backoff_s[min(attempt, len(self.options.backoff_s) - 1)] if attempt else 0.0
            if stop.wait(delay):
                break
            self.restarts.append(time.monotonic())
            attempt += 1
            logger.warning("supervisor: restart %d of tritonserver (%s)", attempt, reason)
            try:
                self.start()
                return
            except (TritonServerError, ValueError) as e:
                logger.error("supervisor: restart %d failed: %s", attempt, str(e).splitlines()[0])
                self._enter(State.RESTARTING, f"retry after: {str(e).splitlines()[0]}")
        self._enter(State.STOPPED, "stopped while restarting")

    # ------------------------------------------------------------------ drain and stop

    def active_sequences(self) -> Optional[float]:
        """The gpt model's KV slots in use (its metric), or None if it cannot be read."""
        try:
            with _LOCAL.open(self.server.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None
        values = re.findall(r"^gptpipe_kv_active_sequences\{[^}]*\} (\S+)$", text, re.M)
        return sum(float(v) for v in values) if values else None

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            active = self.active_sequences()
            if not active or not self.server.is_running():
                return True
            if time.monotonic() >= deadline:
                logger.info("supervisor: %g sequence(s) still active after %.1f s", active, timeout)
                return False
            time.sleep(0.1)

    def drain(self) -> bool:
        """Refuse new sequences, let running ones finish (up to drain_timeout_s), end the rest,
        then stop tritonserver with SIGTERM. True if it exited by itself.

        A client that keeps a gRPC stream open (idle between the steps of a client-side
        sequence) keeps Triton 2.51 from unloading `gpt` even after its sequence was ended; Triton
        then gives up after its exit timeout and hangs, and is killed after ``stop_timeout_s``.
        """
        if self.server.is_running():
            self._enter(State.DRAINING, f"drain up to {self.options.drain_timeout_s:g} s")
            write_drain_state(self.drain_file, DRAINING)
            if not self._wait_idle(self.options.drain_timeout_s):
                write_drain_state(self.drain_file, STOPPING)
                self._wait_idle(5.0)
        code = self.server.stop(self.options.stop_timeout_s)
        clean = code in (0, None)
        if not clean:
            logger.warning("supervisor: tritonserver did not exit cleanly (code %s): a client holding a gRPC "
                           "stream open keeps `gpt` loaded; its sequences were ended and its shm regions removed",
                           code)
        self._enter(State.STOPPED, f"tritonserver exit code {code}")
        self.close()
        return clean

    def close(self) -> None:
        """Remove the control folder (the server must be stopped)."""
        self.drain_file.unlink(missing_ok=True)
        self.drain_file.with_name(self.drain_file.name + ".tmp").unlink(missing_ok=True)
        try:
            self._control.rmdir()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
