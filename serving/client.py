"""Client library: generate text from a gptpipe Triton server.

Two ways to generate (see ARCHITECTURE.md):

* ``mode="client"`` (default): this process runs the generation loop of
  :mod:`serving.generation`: it tokenizes, sends the prompt to the stateful ``gpt`` model
  as the START of a sequence (a random 63-bit correlation id), samples from the logits
  that come back with :mod:`serving.sampling`, sends the token, ... and always ends the
  sequence (END), also on errors, Ctrl-C and a stream closed early.
* ``mode="server"``: the ``generate`` model runs the same loop on the server; the client
  reads one response per token from a gRPC stream (or the HTTP generate extension's
  ``generate_stream`` with ``protocol="http"``).

Both modes give the same tokens for the same request and seed (same sampler, one random
draw per sampled token). Example::

    from serving import Client

    with Client("localhost:8001") as client:
        print(client.generate("Once upon a time", max_new_tokens=32, temperature=0).text)
        for delta in client.generate("Hello", stream=True):
            print(delta, end="", flush=True)

The client-mode step talks to Triton's gRPC service with one prebuilt ``ModelInferRequest``
per sequence (only the token bytes and the START/END flags change between steps), which
keeps the per-token client overhead to a protobuf serialize and one RPC.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from serving import tensors
from serving.generation import (
    Generation,
    GenerationResult,
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    Timings,
    TokenEvent,
    agenerate_tokens,
    check_max_new_tokens,
    check_stop,
    collect,
    generate_tokens,
    make_sampling_params,
)
from serving.sampling import SamplingParams
from serving.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "Client", "AsyncClient", "GenerationResult", "Timings", "TextStreamIterator",
    "GptpipeError", "InvalidParameterError", "PromptTooLongError", "ServerBusyError",
    "ServerUnavailableError", "ServerError", "GenerationConfig",
]

Protocol_ = Literal["grpc", "http"]
Mode = Literal["client", "server"]
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 60.0
# How long a START refused with "server busy" (every KV slot taken) is retried by default.
DEFAULT_QUEUE_TIMEOUT_S = 30.0
# END-only steps of a finished or failed sequence: short, nobody waits for their answer.
RELEASE_TIMEOUT_S = 5.0
_LOGITS, _OUTPUT_IDS = tensors.GPT_OUTPUTS
_INPUT_IDS = tensors.GPT_INPUTS[0]


# ---------------------------------------------------------------------------- errors


def _known_error(message: str) -> Optional[GptpipeError]:
    """The gptpipe exception for a message the gptpipe models send, else None. Checked before
    any transport status: `gpt` refuses a START with gRPC UNAVAILABLE when its pool is full,
    which is "busy", not "unreachable"."""
    low = message.lower()
    if "server busy" in low:
        return ServerBusyError(message)
    if "prompt too long" in low or "context length exceeded" in low:
        return PromptTooLongError(message)
    if "invalid parameter" in low:
        return InvalidParameterError(message)
    return None


def error_from_message(message: str) -> GptpipeError:
    """The gptpipe exception for an error message from the server (the message is kept)."""
    return _known_error(message) or ServerError(message)


def _grpc_error(e: Exception, url: str, timeout: Optional[float], *, start: bool = False) -> GptpipeError:
    import grpc

    code = e.code() if isinstance(e, grpc.RpcError) else None
    details = (e.details() if isinstance(e, grpc.RpcError) else str(e)) or ""
    known = _known_error(details)
    if known is not None:
        return known
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(f"Triton server at {url} (grpc) is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        hint = (" (a START waits in Triton's queue while every sequence slot is taken: raise timeout_s, "
                "or end idle sequences)") if start else ""
        return ServerUnavailableError(f"no answer from the Triton server at {url} (grpc) within {timeout} s{hint}")
    if code == grpc.StatusCode.CANCELLED:
        return ServerUnavailableError(f"the request to {url} (grpc) was cancelled: {details}")
    return error_from_message(details or str(e))


def _tritonclient_error(e: Exception, url: str, protocol: str) -> GptpipeError:
    """From a tritonclient InferenceServerException or a socket error."""
    if isinstance(e, GptpipeError):
        return e
    if isinstance(e, (ConnectionError, OSError)) and not isinstance(e, TimeoutError):
        return ServerUnavailableError(f"cannot reach the Triton server at {url} ({protocol}): {e}")
    if isinstance(e, TimeoutError):
        return ServerUnavailableError(f"no answer from the Triton server at {url} ({protocol}): {e}")
    message = (e.message() if hasattr(e, "message") and callable(e.message) else str(e)) or ""
    known = _known_error(message)
    if known is not None:
        return known
    status = str(e.status()) if hasattr(e, "status") and callable(e.status) else ""
    if "UNAVAILABLE" in status or "failed to connect" in (message or "").lower():
        return ServerUnavailableError(f"Triton server at {url} ({protocol}) is unavailable: {message}")
    if "DEADLINE_EXCEEDED" in status or "timed out" in (message or "").lower():
        return ServerUnavailableError(f"no answer from the Triton server at {url} ({protocol}): {message}")
    return error_from_message(message or str(e))


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class GenerationConfig:
    """What a client needs to know of the model besides the tokenizer."""

    n_positions: int
    vocab_size: int
    eos_token_id: Optional[int] = None
    max_sequences: Optional[int] = None  # the server's KV-pool slots: sequences served at once

    @classmethod
    def from_json(cls, text: str) -> GenerationConfig:
        d = json.loads(text)
        slots = d.get("max_sequences")
        return cls(n_positions=int(d["n_positions"]), vocab_size=int(d["vocab_size"]),
                   eos_token_id=d.get("eos_token_id"), max_sequences=int(slots) if slots else None)


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")


def _check_protocol(protocol: str) -> str:
    if protocol not in ("grpc", "http"):
        raise InvalidParameterError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return protocol


def _check_ids(prompt: Any) -> list[int]:
    if not isinstance(prompt, (list, tuple, np.ndarray)):
        raise InvalidParameterError(f"prompt must be a string or a sequence of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    for i, t in enumerate(ids):
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise InvalidParameterError(f"prompt[{i}] must be a token id (int), got {t!r}")
    return [int(t) for t in ids]


def _new_correlation_id() -> int:
    # random 63 bits: unique across threads and processes without coordination; never 0
    # (0 means "not a sequence" to Triton) and positive as an int64 protobuf parameter
    return secrets.randbits(63) or 1


@dataclass(frozen=True)
class _Request:
    """A validated generate() call."""

    prompts: tuple[str, ...]
    single: bool
    max_new_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    mode: Mode
    return_logprobs: bool


def _validate(prompt: Any, *, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
              repetition_penalty: Any, stop: Any, seed: Any, stream: Any, mode: Any,
              return_logprobs: Any) -> _Request:
    """Every check that needs no server: runs before any network call."""
    single = isinstance(prompt, str)
    prompts = (prompt,) if single else tuple(prompt) if isinstance(prompt, (list, tuple)) else None
    if prompts is None:
        raise InvalidParameterError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise InvalidParameterError("prompt is an empty list: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidParameterError(f"prompt[{i}] must be a string, got {type(p).__name__}")
        if not p:
            raise InvalidParameterError("prompt is empty: it needs at least one token" +
                                        ("" if single else f" (prompt[{i}])"))
    if mode not in ("client", "server"):
        raise InvalidParameterError(f"mode must be 'client' or 'server', got {mode!r}")
    if stream and not single:
        raise InvalidParameterError("stream=True takes one prompt (a string), not a list")
    return _Request(
        prompts=prompts,
        single=single,
        max_new_tokens=check_max_new_tokens(max_new_tokens),
        params=make_sampling_params(temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seed=seed),
        stop=check_stop(stop),
        stream=bool(stream),
        mode=mode,
        return_logprobs=bool(return_logprobs),
    )


# ---------------------------------------------------------------------------- gRPC step


def _step_output(argmax: bool):
    """The `gpt` output a step asks for: the greedy token id (argmax-only generations on a
    server that has it) or the logits."""
    return _OUTPUT_IDS if argmax else _LOGITS


class _StepRequest:
    """The one ModelInferRequest of a sequence, reused for every step of it."""

    def __init__(self, model: str, correlation_id: int, *, argmax: bool = False) -> None:
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name=model)
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = _INPUT_IDS.name, _INPUT_IDS.datatype
        tensor.shape.extend([1, 1])  # (1, T): one sequence per request
        self.output = _step_output(argmax)
        req.outputs.add().name = self.output.name
        req.parameters["sequence_id"].int64_param = correlation_id
        self._start = req.parameters["sequence_start"]
        self._end = req.parameters["sequence_end"]
        req.raw_input_contents.append(b"")
        self.request = req

    def set(self, tokens: Sequence[int], *, start: bool, end: bool):
        ids = np.asarray(tokens, dtype=np.int64)  # (T,)
        self.request.inputs[0].shape[1] = ids.shape[0]
        self.request.raw_input_contents[0] = ids.tobytes()
        self._start.bool_param = start
        self._end.bool_param = end
        return self.request


    def output_of(self, response) -> np.ndarray:
        """The logits (V,), or the greedy token id (1,)."""
        if not response.raw_output_contents:
            raise ServerError(f"the {tensors.GPT_MODEL} model answered without {self.output.name}")
        return np.frombuffer(response.raw_output_contents[0], dtype=np.dtype(self.output.dtype))


@dataclass(frozen=True)
class _StepModel:
    """What the client-side loop needs to know of the server's step model."""

    outputs: frozenset[str]
    decoupled: bool  # in-flight batching: steps go over a gRPC stream


