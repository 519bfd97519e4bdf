"""Server mode: the `generate` model's inputs for a request, and its responses (one per token) as TokenEvents.

The ``generate`` model runs the generation loop on the server. The blocking client reads one
request's responses from a gRPC stream of its own (:func:`_grpc_server_events`) or from the
HTTP generate extension's ``generate_stream`` (:func:`_http_server_events`, SSE); the asyncio
gRPC transport reads them from a stream of its shared channel with the same helpers.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from typing import Any, Optional

import numpy as np

from serving import tensors
from serving.client.errors import _tritonclient_error, error_from_message
from serving.client.request import _new_correlation_id, _Request
from serving.generation import (
    Generation,
    GptpipeError,
    InvalidParameterError,
    ServerUnavailableError,
    TokenEvent,
)

logger = logging.getLogger(__name__)


def _generate_inputs(generation: Generation, request: _Request) -> dict[str, np.ndarray]:
    """The `generate` model's inputs for one prompt (names and dtypes from the table). The
    `generate` model streams no alternatives: top_logprobs needs the client-side loop."""
    if generation.top_logprobs:
        raise InvalidParameterError("top_logprobs needs mode='client': the generate model (mode='server') "
                                    "returns only the chosen tokens' log-probs")
    p = request.params
    values: dict[str, Any] = {
        "input_ids": np.asarray(generation.prompt_ids, dtype=np.int64),
        "max_tokens": [request.max_new_tokens],
        "temperature": [p.temperature],
        "top_k": [p.top_k],
        "top_p": [p.top_p],
        "repetition_penalty": [p.repetition_penalty],
        "presence_penalty": [p.presence_penalty],
        "frequency_penalty": [p.frequency_penalty],
        "random_seed": [generation.seed],  # resolved: the client knows the seed it used
        "stream": [True],  # one response per token: timings and streaming for every call
        "return_log_probs": [request.return_logprobs],
        # the client's eos (a local generation config may differ from the server's)
        "end_id": [-1 if generation.eos_token_id is None else generation.eos_token_id],
    }
    if request.stop:
        values["stop_words"] = [s.encode("utf-8") for s in request.stop]
    if generation.min_tokens:
        values["min_tokens"] = [generation.min_tokens]
    if generation.stop_token_ids:
        values["stop_token_ids"] = list(generation.stop_token_ids)
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


def _grpc_infer_inputs(inputs: dict[str, np.ndarray]) -> list[Any]:
    """The `generate` model's inputs as tritonclient.grpc InferInputs (datatypes from the table)."""
    import tritonclient.grpc as grpcclient

    infer_inputs = []
    for name, array in inputs.items():
        spec = next(s for s in tensors.GENERATE_INPUTS if s.name == name)
        infer_input = grpcclient.InferInput(name, list(array.shape), spec.datatype)
        infer_input.set_data_from_numpy(array)
        infer_inputs.append(infer_input)
    return infer_inputs


class _GrpcStream:
    """One tritonclient gRPC stream (``start_stream``) and its results, queued with their arrival
    times. ``close()`` cancels what is still running on it unless ``ended`` was set (the
    request's last response came): the server stops that request."""

    def __init__(self, url: str, what: str) -> None:
        import tritonclient.grpc as grpcclient

        self.url, self.what = url, what
        self.responses: queue.Queue = queue.Queue()
        self.ended = False
        self.client = grpcclient.InferenceServerClient(url)
        try:
            self.client.start_stream(
                callback=lambda result, error: self.responses.put((result, error, time.perf_counter())))
        except BaseException:
            self.client.close()
            raise

    def send(self, model: str, inputs: list[Any], **kwargs: Any) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self.client.async_stream_infer(model, inputs, enable_empty_final_response=True, **kwargs)
        except InferenceServerException as e:
            # the stream failed before the request was written ("no longer in valid state"):
            # the reason (failed to connect, ...) went to the callback
            raise _stream_failed(self.responses, e, self.url) from None

    def next(self, timeout: float) -> tuple[Any, float]:
        return _next_response(self.responses, self.url, timeout)

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=not self.ended)
        except Exception as e:  # noqa: BLE001
            logger.debug("closing the %s stream failed: %s", self.what, e)
        self.client.close()


def _grpc_server_events(url: str, model: str, inputs: dict[str, np.ndarray], timeout: float) -> Iterator[TokenEvent]:
    """Events of one `generate` request over its own gRPC stream; closed early, the stream
    cancels the request (the server stops and ENDs it)."""
    stream = _GrpcStream(url, "generate")
    try:
        sent = time.perf_counter()
        stream.send(model, _grpc_infer_inputs(inputs), request_id=str(_new_correlation_id()))
        while True:
            result, arrived = stream.next(timeout)
            event = _event_from_outputs(_outputs_of(result), arrived - sent)
            sent = arrived
            if event is not None:
                if event.finish_reason is not None:
                    stream.ended = True
                yield event
            if _is_final(result):
                if not stream.ended:
                    raise _cut_short(url, "grpc")
                return
    finally:
        stream.close()


def _next_response(responses: queue.Queue, url: str, timeout: float) -> tuple[Any, float]:
    """The next result of a tritonclient stream and when it arrived, waited for at most `timeout`
    seconds; a stream error is raised as the client's typed error."""
    try:
        result, error, arrived = responses.get(timeout=timeout)
    except queue.Empty:
        raise ServerUnavailableError(f"no answer from the Triton server at {url} (grpc) "
                                     f"within {timeout} s") from None
    if error is not None:
        raise _tritonclient_error(error, url, "grpc")
    return result, arrived


def _is_final(result: Any) -> bool:
    """Whether a decoupled stream's result carries Triton's final-response flag."""
    final = result.get_response().parameters.get("triton_final_response")
    return final is not None and final.bool_param


def _stream_failed(responses: queue.Queue, e: Exception, url: str) -> Exception:
    """The error of a tritonclient stream that broke before its request was written: the one its
    callback got (briefly waited for), else the server counts as unavailable."""
    try:
        _, error, _ = responses.get(timeout=1.0)
    except queue.Empty:
        error = None
    if error is not None:
        return _tritonclient_error(error, url, "grpc")
    return ServerUnavailableError(f"the stream to the Triton server at {url} (grpc) broke before the request "
                                  f"was sent: {e}")


def _http_server_events(url: str, model: str, inputs: dict[str, np.ndarray], timeout: float) -> Iterator[TokenEvent]:
    """Events of one request through the HTTP generate extension (generate_stream, SSE)."""
    body = {name: (array.tolist() if name in ("input_ids", "stop_words", "stop_token_ids")
                   else array.reshape(-1)[0].item())
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
    raise _cut_short(url, "http")


def _cut_short(url: str, protocol: str) -> ServerUnavailableError:
    """A `generate` stream that ended without a finish reason: the server went away (an error,
    a refusal or a shutdown comes as an error message instead)."""
    return ServerUnavailableError(f"the generate stream from the Triton server at {url} ({protocol}) ended "
                                  "without a finish reason: the server went away")


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
