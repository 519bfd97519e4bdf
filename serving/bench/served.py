"""Served requests: the benchmark's generator over `serving.client`, the served model, a local server.

`ServedGenerator` sends token ids and takes a fixed number of new tokens, stamped on arrival;
`read_repository` reads what the benchmark needs of a model repository (`ServedModel`);
`local_server` starts a tritonserver on free ports and stops it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from serving.bench.stats import RequestTiming


Mode = Literal["client", "server", "engine"]
MODES: tuple[str, ...] = ("client", "server", "engine")


class ServedGenerator:
    """One connection to the server (one `serving.client.Client`), generating from token ids:
    exactly `max_tokens` new tokens, greedy, eos ignored, each token stamped on arrival.

    mode "client": the client-side loop (`serving.generation.generate_tokens` over the client's
    gRPC step transport into the stateful `gpt` model); mode "server": the streaming `generate`
    model over a gRPC stream, with end_id = -1; mode "engine": the in-flight `gpt`'s engine-side
    loop called directly over a gRPC stream (serving/client/engine_mode.py), eos off.

    The public `Client.generate` takes text and stops at eos; a benchmark needs fixed-length
    prompts of token ids and a fixed number of new tokens whatever the model says, so this
    drives the client's own transports (its private helpers) with the ids directly.
    """

    def __init__(self, url: str, *, mode: Mode = "client", timeout_s: float = 120.0) -> None:
        from serving.client import Client

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.client = Client(url, protocol="grpc", timeout_s=timeout_s)
        self.config = self.client.generation_config  # asks the server's tokenizer model

    def __call__(self, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        times: list[float] = []
        tokens: list[int] = []
        events = self._events(prompt, max_tokens)
        sent = time.perf_counter()  # the generators send their first request on the first next()
        try:
            for event in events:
                times.append(time.perf_counter())
                tokens.append(int(event.token_id))
        finally:
            events.close()
        if len(tokens) != max_tokens:
            raise RuntimeError(f"the server returned {len(tokens)} tokens, {max_tokens} were asked for")
        return RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=len(prompt), tokens=tuple(tokens))

    def _events(self, prompt: Sequence[int], max_tokens: int) -> Any:
        from serving.client.request import _validate
        from serving.client.server_mode import _generate_inputs, _grpc_server_events
        from serving.generation import Generation, generate_tokens, make_sampling_params

        generation = Generation(
            list(prompt), max_new_tokens=max_tokens, params=make_sampling_params(temperature=0.0, seed=0),
            n_positions=self.config.n_positions, vocab_size=self.config.vocab_size, eos_token_id=None)
        if self.mode == "client":
            return generate_tokens(self.client._client_step(generation), generation)
        if self.mode == "engine":
            from serving.client.engine_mode import _grpc_engine_events

            return _grpc_engine_events(self.client.url, generation, self.client.timeout_s)
        request = _validate("-", max_new_tokens=max_tokens, temperature=0.0, top_k=0, top_p=1.0,
                            repetition_penalty=1.0, stop=(), seed=0, stream=True, mode="server",
                            return_logprobs=False)
        inputs = _generate_inputs(generation, request)
        inputs["end_id"] = np.asarray([-1], dtype=np.int64)  # never stop early (generate's integers are INT64)
        return _grpc_server_events(self.client.url, self.client.generate_model, inputs, self.client.timeout_s)

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class ServedModel:
    """What the benchmark needs to know of a model repository."""

    repository: Path
    config: dict[str, Any]  # the GPTConfig as a dict
    engine: Path  # gpt/1/<engine file>
    max_sequences: int
    threads: int  # the gpt model's ONNX Runtime intra-op threads (0 in the config: physical cores)
    manifest: dict[str, Any] = field(default_factory=dict)
    inflight_batching: bool = False  # `gpt` is decoupled: steps go over gRPC streams

    @property
    def name(self) -> str:
        return str(self.manifest.get("source") or self.manifest.get("model") or self.repository.name)

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision") or "?")

    @property
    def weight_bytes(self) -> int:
        """Bytes of the engine file(s): the graph and its external weights, if any."""
        files = [p for p in self.engine.parent.iterdir() if p.is_file() and p.name.startswith(self.engine.name)]
        return sum(p.stat().st_size for p in files)

    @property
    def kv_pool_bytes(self) -> int:
        """The gpt model's preallocated KV pool at full size (fp32 for fp32 and int8 graphs)."""
        c = self.config
        itemsize = 2 if self.precision == "fp16" else 4
        return 2 * c["n_layer"] * self.max_sequences * c["n_positions"] * c["n_embd"] * itemsize


def read_repository(repository: Path | str) -> ServedModel:
    """The served model's config, engine and deploy-time values, from its config.pbtxt."""
    from serving import tensors
    from serving.repository import validate_repository
    from serving.engine.runtime import physical_cores

    repository = Path(repository)
    configs = validate_repository(repository)
    params = {k: v.string_value for k, v in configs[tensors.GPT_MODEL].parameters.items()}
    threads = int(params.get("intra_op_threads") or 0) or physical_cores()
    manifest: dict[str, Any] = {}
    for candidate in (repository / "manifest.json", repository.parent / "manifest.json"):
        if candidate.is_file():
            manifest = json.loads(candidate.read_text())
            break
    return ServedModel(
        repository=repository,
        config=json.loads(params["model_config"]),
        engine=repository / tensors.GPT_MODEL / "1" / params["engine_file"],
        max_sequences=int(params["max_sequences"]),
        threads=threads,
        manifest=manifest,
        inflight_batching=configs[tensors.GPT_MODEL].model_transaction_policy.decoupled,
    )


def new_local_server(repository: Path, *, log_file: Optional[Path] = None) -> Any:
    """A TritonServer on free localhost ports, not started yet."""
    from serving.server import TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    return TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log_file)


@contextmanager
def local_server(repository: Path, *, log_file: Optional[Path] = None) -> Iterator[Any]:
    """A TritonServer on free ports, started and ready; stopped on exit."""
    server = new_local_server(repository, log_file=log_file)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