def _grpc_step_model(response) -> _StepModel:
    config = response.config
    return _StepModel(frozenset(o.name for o in config.output), bool(config.model_transaction_policy.decoupled))


def _http_step_model(config: dict) -> _StepModel:
    return _StepModel(frozenset(o["name"] for o in config.get("output", [])),
                      bool(config.get("model_transaction_policy", {}).get("decoupled", False)))


class _LoopThread:
    """An asyncio event loop in a daemon thread: the blocking clients run their gRPC streams
    (steps of a decoupled `gpt`) on it, with a timeout per step."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gptpipe-grpc-streams", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:  # e.g. Ctrl-C in the caller: stop the step too (it drops its stream)
            future.cancel()
            raise



_stream_loop_thread: Optional[_LoopThread] = None
_stream_loop_lock = threading.Lock()


def _stream_loop() -> _LoopThread:
    """The process's one loop thread for every blocking client's streams. (One per client was
    11-18% slower in aggregate with 8 one-stream clients in a process, 3 of 3 paired runs: 16
    threads instead of 9 contending for the GIL.)"""
    global _stream_loop_thread
    with _stream_loop_lock:
        if _stream_loop_thread is None:
            _stream_loop_thread = _LoopThread()
        return _stream_loop_thread


def _forget_stream_loop() -> None:  # a forked child has no such thread
    global _stream_loop_thread
    _stream_loop_thread = None


os.register_at_fork(after_in_child=_forget_stream_loop)


_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class _GrpcTransport:
    """Blocking steps over one gRPC channel (thread-safe: one channel, many sequences)."""

    protocol = "grpc"

    def __init__(self, url: str, model: str, timeout: float) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.url, self.model, self.timeout = url, model, timeout
        self._channel = grpc.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._streams: Optional[tuple[_LoopThread, _AsyncGrpcTransport]] = None
        self._streams_lock = threading.Lock()

    def sequence(self, correlation_id: int, *, argmax: bool = False, stream: bool = False):
        """step(tokens, start=, end=) -> the logits (V,), or with argmax the greedy token id (1,).
        stream: over a gRPC stream (a decoupled `gpt`), else one ModelInfer call per step."""
        if stream:
            return self._streamed_sequence(correlation_id, argmax=argmax)
        request = _StepRequest(self.model, correlation_id, argmax=argmax)
        infer = self._stub.ModelInfer
        unreachable = False  # after a lost server, the END-only step gets a short timeout

        def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
            nonlocal unreachable
            timeout = min(RELEASE_TIMEOUT_S, self.timeout) if unreachable else self.timeout
            try:
                response = infer(request.set(tokens, start=start, end=end), timeout=timeout)
            except Exception as e:  # grpc.RpcError
                error = _grpc_error(e, self.url, timeout, start=start)
                unreachable = isinstance(error, ServerUnavailableError)
                raise error from None
            return request.output_of(response)

        return step

    def _streamed_sequence(self, correlation_id: int, *, argmax: bool):
        with self._streams_lock:
            if self._streams is None:
                self._streams = (_stream_loop(), _AsyncGrpcTransport(self.url, self.model, self.timeout))
        loop, transport = self._streams
        astep = transport.sequence(correlation_id, argmax=argmax, stream=True)

        def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
            return loop.run(astep(tokens, start=start, end=end))

        return step

    def step_model(self, model: str) -> _StepModel:
        from tritonclient.grpc import service_pb2

        try:
            response = self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=self.timeout)
        except Exception as e:  # grpc.RpcError
            raise _grpc_error(e, self.url, self.timeout) from None
        return _grpc_step_model(response)

    def infer_bytes(self, model: str, outputs: Sequence[str]) -> dict[str, bytes]:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            result = client.infer(model, [], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                                  client_timeout=self.timeout)
        except Exception as e:
            raise _tritonclient_error(e, self.url, "grpc") from None
        finally:
            client.close()
        return {o: result.as_numpy(o).reshape(-1)[0] for o in outputs}

    def close(self) -> None:
        self._channel.close()
        if self._streams is not None:
            loop, transport = self._streams
            loop.run(transport.close())


class _HttpTransport:
    """Blocking steps over HTTP/REST (tritonclient.http; one connection per thread)."""

    protocol = "http"

    def __init__(self, url: str, model: str, timeout: float) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def sequence(self, correlation_id: int, *, argmax: bool = False, stream: bool = False):
        import tritonclient.http as httpclient

        _no_http_stream(stream)
        spec = _step_output(argmax)
        output = httpclient.InferRequestedOutput(spec.name, binary_data=True)

        def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
            ids = np.asarray(tokens, dtype=np.int64)[None, :]  # (1, T)
            inp = httpclient.InferInput(_INPUT_IDS.name, list(ids.shape), _INPUT_IDS.datatype)
            inp.set_data_from_numpy(ids, binary_data=True)
            try:
                result = self._client().infer(self.model, [inp], outputs=[output], sequence_id=correlation_id,
                                              sequence_start=start, sequence_end=end)
            except Exception as e:
                raise _tritonclient_error(e, self.url, "http") from None
            return result.as_numpy(spec.name)[0]  # (V,) or (1,)

        return step

    def step_model(self, model: str) -> _StepModel:
        try:
            config = self._client().get_model_config(model)
        except Exception as e:
            raise _tritonclient_error(e, self.url, "http") from None
        return _http_step_model(config)

    def infer_bytes(self, model: str, outputs: Sequence[str]) -> dict[str, bytes]:
        import tritonclient.http as httpclient

        try:
            result = self._client().infer(model, [], outputs=[httpclient.InferRequestedOutput(o) for o in outputs])
        except Exception as e:
            raise _tritonclient_error(e, self.url, "http") from None
        return {o: result.as_numpy(o).reshape(-1)[0] for o in outputs}

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing a client of another thread's hub
                    pass
            self._clients.clear()


def _no_http_stream(stream: bool) -> None:
    if stream:
        raise InvalidParameterError(
            "mode='client' over HTTP needs a `gpt` model without in-flight batching: this server's is "
            "decoupled (steps go over gRPC streams). Use protocol='grpc', or mode='server', or export "
            "with --no-inflight-batching")


# ---------------------------------------------------------------------------- server mode


def _generate_inputs(generation: Generation, request: _Request) -> dict[str, np.ndarray]:
    """The `generate` model's inputs for one prompt (names and dtypes from the table)."""
    p = request.params
    values: dict[str, Any] = {
        "input_ids": np.asarray(generation.prompt_ids, dtype=np.int64),
        "max_tokens": [request.max_new_tokens],
        "temperature": [p.temperature],
        "top_k": [p.top_k],
        "top_p": [p.top_p],
        "repetition_penalty": [p.repetition_penalty],
        "random_seed": [generation.seed],  # resolved: the client knows the seed it used
        "stream": [True],  # one response per token: timings and streaming for every call
        "return_log_probs": [request.return_logprobs],
        # the client's eos (a local generation config may differ from the server's)
        "end_id": [-1 if generation.eos_token_id is None else generation.eos_token_id],
    }
    if request.stop:
        values["stop_words"] = [s.encode("utf-8") for s in request.stop]
    specs = {spec.name: spec for spec in tensors.GENERATE_INPUTS}
    out = {}
    for name, value in values.items():
        dtype = np.object_ if specs[name].dtype == "bytes" else np.dtype(specs[name].dtype)
        out[name] = np.asarray(value, dtype=dtype)
    return out


