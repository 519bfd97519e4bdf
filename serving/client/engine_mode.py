"""Engine mode: one generation run by the in-flight `gpt` model's engine (serving/engine/generations.py),
read from a gRPC stream of its own: token ids in, token ids out, no `generate` model in between.

The caller's Generation keeps the text, the stop strings and the finish (``Generation.accept``);
closing the stream cancels the request, which stops the engine's loop (its watcher sees it).
The benchmark's ``--mode engine`` runs on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from serving import tensors
from serving.client.request import _new_correlation_id
from serving.client.server_mode import _cut_short, _GrpcStream, _is_final
from serving.engine.generations import generation_spec
from serving.generation import Generation, TokenEvent


def _grpc_engine_events(url: str, generation: Generation, timeout: float) -> Iterator[TokenEvent]:
    """Events of one engine-side generation (a START+END `gpt` request with the
    gptpipe_generate parameter) over its own tritonclient gRPC stream."""
    import tritonclient.grpc as grpcclient

    if generation.return_logprobs:
        raise ValueError("the engine-side loop answers token ids only: log-probs need mode='client'")
    stream = _GrpcStream(url, "engine")
    try:
        ids = grpcclient.InferInput(tensors.INPUT_IDS, [1, len(generation.prompt_ids)], "INT64")
        ids.set_data_from_numpy(np.asarray([generation.prompt_ids], dtype=np.int64))
        sent = time.perf_counter()
        stream.send(tensors.GPT_MODEL, [ids], outputs=[grpcclient.InferRequestedOutput(tensors.OUTPUT_IDS)],
                    sequence_id=_new_correlation_id(), sequence_start=True, sequence_end=True,
                    parameters={tensors.GENERATE_PARAMETER: generation_spec(generation)})
        while True:
            result, arrived = stream.next(timeout)
            stream.ended = _is_final(result)  # the engine's stream is over (its FINAL response came)
            token = result.as_numpy(tensors.OUTPUT_IDS)
            if token is not None:
                event, _ = generation.accept(int(token.reshape(-1)[0]), sent_at=sent)
                sent = arrived
                yield event
                if event.finish_reason is not None:
                    return
            if stream.ended:
                raise _cut_short(url, "grpc")
    finally:
        stream.close()  # not ended: cancelled, and the engine stops the generation
