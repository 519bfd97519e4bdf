"""The blocking gRPC transport: one thread-safe channel for the steps of many sequences, the config, the tokenizer."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Optional

from serving.client.errors import _grpc_error, _tritonclient_error
from serving.client.keys import admin_metadata
from serving.client.loop_thread import _LoopThread, _stream_loop
from serving.client.step import _grpc_step, _grpc_step_model, _StepModel, _StepRequest, _threaded_step
from serving.client.transport_async_grpc import _CHANNEL_OPTIONS, _AsyncGrpcTransport


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
        return _grpc_step(self._stub.ModelInfer, request, url=self.url, timeout=self.timeout)

    def _streamed_sequence(self, correlation_id: int, *, argmax: bool):
        """The steps over a stream of an asyncio channel, run on the process's loop thread."""
        with self._streams_lock:
            if self._streams is None:
                self._streams = (_stream_loop(), _AsyncGrpcTransport(self.url, self.model, self.timeout))
        loop, transport = self._streams
        return _threaded_step(loop, transport.sequence(correlation_id, argmax=argmax, stream=True))

    def step_model(self, model: str) -> _StepModel:
        from tritonclient.grpc import service_pb2

        try:
            response = self._stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=self.timeout,
                                              metadata=admin_metadata())
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