def _event_from_outputs(outputs: dict[str, Any], latency: float) -> Optional[TokenEvent]:
    """A TokenEvent from one `generate` response; None for an empty (flag-only) response."""
    ids = outputs.get("output_ids")
    if ids is None or len(ids) == 0:
        return None
    text = outputs.get("text_output")
    text = text.decode("utf-8") if isinstance(text, bytes) else (text or "")
    finish = outputs.get("finish_reason")
    finish = finish.decode() if isinstance(finish, bytes) else finish
    logprobs = outputs.get("output_log_probs")
    logprob = float(logprobs[0]) if logprobs is not None and len(logprobs) else None
    return TokenEvent(int(ids[0]), text, logprob, finish or None, latency)


def _outputs_of(result) -> dict[str, Any]:
    out = {}
    for spec in tensors.GENERATE_OUTPUTS:
        array = result.as_numpy(spec.name)
        if array is not None:
            out[spec.name] = array.reshape(-1)[0] if spec.dtype == "bytes" else array.reshape(-1)
    return out


def _grpc_server_events(url: str, model: str, inputs: dict[str, np.ndarray], timeout: float) -> Iterator[TokenEvent]:
    """Events of one `generate` request over its own gRPC stream (tritonclient start_stream)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        infer_inputs = []
        for name, array in inputs.items():
            spec = next(s for s in tensors.GENERATE_INPUTS if s.name == name)
            infer_input = grpcclient.InferInput(name, list(array.shape), spec.datatype)
            infer_input.set_data_from_numpy(array)
            infer_inputs.append(infer_input)
        sent = time.perf_counter()
        client.async_stream_infer(model, infer_inputs, request_id=str(_new_correlation_id()),
                                  enable_empty_final_response=True)
        while True:
            try:
                result, error, arrived = responses.get(timeout=timeout)
            except queue.Empty:
                raise ServerUnavailableError(f"no answer from the Triton server at {url} (grpc) "
                                             f"within {timeout} s") from None
            if error is not None:
                raise _tritonclient_error(error, url, "grpc")
            event = _event_from_outputs(_outputs_of(result), arrived - sent)
            sent = arrived
            final = result.get_response().parameters.get("triton_final_response")
            if event is not None:
                if event.finish_reason is not None:
                    finished = True
                yield event
            if final is not None and final.bool_param:
                if not finished:
                    raise ServerError("the generate stream ended without a finish reason")
                return
    finally:
        try:
            client.stop_stream(cancel_requests=not finished)  # cancel: the server stops and ENDs
        except Exception as e:  # noqa: BLE001
            logger.debug("closing the generate stream failed: %s", e)
        client.close()


def _http_server_events(url: str, model: str, inputs: dict[str, np.ndarray], timeout: float) -> Iterator[TokenEvent]:
    """Events of one request through the HTTP generate extension (generate_stream, SSE)."""
    body = {name: (array.tolist() if name in ("input_ids", "stop_words") else array.reshape(-1)[0].item())
            for name, array in inputs.items()}
    if "stop_words" in body:
        body["stop_words"] = [s.decode("utf-8") for s in inputs["stop_words"]]
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sent = time.perf_counter()
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise error_from_message(_http_error_message(e)) from None
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnavailableError(f"cannot reach the Triton server at {url} (http): {e}") from None
    with closing(response):
        try:
            for line in response:
                if not line.startswith(b"data:"):
                    continue
                data = json.loads(line[5:])
                arrived = time.perf_counter()
                if "error" in data:
                    raise error_from_message(data["error"])
                outputs = {k: _json_output(v) for k, v in data.items() if k in _GENERATE_OUTPUT_NAMES}
                event = _event_from_outputs(outputs, arrived - sent)
                sent = arrived
                if event is not None:
                    yield event
                    if event.finish_reason is not None:
                        return
        except (OSError, ValueError) as e:
            if isinstance(e, GptpipeError):
                raise
            raise ServerUnavailableError(f"the generate stream from {url} (http) broke off: {e}") from None
    raise ServerError("the generate stream ended without a finish reason")


_GENERATE_OUTPUT_NAMES = frozenset(spec.name for spec in tensors.GENERATE_OUTPUTS)


def _json_output(value: Any) -> Any:
    """A generate-extension JSON output as _event_from_outputs wants it. Triton writes a
    one-element tensor as a bare value (output_ids: 7, not [7]) and strings as text."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, float)):
        return [value]
    return value


