"""The blocking HTTP/REST transport (tritonclient.http, one connection per thread): steps, config, tokenizer."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from serving.client.errors import _tritonclient_error
from serving.client.keys import admin_headers
from serving.client.step import _http_step, _http_step_model, _no_http_stream, _StepModel


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
        """step(tokens, start=, end=) (see serving.client.step); no streams over HTTP."""
        _no_http_stream(stream)
        return _http_step(self._client, self.model, correlation_id, argmax=argmax, url=self.url)

    def step_model(self, model: str) -> _StepModel:
        try:
            config = self._client().get_model_config(model, headers=admin_headers())
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
