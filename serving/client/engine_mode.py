"""Engine mode: one generation run by the in-flight `gpt` model's engine (serving/engine/generations.py),
read from a gRPC stream of its own: token ids in, token ids out, no `generate` model in between.

The caller's Generation keeps the text, the stop strings and the finish (``Generation.accept``);
closing the stream cancels the request, which stops the engine's loop (its watcher sees it).
The benchmark's ``--mode engine`` runs on it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator

import numpy as np

from serving import tensors
from serving.client.request import _new_correlation_id
from serving.client.server_mode import _cut_short, _is_final, _next_response, _stream_failed
from serving.engine.generations import generation_spec
from serving.generation import Generation, TokenEvent

logger = logging.getLogger(__name__)


def _grpc_engine_events(url: str, generation: Generation, timeout: float) -> Iterator[TokenEvent]:
    """Events of one engine-side generation (a START+END `gpt` request with the
    gptpipe_generate parameter) over its own tritonclient gRPC stream."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    if generation.return_logprobs:
        raise ValueError("the engine-side loop answers token ids only: log-probs need mode='client'")
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    ended = False  # the engine's stream is over (its FINAL response came)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        ids = grpcclient.InferInput(tensors.INPUT_IDS, [1, len(generation.prompt_ids)], "INT64")
        ids.set_data_from_numpy(np.asarray([generation.prompt_ids], dtype=np.int64))
        sent = time.perf_counter()
        try:
            client.async_stream_infer(tensors.GPT_MODEL, [ids], outputs=[grpcclient.InferRequestedOutput(tensors.OUTPUT_IDS)],
                                      sequence_id=_new_correlation_id(), sequence_start=True, sequence_end=True,
                                      parameters={tensors.GENERATE_PARAMETER: generation_spec(generation)},
                                      enable_empty_final_response=True)
        except InferenceServerException as e:
            raise _stream_failed(responses, e, url) from None
        while True:
            result, arrived = _next_response(responses, url, timeout)
            ended = _is_final(result)
            token = result.as_numpy(tensors.OUTPUT_IDS)
            if token is not None:
                event, _ = generation.accept(int(token.reshape(-1)[0]), sent_at=sent)
                sent = arrived
                yield event
                if event.finish_reason is not None:
                    return
            if ended:
                raise _cut_short(url, "grpc")
    finally:
        try:
            client.stop_stream(cancel_requests=not ended)  # cancelled: the engine stops the generation
        except Exception as e:  # noqa: BLE001
            logger.debug("closing the engine stream failed: %s", e)
        client.close()