def _http_error_message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", str(e))
    except Exception:  # noqa: BLE001
        return str(e)


# ---------------------------------------------------------------------------- streams


class TextStreamIterator:
    """Iterator of text deltas of one generation (``generate(..., stream=True)``).

    Closing it (``close()``, leaving a ``with`` block, or dropping it) stops the generation
    and frees the server's slot. Once exhausted, ``result`` holds the GenerationResult.
    """

    def __init__(self, events: Iterator[TokenEvent], *, return_logprobs: bool) -> None:
        self._events = events
        self._seen: list[TokenEvent] = []
        self._return_logprobs = return_logprobs
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> TextStreamIterator:
        return self

    def __next__(self) -> str:
        while True:
            try:
                event = next(self._events)
            except StopIteration:
                if self.result is None:
                    self.result = collect(self._seen, return_logprobs=self._return_logprobs)
                raise
            self._seen.append(event)
            if event.text:
                return event.text

    def events_so_far(self) -> list[TokenEvent]:
        return list(self._seen)

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextStreamIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextStreamIterator:
    """Async iterator of text deltas (``AsyncClient.generate(..., stream=True)``)."""

    def __init__(self, events: AsyncIterator[TokenEvent], *, return_logprobs: bool) -> None:
        self._events = events
        self._seen: list[TokenEvent] = []
        self._return_logprobs = return_logprobs
        self.result: Optional[GenerationResult] = None

    def __aiter__(self) -> AsyncTextStreamIterator:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                event = await self._events.__anext__()
            except StopAsyncIteration:
                if self.result is None:
                    self.result = collect(self._seen, return_logprobs=self._return_logprobs)
                raise
            self._seen.append(event)
            if event.text:
                return event.text

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncTextStreamIterator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------- clients


