"""The client's per-token hot path: send one step of a sequence, read its answer, hand it to the sampler.

:func:`serving.generation.generate_tokens` (``agenerate_tokens`` for asyncio) drives a
generation: it calls ``step(tokens, start=, end=)`` once per token and samples the next token
from what the step returns — the logits (V,), or the greedy token id (1,) when sampling would
only take the argmax. This module makes those step functions, one per path:

* gRPC, one ``ModelInfer`` per step (blocking or asyncio), with one prebuilt
  ``ModelInferRequest`` per sequence (:class:`_StepRequest`: only the token bytes and the
  START/END flags change), so a step costs a protobuf serialize and one RPC;
* gRPC, one ``ModelStreamInfer`` stream per sequence when the step model is decoupled
  (in-flight batching); the blocking client runs it on the loop thread;
* HTTP/REST (tritonclient.http, blocking or asyncio), for a step model that is not decoupled.

:func:`_sequence_step` picks the path and the output for a generation; the busy retry
wrappers retry a START the server refused with "server busy" until ``queue_timeout``.
Connections, channels and the server's config live in the transports (``transport_*.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from serving import tensors
from serving.client.errors import _grpc_error, _tritonclient_error, error_from_message
from serving.client.request import _new_correlation_id
from serving.generation import (
    Generation,
    GptpipeError,
    InvalidParameterError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
)

if TYPE_CHECKING:
    from serving.client.loop_thread import _LoopThread

# END-only steps of a finished or failed sequence: short, nobody waits for their answer.
RELEASE_TIMEOUT_S = 5.0
_LOGITS, _OUTPUT_IDS = tensors.GPT_OUTPUTS
_INPUT_IDS = tensors.GPT_INPUTS[0]


# ---------------------------------------------------------------------------- which step


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


def _sequence_step(transport: Any, model: _StepModel, generation: Generation, correlation_id: Optional[int] = None):
    """The step function of one client-side generation. It asks `gpt` for the greedy token
    id instead of the logits when the logits would give nothing else (``argmax_only``) and
    the step model has that output (a repository exported before gptpipe added it does
    not); it steps over a gRPC stream when the step model is decoupled (in-flight batching).
    correlation_id: the sequence's id (a new random one by default)."""
    argmax = generation.argmax_only and _OUTPUT_IDS.name in model.outputs
    return transport.sequence(correlation_id or _new_correlation_id(), argmax=argmax, stream=model.decoupled)


def _step_output(argmax: bool):
    """The `gpt` output a step asks for: the greedy token id (argmax-only generations on a
    server that has it) or the logits."""
    return _OUTPUT_IDS if argmax else _LOGITS


def _no_http_stream(stream: bool) -> None:
    if stream:
        raise InvalidParameterError(
            "mode='client' over HTTP needs a `gpt` model without in-flight batching: this server's is "
            "decoupled (steps go over gRPC streams). Use protocol='grpc', or mode='server', or export "
            "with --no-inflight-batching")


# ---------------------------------------------------------------------------- gRPC steps


class _StepRequest:
    """The one ModelInferRequest of a sequence, reused for every step of it."""

    def __init__(self, model: str, correlation_id: int, *, argmax: bool = False, lease: bool = False) -> None:
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name=model)
        tensor = req.inputs.add()
        tensor.name, tensor.datatype = _INPUT_IDS.name, _INPUT_IDS.datatype
        tensor.shape.extend([1, 1])  # (1, T): one sequence per request
        self.output = _step_output(argmax)
        req.outputs.add().name = self.output.name
        req.parameters["sequence_id"].int64_param = correlation_id
        if lease:  # over a stream: `gpt` frees the slot as soon as the stream dies
            req.parameters[tensors.LEASE_PARAMETER].bool_param = True
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


