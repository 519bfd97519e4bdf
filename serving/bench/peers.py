"""Peer engines (llama.cpp, OpenVINO GenAI) for the benchmark: find their venv, convert weights,
and drive `scripts/peers/worker.py` there over JSON lines, every read bounded.

The peers live in their own venv (they bring their own numpy/torch stack), made once by
`scripts/install_peers.sh`; this module never imports them, nor torch. Example::

    from serving.bench.peers import PeerWorker, convert

    convert("gguf", "hf-folder", "out/gguf")  # f32.gguf, q8_0.gguf, q4_0.gguf
    with PeerWorker("llama.cpp", "out/gguf/q8_0.gguf", threads=2) as peer:
        result = peer.generate([1, 2, 3], 16)  # greedy, eos ignored: exactly 16 tokens
        print(result.token_ids, result.ttft_s, result.decode_tokens_per_s)
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ENGINES = ("llama.cpp", "openvino", "openvino-cb")
PEERS = ("openvino", "llama.cpp")  # what `gptpipe bench --peers` and GPTPIPE_PEERS name
ENGINE_PEER = {"llama.cpp": "llama.cpp", "openvino": "openvino", "openvino-cb": "openvino"}
KIND_PEER = {"gguf": "llama.cpp", "openvino": "openvino"}  # convert() kinds
OV_PRECISIONS = ("f32", "default")
INSTALL_SCRIPT = "scripts/install_peers.sh"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "peers"  # a source checkout's scripts/peers
LEGACY_STAMP = ".gptpipe-peers-installed"  # install_peers.sh before per-peer installs: both peers
MAX_LINE_BYTES = 64 * 2**20  # a logits line of a 50k vocabulary is ~1 MB
STDERR_TAIL_BYTES = 4000
INSTALL_TIME = {"openvino": "a few minutes: pip downloads", "llama.cpp": "11-45 minutes on 2 cores: it compiles llama.cpp"}


class PeerError(RuntimeError):
    """A peer worker failed: it refused a request, exited, or broke the protocol."""


class PeersUnavailable(PeerError):
    """The peer venv (or the worker script) is not there; the message says how to get it."""


class PeerTimeout(PeerError, TimeoutError):
    """A peer worker did not answer within its bound (the worker is killed)."""


def default_venv() -> Path:
    """$GPTPIPE_PEERS_VENV, else ~/.cache/gptpipe/peers-venv (install_peers.sh's default)."""
    env = os.environ.get("GPTPIPE_PEERS_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptpipe" / "peers-venv"


def stamp(venv: Path, peer: str) -> Path:
    """The file install_peers.sh writes once `peer` imports in `venv`."""
    return venv / f".gptpipe-peer-{peer}"


def install_hint(venv: Path, peer: Optional[str] = None) -> str:
    """The command that installs `peer` (None: both) into `venv`, and how long it takes."""
    prefix = "" if venv == Path.home() / ".cache" / "gptpipe" / "peers-venv" else f"GPTPIPE_PEERS_VENV={venv} "
    if peer is not None:
        return f"{prefix}GPTPIPE_PEERS={peer} bash {INSTALL_SCRIPT} (once per machine, {INSTALL_TIME[peer]})"
    return (f"{prefix}bash {INSTALL_SCRIPT} (once per machine, 20-45 minutes on 2 cores: it compiles "
            f"llama.cpp for llama-cpp-python and installs OpenVINO GenAI into {venv}; "
            f"GPTPIPE_PEERS=openvino for OpenVINO alone, {INSTALL_TIME['openvino']})")


def installed(peer: str, venv: Optional[Path | str] = None) -> bool:
    venv = Path(venv).expanduser() if venv is not None else default_venv()
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {peer!r}")
    return (venv / "bin" / "python").exists() and (stamp(venv, peer).is_file() or (venv / LEGACY_STAMP).is_file())


def peers_python(venv: Optional[Path | str] = None, peer: Optional[str] = None) -> Path:
    """The peer venv's python; PeersUnavailable (with the install command) when `peer` (None:
    any peer) is not installed there."""
    venv = Path(venv).expanduser() if venv is not None else default_venv()
    wanted = [peer] if peer is not None else list(PEERS)
    if not any(installed(p, venv) for p in wanted):
        what = f"the peer engine {peer}" if peer else "the peer engines"
        raise PeersUnavailable(f"{what} not installed in {venv}; run: {install_hint(venv, peer)}")
    if not (SCRIPTS / "worker.py").is_file():
        raise PeersUnavailable(f"{SCRIPTS / 'worker.py'} is missing: the peers run from a source checkout of gptpipe")
    return venv / "bin" / "python"


def child_env() -> dict[str, str]:
    # the project's PYTHONPATH must not leak into the peer venv's interpreter
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


# ----------------------------------------------------------------------------- framing


def encode(message: dict[str, Any]) -> bytes:
    """One request line: compact JSON, no newline inside, one at the end."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Newline-framed messages from a pipe, each read bounded in time and size."""

    def __init__(self, stream: IO[bytes], *, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.fd = stream.fileno()
        self.max_bytes = max_bytes
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def read(self, timeout_s: float) -> Optional[dict[str, Any]]:
        """The next message; None at end of stream; PeerTimeout past timeout_s; PeerError for a
        line that is not a JSON object or is longer than max_bytes."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.max_bytes:
                raise PeerError(f"a peer line is longer than {self.max_bytes} bytes")
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise PeerTimeout(f"no answer from the peer within {timeout_s:g} s")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                if self.buffer:
                    raise PeerError(f"the peer's output ended inside a line: {self.buffer[:200]!r}")
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except json.JSONDecodeError as e:
            raise PeerError(f"the peer wrote a line that is not JSON ({e}): {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise PeerError(f"the peer wrote a line that is not a JSON object: {line[:200]!r}")
        return message

    def close(self) -> None:
        self.selector.close()


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PeerResult:
    """One sequence as the peer timed it, in its own process (no IPC in the numbers)."""

    token_ids: tuple[int, ...]
    ttft_s: float
    itl_s: tuple[float, ...]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PeerResult:
        try:
            known = ("token_ids", "ttft_s", "itl_s", "wall_s", "id")
            return cls(token_ids=tuple(int(t) for t in message["token_ids"]), ttft_s=float(message["ttft_s"]),
                       itl_s=tuple(float(x) for x in message["itl_s"]), wall_s=float(message["wall_s"]),
                       extra={k: v for k, v in message.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise PeerError(f"a peer result lacks or garbles {e}: {str(message)[:200]}") from None

    @property
    def decode_tokens_per_s(self) -> float:
        """(n - 1) / (last - first), as `RequestTiming.decode_tokens_per_s`; nan for one token."""
        span = sum(self.itl_s)
        return len(self.itl_s) / span if self.itl_s and span > 0 else float("nan")

    def token_times(self, sent: float) -> tuple[float, ...]:
        """Arrival stamps on a clock where the request was read at `sent`."""
        return tuple(sent + self.ttft_s + np.concatenate([[0.0], np.cumsum(self.itl_s)]))


# ----------------------------------------------------------------------------- the worker


class PeerWorker:
    """One peer engine loaded in a long-lived worker process of the peer venv.

    engine: llama.cpp (a .gguf file), openvino (an IR folder, LLMPipeline) or openvino-cb (an IR
    folder, ContinuousBatchingPipeline: `batch()` only). ov_precision (OpenVINO): "f32" (default), f32
    compute and KV cache, the function PyTorch fp32 computes; "default", OpenVINO's own choice for
    the CPU (bf16 compute and an f16 KV cache on CPUs with AMX / AVX512-bf16). Every read waits at most its timeout;
    on a timeout or a broken line the worker is killed and PeerTimeout / PeerError raised."""

    def __init__(self, engine: str, model: Path | str, *, threads: int = 2, n_ctx: Optional[int] = None,
                 cache_gb: Optional[float] = None, ov_precision: str = "f32", venv: Optional[Path | str] = None,
                 start_timeout_s: float = 300.0, timeout_s: float = 600.0) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        if ov_precision not in OV_PRECISIONS:
            raise ValueError(f"ov_precision must be one of {', '.join(OV_PRECISIONS)}, got {ov_precision!r}")
        model = Path(model)
        if not model.exists():
            raise FileNotFoundError(f"model: {model} does not exist (convert it first: serving.bench.peers.convert)")
        python = peers_python(venv, ENGINE_PEER[engine])
        self.engine, self.model, self.threads, self.timeout_s = engine, model, threads, timeout_s
        cmd = [str(python), str(SCRIPTS / "worker.py"), "--engine", engine, "--model", str(model),
               "--threads", str(threads)]
        cmd += ["--n-ctx", str(n_ctx)] if n_ctx else []
        cmd += ["--cache-gb", str(cache_gb)] if cache_gb else []
        cmd += ["--ov-precision", ov_precision] if engine.startswith("openvino") else []
        self._stderr = tempfile.TemporaryFile(prefix="gptpipe-peer-")
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                        env=child_env(), start_new_session=True)
        self._reader = LineReader(self.process.stdout)
        self._next_id = 0
        try:
            ready = self._read(start_timeout_s)
            if not ready.get("ready"):
                raise PeerError(f"{engine} worker could not load {model}: {ready.get('error')}")
        except BaseException:
            self.close()
            raise
        self.info = ready
        logger.info("peer %s ready (pid %s, %.1f s): %s", engine, self.process.pid, ready.get("load_s", 0), model)

    def stderr_tail(self) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL_BYTES))
        return self._stderr.read().decode(errors="replace")

    def _read(self, timeout_s: float) -> dict[str, Any]:
        try:
            message = self._reader.read(timeout_s)
        except PeerError as e:
            self.kill()
            raise type(e)(f"{self.engine} worker: {e}\n--- its stderr ---\n{self.stderr_tail()}") from None
        if message is None:  # it closed its output: exiting, or about to
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
                code = self.process.returncode
            raise PeerError(f"{self.engine} worker exited ({code})\n--- its stderr ---\n{self.stderr_tail()}")
        return message

    def request(self, message: dict[str, Any], *, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """Send one request, read its answer; PeerError for {"error": ...} answers."""
        if self.process.poll() is not None:
            raise PeerError(f"{self.engine} worker is not running (exit {self.process.returncode})")
        self._next_id += 1
        message = {**message, "id": self._next_id}
        try:
            self.process.stdin.write(encode(message))
            self.process.stdin.flush()
        except BrokenPipeError:
            raise PeerError(f"{self.engine} worker closed its input\n{self.stderr_tail()}") from None
        answer = self._read(self.timeout_s if timeout_s is None else timeout_s)
        if answer.get("id") != self._next_id:
            self.kill()
            raise PeerError(f"{self.engine} worker answered request {answer.get('id')}, expected {self._next_id}")
        if "error" in answer:
            raise PeerError(f"{self.engine}: {answer['error']}")
        return answer

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> PeerResult:
        return PeerResult.from_message(self.request(
            {"op": "generate", "prompt_ids": [int(t) for t in prompt_ids], "max_new_tokens": int(max_new_tokens),
             "greedy": True}))

    def logits(self, prompt_ids: Sequence[int]) -> np.ndarray:
        answer = self.request({"op": "logits", "prompt_ids": [int(t) for t in prompt_ids]})
        return np.asarray(answer["logits"], dtype=np.float32)

    def batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[list[PeerResult], float]:
        """openvino-cb: all prompts at once; (one result per prompt, wall seconds of the batch)."""
        answer = self.request({"op": "batch", "prompts": [[int(t) for t in p] for p in prompts],
                               "max_new_tokens": int(max_new_tokens), "greedy": True})
        return [PeerResult.from_message(s) for s in answer["streams"]], float(answer["wall_s"])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to quit; terminate, then kill it if it does not within timeout_s."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(encode({"op": "quit"}))
                self.process.stdin.flush()
                self.process.stdin.close()
                self.process.wait(timeout=timeout_s)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.terminate()
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream and not stream.closed:
                stream.close()
        self._reader.close()
        self._stderr.close()

    def __enter__(self) -> PeerWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def peer_generator(worker: PeerWorker) -> Callable[[Sequence[int], int], Any]:
    """A bench Generator (prompt ids, max tokens) -> RequestTiming timed by the peer in process."""
    from serving.bench.stats import RequestTiming  # the bench's timing record

    def generate(prompt: Sequence[int], max_tokens: int) -> Any:
        sent = time.perf_counter()
        result = worker.generate(prompt, max_tokens)
        return RequestTiming(sent=sent, token_times=result.token_times(sent), prompt_tokens=len(prompt),
                             tokens=result.token_ids)

    return generate


# ----------------------------------------------------------------------------- conversion


def convert(kind: str, hf_dir: Path | str, out_dir: Path | str, *, types: Sequence[str] = (),
            threads: int = 2, venv: Optional[Path | str] = None, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """Convert a Hugging Face GPT-2 folder for the peers with scripts/peers/convert.py.

    kind "gguf": types from f32, q8_0, q4_0 (default all); kind "openvino": fp32, int8, int4.
    Returns one record per artefact ({"kind", "type", "path", "seconds", "bytes"})."""
    if kind not in ("gguf", "openvino"):
        raise ValueError(f"kind must be gguf or openvino, got {kind!r}")
    python = peers_python(venv, KIND_PEER[kind])
    cmd = [str(python), str(SCRIPTS / "convert.py"), kind, str(hf_dir), str(out_dir), "--threads", str(threads)]
    if types:
        cmd += ["--types" if kind == "gguf" else "--formats", ",".join(types)]
    logger.info("converting %s to %s in %s", hf_dir, kind, out_dir)
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PeerTimeout(f"converting {hf_dir} to {kind} took more than {timeout_s:g} s") from None
    if done.returncode != 0:
        raise PeerError(f"converting {hf_dir} to {kind} failed ({done.returncode}):\n"
                        f"{done.stderr.decode(errors='replace')[-STDERR_TAIL_BYTES:]}")
    return [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