class _ClientBase:
    def __init__(self, url: Optional[str], protocol: str, model: str, tokenizer: Union[str, Path, None], *,
                 generate_model: str, tokenizer_model: str, timeout_s: float, queue_timeout: float) -> None:
        self.protocol = _check_protocol(protocol)
        self.url = _strip_scheme(url or DEFAULT_URLS[protocol])
        self.model = model
        self.generate_model = generate_model
        self.tokenizer_model = tokenizer_model
        if not timeout_s > 0:
            raise InvalidParameterError(f"timeout_s must be > 0, got {timeout_s}")
        if not queue_timeout >= 0:
            raise InvalidParameterError(f"queue_timeout must be >= 0, got {queue_timeout}")
        self.timeout_s = float(timeout_s)
        self.queue_timeout = float(queue_timeout)
        self._tokenizer_path = Path(tokenizer) if tokenizer is not None else None
        self._tokenizer: Optional[Tokenizer] = None
        self._config: Optional[GenerationConfig] = None
        self._setup_lock = threading.Lock()
        self._step_model: Optional[_StepModel] = None  # the server's `gpt`: asked once, on first use

    def _local_tokenizer(self) -> tuple[Optional[Tokenizer], Optional[GenerationConfig]]:
        path = self._tokenizer_path
        if path is None:
            return None, None
        folder = path if path.is_dir() else path.parent
        tokenizer = Tokenizer.from_file(path) if path.is_file() else Tokenizer.from_folder(path)
        config_file = folder / "generation_config.json"
        config = GenerationConfig.from_json(config_file.read_text()) if config_file.is_file() else None
        return tokenizer, config

    def _generations(self, request: _Request, *, prompt_ids: Optional[list[int]] = None,
                     ignore_eos: bool = False) -> list[Generation]:
        """Tokenize and validate every prompt (prompt length against the context).
        prompt_ids: token ids given instead of the (single) text prompt."""
        assert self._tokenizer is not None and self._config is not None
        out = []
        for i, prompt in enumerate(request.prompts):
            ids = prompt_ids if prompt_ids is not None else self._tokenizer.encode(prompt)
            try:
                out.append(Generation(
                    ids, max_new_tokens=request.max_new_tokens, params=request.params,
                    n_positions=self._config.n_positions, vocab_size=self._config.vocab_size,
                    eos_token_id=None if ignore_eos else self._config.eos_token_id, stop=request.stop,
                    tokenizer=self._tokenizer, return_logprobs=request.return_logprobs))
            except InvalidParameterError as e:
                if request.single:
                    raise
                raise type(e)(f"prompt[{i}]: {e}") from None
        return out

    def _sequence(self, generation: Generation):
        """The step function of one client-side generation. It asks `gpt` for the greedy token
        id instead of the logits when the logits would give nothing else (``argmax_only``) and
        the step model has that output (a repository exported before gptpipe added it does
        not); it steps over a gRPC stream when the step model is decoupled (in-flight batching)."""
        assert self._step_model is not None
        model = self._step_model
        argmax = generation.argmax_only and _OUTPUT_IDS.name in model.outputs
        return self._transport.sequence(_new_correlation_id(), argmax=argmax, stream=model.decoupled)

    def _slots(self) -> int:
        """Sequences one call runs at once: more than the server's slots would only be refused."""
        slots = self._config.max_sequences if self._config is not None else None
        return slots or 1 << 30

    def _with_busy_retry(self, step):
        """START retried while the server is busy, up to queue_timeout seconds."""
        if self.queue_timeout <= 0:
            return step

        def retrying(tokens, *, start, end):
            if not start:
                return step(tokens, start=start, end=end)
            deadline, delay = time.monotonic() + self.queue_timeout, 0.01
            while True:
                try:
                    return step(tokens, start=start, end=end)
                except ServerBusyError:
                    if time.monotonic() + delay > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(2 * delay, 0.5)

        return retrying

    @property
    def tokenizer(self) -> Tokenizer:
        self._setup()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def generation_config(self) -> GenerationConfig:
        self._setup()
        assert self._config is not None
        return self._config

    def _setup(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class Client(_ClientBase):
    """A blocking client; thread-safe. See the module docstring.

    url: "host:port" (default localhost:8001 for gRPC, localhost:8000 for HTTP);
    model: the step model; tokenizer: a local folder/file instead of the server's `tokenizer`
    model; timeout_s: the most one step (or, in server mode, one token) may take;
    queue_timeout: how long a START refused with "server busy" is retried (0: raise
    ServerBusyError at once); max_concurrency: prompts of one call generated at once (threads;
    never more than the server has sequence slots).
    """

    def __init__(self, url: Optional[str] = None, protocol: Protocol_ = "grpc", model: str = tensors.GPT_MODEL,
                 tokenizer: Union[str, Path, None] = None, *, generate_model: str = tensors.GENERATE_MODEL,
                 tokenizer_model: str = tensors.TOKENIZER_MODEL, timeout_s: float = DEFAULT_TIMEOUT_S,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S, max_concurrency: int = 16) -> None:
        super().__init__(url, protocol, model, tokenizer, generate_model=generate_model,
                         tokenizer_model=tokenizer_model, timeout_s=timeout_s, queue_timeout=queue_timeout)
        if max_concurrency < 1:
            raise InvalidParameterError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        transport = _GrpcTransport if self.protocol == "grpc" else _HttpTransport
        self._transport = transport(self.url, model, self.timeout_s)

    def _setup(self) -> None:
        if self._tokenizer is not None and self._config is not None:
            return
        with self._setup_lock:
            if self._tokenizer is not None and self._config is not None:
                return
            tokenizer, config = self._local_tokenizer()
            if tokenizer is None or config is None:
                files = self._transport.infer_bytes(self.tokenizer_model, [o.name for o in tensors.TOKENIZER_OUTPUTS])
                if tokenizer is None:
                    tokenizer = Tokenizer.from_str(files["tokenizer_json"].decode("utf-8"),
                                                   source=f"{self.url} model {self.tokenizer_model}")
                config = config or GenerationConfig.from_json(files["generation_config"].decode("utf-8"))
            self._tokenizer, self._config = tokenizer, config

    # -------------------------------------------------------------- public

    def generate(self, prompt: Union[str, list[str]], *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Union[str, Sequence[str]] = (), seed: Optional[int] = None, stream: bool = False,
                 mode: Mode = "client", return_logprobs: bool = False):
        """Generate from one prompt (-> GenerationResult), several (-> list, run concurrently),
        or stream one (-> TextStreamIterator of text deltas). temperature=0 is greedy."""
        request = _validate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                            stream=stream, mode=mode, return_logprobs=return_logprobs)
        self._setup()
        generations = self._generations(request)
        if request.stream:
            return TextStreamIterator(self._events(generations[0], request),
                                      return_logprobs=request.return_logprobs)
        if request.single:
            return collect(self._events(generations[0], request), return_logprobs=request.return_logprobs)
        return self._run_many(generations, request)

    def events(self, prompt: Union[str, Sequence[int]], *, max_new_tokens: int = 64, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               stop: Union[str, Sequence[str]] = (), seed: Optional[int] = None, mode: Mode = "client",
               return_logprobs: bool = False, ignore_eos: bool = False) -> Iterator[TokenEvent]:
        """The TokenEvents of one generation (token id, text delta, logprob, latency_s), for
        callers that want more than text: e.g. a benchmark, with a prompt of token ids and
        ignore_eos=True for exactly max_new_tokens tokens. Close it to stop early."""
        prompt_ids = None if isinstance(prompt, str) else _check_ids(prompt)
        request = _validate(prompt if prompt_ids is None else "<ids>", max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop, seed=seed, stream=True, mode=mode,
                            return_logprobs=return_logprobs)
        self._setup()
        generation = self._generations(request, prompt_ids=prompt_ids, ignore_eos=ignore_eos)[0]
        return self._events(generation, request)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _events(self, generation: Generation, request: _Request) -> Iterator[TokenEvent]:
        if request.mode == "server":
            inputs = _generate_inputs(generation, request)
            run = _grpc_server_events if self.protocol == "grpc" else _http_server_events
            return run(self.url, self.generate_model, inputs, self.timeout_s)
        return generate_tokens(self._with_busy_retry(self._client_step(generation)), generation)

    def _client_step(self, generation: Generation):
        if self._step_model is None:
            self._step_model = self._transport.step_model(self.model)
        return self._sequence(generation)

    def _run_many(self, generations: list[Generation], request: _Request) -> list[GenerationResult]:
        cancel = threading.Event()

        def run_one(generation: Generation) -> GenerationResult:
            with closing(self._events(generation, request)) as events:  # type: ignore[arg-type]
                seen = []
                for event in events:
                    seen.append(event)
                    if cancel.is_set():  # Ctrl-C in the caller: stop; closing sends END
                        raise KeyboardInterrupt
                return collect(seen, return_logprobs=request.return_logprobs)

        workers = min(self.max_concurrency, len(generations), self._slots())
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gptpipe-generate") as pool:
            futures = [pool.submit(run_one, g) for g in generations]
            try:
                concurrent.futures.wait(futures)
            except BaseException:
                cancel.set()
                for f in futures:
                    f.cancel()
                raise
        return [f.result() for f in futures]  # the first error, if any, is raised here