def _grpc_step(infer: Callable[..., Any], request: _StepRequest, *, url: str, timeout: float):
    """Blocking: one ModelInfer call (``infer``) per step."""
    unreachable = False  # after a lost server, the END-only step gets a short timeout

    def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        nonlocal unreachable
        step_timeout = min(RELEASE_TIMEOUT_S, timeout) if unreachable else timeout
        try:
            response = infer(request.set(tokens, start=start, end=end), timeout=step_timeout)
        except Exception as e:  # grpc.RpcError
            error = _grpc_error(e, url, step_timeout, start=start)
            unreachable = isinstance(error, ServerUnavailableError)
            raise error from None
        return request.output_of(response)

    return step


def _async_grpc_step(stub: Callable[[], Any], request: _StepRequest, *, url: str, timeout: float):
    """asyncio: one ModelInfer call per step; ``stub()`` is the channel's stub (made on the running loop)."""
    unreachable = False

    async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        nonlocal unreachable
        step_timeout = min(RELEASE_TIMEOUT_S, timeout) if unreachable else timeout
        try:
            response = await stub().ModelInfer(request.set(tokens, start=start, end=end), timeout=step_timeout)
        except Exception as e:  # grpc.aio.AioRpcError
            error = _grpc_error(e, url, step_timeout, start=start)
            unreachable = isinstance(error, ServerUnavailableError)
            raise error from None
        return request.output_of(response)

    return step


def _grpc_eof():
    import grpc

    return grpc.aio.EOF


def grpc_errors() -> type:
    """The exception type of a failed gRPC call (a status the server or the channel set)."""
    import grpc

    return grpc.RpcError


def _async_grpc_stream_step(stub: Callable[[], Any], request: _StepRequest, *, model: str, url: str,
                            timeout: float):
    """asyncio: the steps of one sequence over one ModelStreamInfer stream (a decoupled `gpt`: its
    in-flight batching answers each step on the stream). The stream closes after END."""
    eof = _grpc_eof()
    call = None
    unreachable = False

    async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        nonlocal call, unreachable
        step_timeout = min(RELEASE_TIMEOUT_S, timeout) if unreachable else timeout
        if call is None:
            call = stub().ModelStreamInfer()
        try:
            await call.write(request.set(tokens, start=start, end=end))
            response = await asyncio.wait_for(call.read(), step_timeout)
            if response is None or response is eof:
                raise ServerUnavailableError(f"the {model} stream from the Triton server at {url} (grpc) "
                                             "ended without an answer: the server went away")
        except BaseException as e:
            call.cancel()
            call = None
            if isinstance(e, asyncio.TimeoutError):
                error: BaseException = ServerUnavailableError(
                    f"no answer from the Triton server at {url} (grpc) within {step_timeout} s")
            elif isinstance(e, grpc_errors()):
                error = _stream_error(e, url, step_timeout, start=start)
            elif isinstance(e, Exception) and not isinstance(e, GptpipeError):
                # e.g. grpc.aio's UsageError "RPC already finished", asyncio's InvalidStateError:
                # the stream finished under us, the server went away
                error = ServerUnavailableError(f"the {model} stream to the Triton server at {url} (grpc) "
                                               f"broke off: {e}")
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


def _stream_error(e: Exception, url: str, timeout: float, *, start: bool) -> GptpipeError:
    """A step stream's RPC failed. Triton answers a step's own errors on the stream (read
    above); the RPC itself fails when the connection does: grpc's "Internal error from Core"
    (INTERNAL) when a server dies under an open stream is an unreachable server too."""
    import grpc

    error = _grpc_error(e, url, timeout, start=start)
    if type(error) is ServerError and isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.INTERNAL:
        return ServerUnavailableError(f"the stream to the Triton server at {url} (grpc) broke off: {e.details()}")
    return error


def _threaded_step(loop: _LoopThread, astep: Callable[..., Any]):
    """Blocking: an asyncio step run on the loop thread (the blocking client's gRPC streams)."""

    def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        return loop.run(astep(tokens, start=start, end=end))

    return step


# ---------------------------------------------------------------------------- HTTP steps


