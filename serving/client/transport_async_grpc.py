"""The asyncio gRPC transport: one grpc.aio channel for the steps, the config, the tokenizer and server-mode streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np

from serving.client.errors import _grpc_error, error_from_message
from serving.client.keys import admin_metadata
from serving.client.server_mode import _cut_short, _event_from_outputs, _grpc_infer_inputs, _outputs_of
from serving.client.step import (
    _async_grpc_step,
    _async_grpc_stream_step,
    _grpc_eof,
    _grpc_step_model,
    _StepModel,
    _StepRequest,
)
from serving.generation import ServerUnavailableError, TokenEvent

# Reconnect backoff capped at 1 s (gRPC's default grows to 120 s): a restarted server (the
# supervisor's restart, a rolling pod) is reached again within a second, not minutes later.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


class _AsyncGrpcTransport:
    """asyncio steps over one grpc.aio channel (made on the running event loop on first use)."""

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
        """async step(tokens, start=, end=) (see serving.client.step); stream: over a gRPC stream."""
        request = _StepRequest(self.model, correlation_id, argmax=argmax, lease=stream)
        if stream:
            return _async_grpc_stream_step(self._ensure, request, model=self.model, url=self.url,
                                           timeout=self.timeout)
        return _async_grpc_step(self._ensure, request, url=self.url, timeout=self.timeout)

    async def step_model(self, model: str) -> _StepModel:
        from tritonclient.grpc import service_pb2

        try:
            response = await self._ensure().ModelConfig(service_pb2.ModelConfigRequest(name=model),
                                                        timeout=self.timeout,
                                                        metadata=admin_metadata())
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
        from tritonclient.grpc import InferResult
        from tritonclient.grpc._utils import _get_inference_request

        infer_inputs = _grpc_infer_inputs(inputs)
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
                        raise _cut_short(self.url, "grpc")
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