# ---------------------------------------------------------------------------- asyncio


class _AsyncGrpcTransport:
    protocol = "grpc"

    def __init__(self, url: str, model: str, timeout: float) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self._channel = None
        self._stub = None

    def _ensure(self):
        if self._stub is None:  # the channel binds to the running event loop: create it there
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.url, options=_CHANNEL_OPTIONS)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def sequence(self, correlation_id: int, *, argmax: bool = False, stream: bool = False):
        if stream:
            return self._streamed_sequence(correlation_id, argmax=argmax)
        request = _StepRequest(self.model, correlation_id, argmax=argmax)
        unreachable = False

        async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
            nonlocal unreachable
            timeout = min(RELEASE_TIMEOUT_S, self.timeout) if unreachable else self.timeout
            try:
                response = await self._ensure().ModelInfer(request.set(tokens, start=start, end=end), timeout=timeout)
            except Exception as e:  # grpc.aio.AioRpcError
                error = _grpc_error(e, self.url, timeout, start=start)
                unreachable = isinstance(error, ServerUnavailableError)
                raise error from None
            return request.output_of(response)

        return step

    def _streamed_sequence(self, correlation_id: int, *, argmax: bool):
        """The steps of one sequence over one ModelStreamInfer stream (a decoupled `gpt`: its
        in-flight batching answers each step on the stream). The stream closes after END."""
        request = _StepRequest(self.model, correlation_id, argmax=argmax)
        eof = _grpc_eof()
        call = None
        unreachable = False

        async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
            nonlocal call, unreachable
            timeout = min(RELEASE_TIMEOUT_S, self.timeout) if unreachable else self.timeout
            if call is None:
                call = self._ensure().ModelStreamInfer()
            try:
                await call.write(request.set(tokens, start=start, end=end))
                response = await asyncio.wait_for(call.read(), timeout)
                if response is None or response is eof:
                    raise ServerError(f"the {self.model} stream ended without an answer")
            except BaseException as e:
                call.cancel()
                call = None
                if isinstance(e, asyncio.TimeoutError):
                    error: BaseException = ServerUnavailableError(
                        f"no answer from the Triton server at {self.url} (grpc) within {timeout} s")
                elif isinstance(e, Exception) and not isinstance(e, GptpipeError):
                    error = _grpc_error(e, self.url, timeout, start=start)
                else:
                    raise
                unreachable = isinstance(error, ServerUnavailableError)
                raise error from None
            if end:  # the sequence is over: close the stream
                await call.done_writing()
                call = None
            if response.error_message:
                raise error_from_message(response.error_message)
            return request.output_of(response.infer_response)

        return step

    async def step_model(self, model: str) -> _StepModel:
        from tritonclient.grpc import service_pb2

        try:
            response = await self._ensure().ModelConfig(service_pb2.ModelConfigRequest(name=model),
                                                        timeout=self.timeout)
        except Exception as e:
            raise _grpc_error(e, self.url, self.timeout) from None
        return _grpc_step_model(response)

    async def infer_bytes(self, model: str, outputs: Sequence[str]) -> dict[str, bytes]:
        from tritonclient.grpc import InferResult, service_pb2

        req = service_pb2.ModelInferRequest(model_name=model)
        for o in outputs:
            req.outputs.add().name = o
        try:
            response = await self._ensure().ModelInfer(req, timeout=self.timeout)
        except Exception as e:
            raise _grpc_error(e, self.url, self.timeout) from None
        result = InferResult(response)
        return {o: result.as_numpy(o).reshape(-1)[0] for o in outputs}

    async def server_events(self, model: str, inputs: dict[str, np.ndarray]) -> AsyncIterator[TokenEvent]:
        """One `generate` request on its own gRPC stream of the shared channel."""
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import InferResult
        from tritonclient.grpc._utils import _get_inference_request

        infer_inputs = []
        for name, array in inputs.items():
            spec = next(s for s in tensors.GENERATE_INPUTS if s.name == name)
            infer_input = grpcclient.InferInput(name, list(array.shape), spec.datatype)
            infer_input.set_data_from_numpy(array)
            infer_inputs.append(infer_input)
        req = _get_inference_request(model_name=model, inputs=infer_inputs, model_version="", request_id="",
                                     outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
                                     priority=0, timeout=None, parameters=None)
        call = self._ensure().ModelStreamInfer()
        finished = False
        try:
            sent = time.perf_counter()
            await call.write(req)
            await call.done_writing()
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), self.timeout)
                except asyncio.TimeoutError:
                    raise ServerUnavailableError(f"no answer from the Triton server at {self.url} (grpc) "
                                                 f"within {self.timeout} s") from None
                except Exception as e:
                    raise _grpc_error(e, self.url, self.timeout) from None
                if response is None or response is _grpc_eof():
                    if not finished:
                        raise ServerError("the generate stream ended without a finish reason")
                    return
                if response.error_message:
                    raise error_from_message(response.error_message)
                arrived = time.perf_counter()
                event = _event_from_outputs(_outputs_of(InferResult(response.infer_response)), arrived - sent)
                sent = arrived
                if event is not None:
                    finished = finished or event.finish_reason is not None
                    yield event
                    if finished:
                        return
        finally:
            if not finished:
                call.cancel()  # the server sees the cancellation, stops and ENDs its sequence

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _grpc_eof():
    import grpc

    return grpc.aio.EOF