def _http_input(httpclient: Any, tokens: Sequence[int]):
    """The input_ids of one step as a tritonclient.http(.aio) InferInput (binary)."""
    ids = np.asarray(tokens, dtype=np.int64)[None, :]  # (1, T)
    inp = httpclient.InferInput(_INPUT_IDS.name, list(ids.shape), _INPUT_IDS.datatype)
    inp.set_data_from_numpy(ids, binary_data=True)
    return inp


def _http_step(client: Callable[[], Any], model: str, correlation_id: int, *, argmax: bool, url: str):
    """Blocking: one HTTP infer call per step; ``client()`` is this thread's connection."""
    import tritonclient.http as httpclient

    spec = _step_output(argmax)
    output = httpclient.InferRequestedOutput(spec.name, binary_data=True)

    def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        inp = _http_input(httpclient, tokens)
        try:
            result = client().infer(model, [inp], outputs=[output], sequence_id=correlation_id,
                                    sequence_start=start, sequence_end=end)
        except Exception as e:
            raise _tritonclient_error(e, url, "http") from None
        return result.as_numpy(spec.name)[0]  # (V,) or (1,)

    return step


def _async_http_step(client: Callable[[], Any], model: str, correlation_id: int, *, argmax: bool, url: str,
                     timeout: float):
    """asyncio: one HTTP infer call per step, within ``timeout``."""
    import tritonclient.http.aio as aiohttpclient

    spec = _step_output(argmax)
    output = aiohttpclient.InferRequestedOutput(spec.name, binary_data=True)

    async def step(tokens: Sequence[int], *, start: bool, end: bool) -> np.ndarray:
        inp = _http_input(aiohttpclient, tokens)
        try:
            result = await asyncio.wait_for(
                client().infer(model, [inp], outputs=[output], sequence_id=correlation_id,
                               sequence_start=start, sequence_end=end),
                timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailableError(f"no answer from the Triton server at {url} (http) "
                                         f"within {timeout} s") from None
        except Exception as e:
            raise _tritonclient_error(e, url, "http") from None
        return result.as_numpy(spec.name)[0]

    return step


# ---------------------------------------------------------------------------- busy retry


class _Backoff:
    """The waits between STARTs refused with "server busy": 10 ms, doubling up to 0.5 s, none
    that would end past ``queue_timeout`` seconds from now."""

    def __init__(self, queue_timeout: float) -> None:
        self.deadline, self.delay = time.monotonic() + queue_timeout, 0.01

    def next(self) -> Optional[float]:
        """The next wait, or None: give up (raise the ServerBusyError)."""
        if time.monotonic() + self.delay > self.deadline:
            return None
        delay, self.delay = self.delay, min(2 * self.delay, 0.5)
        return delay


def _end_refused(step, tokens):
    """END the sequence whose START was refused as busy: Triton's sequence batcher took the START,
    and a retry under the same id without END logs a "sequence conflict" warning per retry."""
    try:
        return step(tokens[-1:], start=False, end=True)
    except GptpipeError:  # `gpt` answers that the sequence is not active: expected
        return None


def _with_busy_retry(step, queue_timeout: float):
    """START retried while the server is busy, up to queue_timeout seconds."""
    if queue_timeout <= 0:
        return step

    def retrying(tokens, *, start, end):
        if not start:
            return step(tokens, start=start, end=end)
        backoff = _Backoff(queue_timeout)
        while True:
            try:
                return step(tokens, start=start, end=end)
            except ServerBusyError:
                _end_refused(step, tokens)
                delay = backoff.next()
                if delay is None:
                    raise
                time.sleep(delay)

    return retrying


def _async_with_busy_retry(step, queue_timeout: float):
    """The same for an asyncio step."""
    if queue_timeout <= 0:
        return step

    async def retrying(tokens, *, start, end):
        if not start:
            return await step(tokens, start=start, end=end)
        backoff = _Backoff(queue_timeout)
        while True:
            try:
                return await step(tokens, start=start, end=end)
            except ServerBusyError:
                try:
                    await step(tokens[-1:], start=False, end=True)  # as _end_refused
                except GptpipeError:
                    pass
                delay = backoff.next()
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    return retrying
