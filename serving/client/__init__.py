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

The modules, in the order a call goes through them (each imports only those above it):

* ``errors``: server messages and transport failures as gptpipe exceptions;
* ``request``: a generate() call's arguments checked before any network call, the defaults,
  GenerationConfig (what the client knows of the model besides the tokenizer);
* ``loop_thread``: the event-loop thread the blocking client runs its gRPC streams on;
* ``step``: the per-token hot path (send one step, read its answer, hand it to the sampler);
* ``server_mode``: the `generate` model's inputs and its per-token responses as events;
* ``transport_async_grpc``, ``transport_grpc`` (its streams go through the asyncio one),
  ``transport_http``, ``transport_async_http``: connections, the step model's config, the
  tokenizer files, server-mode streams;
* ``streams``: the iterators of text deltas that ``stream=True`` returns;
* ``routing``: which replica serves a sequence (rendezvous hashing, DNS, health);
* ``failover``: several endpoints: a transport each, a replica per sequence, re-prefill on
  another replica when one fails;
* ``base``, ``sync_client``, ``async_client``: :class:`Client` and :class:`AsyncClient`.

Several Triton replicas: ``Client(["host-a:8001", "host-b:8001"])``, ``Client("a:8001,b:8001")``
or a name that resolves to several addresses (a Kubernetes headless Service); see
``serving.client.failover``.
"""

from __future__ import annotations

from serving.client.async_client import AsyncClient
from serving.client.request import (
    DEFAULT_QUEUE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URLS,
    GenerationConfig,
    Mode,
    Protocol_,
)
from serving.client.step import RELEASE_TIMEOUT_S
from serving.client.streams import AsyncTextStreamIterator, TextStreamIterator
from serving.client.sync_client import Client
from serving.generation import GenerationResult, Timings
from serving.generation import (  # the errors every client call may raise
    GptpipeError, InvalidParameterError, PromptTooLongError, ServerBusyError, ServerError, ServerUnavailableError,
)

__all__ = [
    "Client", "AsyncClient", "GenerationResult", "Timings", "TextStreamIterator",
    "GptpipeError", "InvalidParameterError", "PromptTooLongError", "ServerBusyError",
    "ServerUnavailableError", "ServerError", "GenerationConfig",
]