class _AsyncHttpTransport:
    protocol = "http"

    def __init__(self, url: str, model: str, timeout: float) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self._client = None

    def _ensure(self):
        if self._client is None:
            import tritonclient.http.aio as aiohttpclient

            self._client = aiohttpclient.InferenceServerClient(self.url, conn_timeout=self.timeout)
        return self._client

    def sequence(self, correlation_id: int, *, argmax: bool = False, stream: bool = False):
        import tritonclient.http.aio as aiohttpclient

        _no_http_stream(stream)
        spec = _step_output(argmax)
        output = aiohttpclient.InferRequestedOutput(spec.name, binary_data=True)

        async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
            ids = np.asarray(tokens, dtype=np.int64)[None, :]  # (1, T)
            inp = aiohttpclient.InferInput(_INPUT_IDS.name, list(ids.shape), _INPUT_IDS.datatype)
            inp.set_data_from_numpy(ids, binary_data=True)
            try:
                result = await asyncio.wait_for(
                    self._ensure().infer(self.model, [inp], outputs=[output], sequence_id=correlation_id,
                                         sequence_start=start, sequence_end=end),
                    self.timeout)
            except asyncio.TimeoutError:
                raise ServerUnavailableError(f"no answer from the Triton server at {self.url} (http) "
                                             f"within {self.timeout} s") from None
            except Exception as e:
                raise _tritonclient_error(e, self.url, "http") from None
            return result.as_numpy(spec.name)[0]

        return step

    async def step_model(self, model: str) -> _StepModel:
        try:
            config = await asyncio.wait_for(self._ensure().get_model_config(model), self.timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailableError(f"no answer from the Triton server at {self.url} (http) "
                                         f"within {self.timeout} s") from None
        except Exception as e:
            raise _tritonclient_error(e, self.url, "http") from None
        return _http_step_model(config)

    async def infer_bytes(self, model: str, outputs: Sequence[str]) -> dict[str, bytes]:
        import tritonclient.http.aio as aiohttpclient

        try:
            result = await self._ensure().infer(model, [], outputs=[aiohttpclient.InferRequestedOutput(o) for o in outputs])
        except Exception as e:
            raise _tritonclient_error(e, self.url, "http") from None
        return {o: result.as_numpy(o).reshape(-1)[0] for o in outputs}

    async def server_events(self, model: str, inputs: dict[str, np.ndarray]) -> AsyncIterator[TokenEvent]:
        # urllib in a thread: the SSE stream of the HTTP generate extension
        events = _http_server_events(self.url, model, inputs, self.timeout)
        loop = asyncio.get_running_loop()
        done = object()
        try:
            while True:
                event = await loop.run_in_executor(None, next, events, done)
                if event is done:
                    return
                yield event
        finally:
            await loop.run_in_executor(None, events.close)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class AsyncClient(_ClientBase):
    """The asyncio client. ``await client.generate(...)`` gives a GenerationResult (a list for
    several prompts, run concurrently); ``client.generate(..., stream=True)`` is an async
    iterator of text deltas. Arguments are validated when generate() is called."""

    def __init__(self, url: Optional[str] = None, protocol: Protocol_ = "grpc", model: str = tensors.GPT_MODEL,
                 tokenizer: Union[str, Path, None] = None, *, generate_model: str = tensors.GENERATE_MODEL,
                 tokenizer_model: str = tensors.TOKENIZER_MODEL, timeout_s: float = DEFAULT_TIMEOUT_S,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S) -> None:
        super().__init__(url, protocol, model, tokenizer, generate_model=generate_model,
                         tokenizer_model=tokenizer_model, timeout_s=timeout_s, queue_timeout=queue_timeout)
        transport = _AsyncGrpcTransport if self.protocol == "grpc" else _AsyncHttpTransport
        self._transport = transport(self.url, model, self.timeout_s)
        self._async_setup_lock: Optional[asyncio.Lock] = None

    def _setup(self) -> None:
        if self._tokenizer is None or self._config is None:
            raise GptpipeError("AsyncClient: await client.setup() (or a generate call) first")

    async def setup(self) -> None:
        """Fetch the tokenizer and generation config (generate() does it on first use)."""
        if self._tokenizer is not None and self._config is not None:
            return
        if self._async_setup_lock is None:
            self._async_setup_lock = asyncio.Lock()
        async with self._async_setup_lock:
            if self._tokenizer is not None and self._config is not None:
                return
            tokenizer, config = self._local_tokenizer()
            if tokenizer is None or config is None:
                files = await self._transport.infer_bytes(self.tokenizer_model,
                                                          [o.name for o in tensors.TOKENIZER_OUTPUTS])
                if tokenizer is None:
                    tokenizer = Tokenizer.from_str(files["tokenizer_json"].decode("utf-8"),
                                                   source=f"{self.url} model {self.tokenizer_model}")
                config = config or GenerationConfig.from_json(files["generation_config"].decode("utf-8"))
            self._tokenizer, self._config = tokenizer, config

    def generate(self, prompt: Union[str, list[str]], *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: Union[str, Sequence[str]] = (), seed: Optional[int] = None, stream: bool = False,
                 mode: Mode = "client", return_logprobs: bool = False):
        request = _validate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                            stream=stream, mode=mode, return_logprobs=return_logprobs)
        if request.stream:
            return AsyncTextStreamIterator(self._stream_events(request), return_logprobs=request.return_logprobs)
        return self._generate(request)

    async def _check_step_model(self, request: _Request) -> None:
        if request.mode == "client" and self._step_model is None:
            self._step_model = await self._transport.step_model(self.model)

    async def _stream_events(self, request: _Request) -> AsyncIterator[TokenEvent]:
        await self.setup()
        generations = self._generations(request)
        await self._check_step_model(request)
        events = self._events(generations[0], request)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _generate(self, request: _Request):
        await self.setup()
        generations = self._generations(request)
        await self._check_step_model(request)

        async def run_one(generation: Generation) -> GenerationResult:
            events = self._events(generation, request)
            try:
                return collect([e async for e in events], return_logprobs=request.return_logprobs)
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        slots = asyncio.Semaphore(self._slots())

        async def limited(generation: Generation) -> GenerationResult:
            async with slots:
                return await run_one(generation)

        results = await asyncio.gather(*(limited(g) for g in generations))
        return results[0] if request.single else list(results)

    def _events(self, generation: Generation, request: _Request) -> AsyncIterator[TokenEvent]:
        if request.mode == "server":
            return self._transport.server_events(self.generate_model, _generate_inputs(generation, request))
        step = self._sequence(generation)
        if self.queue_timeout > 0:
            step = self._async_busy_retry(step)
        return agenerate_tokens(step, generation)

    def _async_busy_retry(self, step):
        async def retrying(tokens, *, start, end):
            if not start:
                return await step(tokens, start=start, end=end)
            deadline, delay = time.monotonic() + self.queue_timeout, 0.01
            while True:
                try:
                    return await step(tokens, start=start, end=end)
                except ServerBusyError:
                    if time.monotonic() + delay > deadline:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 0.5)

        return retrying

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
