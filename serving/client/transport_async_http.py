"""The asyncio HTTP/REST transport (tritonclient.http.aio): steps, config, tokenizer, server-mode SSE streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import numpy as np

from serving.client.errors import _tritonclient_error
from serving.client.keys import admin_headers
from serving.client.server_mode import _http_server_events
from serving.client.step import _async_http_step, _http_step_model, _no_http_stream, _StepModel
from serving.generation import ServerUnavailableError, TokenEvent


class _AsyncHttpTransport:
    """asyncio steps over HTTP/REST (one tritonclient.http.aio client, made on first use)."""

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
        """async step(tokens, start=, end=) (see serving.client.step); no streams over HTTP."""
        _no_http_stream(stream)
        return _async_http_step(self._ensure, self.model, correlation_id, argmax=argmax, url=self.url,
                                timeout=self.timeout)

    async def step_model(self, model: str) -> _StepModel:
        try:
            config = await asyncio.wait_for(self._ensure().get_model_config(model, headers=admin_headers()),
                                            self.timeout)
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
