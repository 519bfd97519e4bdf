"""The server's per-step hot path: what the `gpt` model runs for each engine call — gather the
queued steps, run them through the scheduler (one `runtime.step` per call), answer every request.

Triton-free: serving/templates/gpt/1/model.py (the thin Triton adapter) reads the tensors of a
request, and passes in how a request is answered (`Answer`), sent and counted (`MakeMetric`).

Two flavours, chosen by the config's transaction policy:

* plain (`export-model --no-inflight-batching`): `execute` runs the steps it is given
  (`StepEngine.run`) and returns their responses. Steps that arrive while it runs form the next
  batch, so concurrent streams settle into groups that take turns on the engine (Triton's
  batching window counts from the oldest queued step, which has waited a whole engine call
  already, and so never merges them).
* decoupled, "in-flight batching" (the default; as TensorRT-LLM's batch manager): `execute`
  queues each step with its response sender and returns; one thread runs `StepEngine.serve`.
  Before each call it waits, up to `max_step_wait_microseconds`, for every sequence of the
  previous call that is still active to send its next step, so N concurrent streams step
  together in one call. Clients reach a decoupled model over a gRPC stream. A step may ask to
  keep its request open as the sequence's lease (serving/engine/leases.py): a dead client's
  slot is then freed as soon as Triton reports its stream gone.

`StepEngine.watch` (a thread in either flavour) frees dead clients' and idle sequences' slots
and refreshes the pool gauges without waiting for traffic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from serving.engine.generations import CancelStep, EngineGeneration, GenerateStep, first_step
from serving.engine.kv_cache import KVPool
from serving.engine.leases import WATCH_INTERVAL_S, Leases
from serving.engine.loader import load_runtime
from serving.engine.prefix_cache import PrefixCache
from serving.engine.scheduler import BUSY_PREFIX, Scheduler, StepQueue, StepRequest
from serving.sampling import greedy_token

logger = logging.getLogger(__name__)

# A parsed request: the step (or an engine-side generation's start or cancel: see
# serving/engine/generations.py), or the message of why the request cannot be one.
Step = Union[StepRequest, GenerateStep, CancelStep, str]
# (request, logits (V,) or None, error or None) -> the response for that request
Answer = Callable[[Any, Optional[np.ndarray], Optional[str]], Any]
# (kind "gauge" | "counter", name, description) -> a metric with set() / increment()
MakeMetric = Callable[[str, str, str], Any]

def is_busy(error: str) -> bool:
    """The error is the full-pool refusal (Triton's UNAVAILABLE, not INVALID_ARG)."""
    return error.startswith(BUSY_PREFIX)


def parse_step(input_ids: np.ndarray, *, sequence_id: int, start: bool, end: bool) -> Step:
    """A StepRequest from a request's tensors, or an error message for one that cannot be one."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        return f"input_ids must have shape [1, tokens] (one sequence per request), got {list(input_ids.shape)}"
    return StepRequest(sequence_id=int(sequence_id), tokens=input_ids[0].astype(np.int64, copy=False),
                       start=bool(start), end=bool(end))


@dataclass(frozen=True)
class EngineConfig:
    """What the `gpt` model's config.pbtxt says about its engine, parsed once."""

    engine_path: Path
    model_config: Mapping[str, Any]
    max_sequences: int
    intra_op_threads: Optional[int]
    spinning: bool
    idle_timeout_s: float
    max_step_wait_s: float
    prefix_cache: bool = True  # reuse the KV of cached prompt prefixes (serving/engine/prefix_cache.py)
    max_num_batched_tokens: int = 0  # prompt tokens per engine call (chunked prefill); 0: whole prompts

    @classmethod
    def from_triton(cls, config: Mapping[str, Any], version_dir: Path) -> EngineConfig:
        """From Triton's model config (args["model_config"], parsed) and the version folder."""
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds") or 1_000_000)
        return cls(
            engine_path=Path(version_dir) / params["engine_file"],
            model_config=json.loads(params["model_config"]),
            max_sequences=int(params["max_sequences"]),
            intra_op_threads=int(params.get("intra_op_threads") or 0) or None,
            spinning=params.get("intra_op_spinning", "1") == "1",  # ORT's default, and ours
            idle_timeout_s=idle_us / 1e6,
            max_step_wait_s=int(params.get("max_step_wait_microseconds") or 0) / 1e6,
            prefix_cache=params.get("prefix_cache", "1") == "1",
            max_num_batched_tokens=int(params.get("max_num_batched_tokens") or 0),
        )


class StepMetrics:
    """The pool's use and the engine's calls, as custom metrics on Triton's metrics port; brought
    up to date from the scheduler's stats after every engine call."""

    def __init__(self, make: MakeMetric, *, free_slots: int) -> None:
        self._active = make("gauge", "gptpipe_kv_active_sequences", "Sequences holding a KV-pool slot")
        self._free = make("gauge", "gptpipe_kv_free_slots", "Free KV-pool slots")
        self._max_rows = make("gauge", "gptpipe_max_rows_per_call", "Most real rows in one runtime call")
        self._requests = make("counter", "gptpipe_step_requests_total", "Step requests received")
        self._counters = {  # counter -> the scheduler stat it follows
            "runtime_calls": make("counter", "gptpipe_runtime_calls_total", "Runtime (ONNX Runtime) calls"),
            "batched_rows": make("counter", "gptpipe_batched_rows_total", "Rows run in multi-row decode calls"),
            "busy_rejections": make("counter", "gptpipe_busy_rejections_total", "STARTs refused: pool full"),
            "sequences_idled_out": make("counter", "gptpipe_idled_out_total", "Sequences freed by the idle timeout"),
            "prefill_chunks": make("counter", "gptpipe_prefill_chunks_total",
                                   "Prompt chunks run with more of their prompt left (chunked prefill)"),
            "mixed_calls": make("counter", "gptpipe_mixed_calls_total",
                                "Runtime calls that ran decode steps and a prompt chunk together"),
        }
        self._prefix = {  # counter -> the prefix cache stat it follows
            "queries": make("counter", "gptpipe_prefix_cache_queries_total", "Prompts looked up in the prefix cache"),
            "hits": make("counter", "gptpipe_prefix_cache_hits_total", "Prompts that reused cached prefix blocks"),
            "query_tokens": make("counter", "gptpipe_prefix_cache_query_tokens_total",
                                 "Prompt tokens looked up in the prefix cache"),
            "hit_tokens": make("counter", "gptpipe_prefix_cache_hit_tokens_total",
                               "Prompt tokens whose KV came from the prefix cache"),
        }
        self._last = dict.fromkeys([*self._counters, *self._prefix], 0)
        self._gauges: dict[Any, float] = {}  # gauge -> the value last set
        self._set(self._free, free_slots)

    def _set(self, gauge: Any, value: float) -> None:
        """Set a gauge only when its value changed: each set is an IPC round trip to tritonserver,
        and in steady decoding the pool's gauges stay the same call after call."""
        if self._gauges.get(gauge) != value:
            gauge.set(value)
            self._gauges[gauge] = value

    def update(self, scheduler: Scheduler, n_requests: int) -> None:
        s = scheduler.stats
        self._set(self._active, scheduler.active)
        self._set(self._free, scheduler.free_slots)
        self._set(self._max_rows, s.max_rows_in_call)
        if n_requests:  # an iteration that only ran prompt chunks received none
            self._requests.increment(n_requests)
        follow = [(key, metric, s) for key, metric in self._counters.items()]
        if scheduler.prefix_cache is not None:
            follow += [(key, metric, scheduler.prefix_cache.stats) for key, metric in self._prefix.items()]
        for key, metric, stats in follow:
            now = getattr(stats, key)
            if now > self._last[key]:
                metric.increment(now - self._last[key])
            self._last[key] = now


class StepEngine:
    """One runtime, one preallocated KV pool, one scheduler; `run` is one engine call's steps."""

    def __init__(self, config: EngineConfig, *, answer: Answer, make_metric: MakeMetric) -> None:
        c = config.model_config
        self.config, self.answer = config, answer
        # spinning stops when a step returns: between steps the cores are Triton's and the clients'
        self.runtime = load_runtime(config.engine_path, intra_op_threads=config.intra_op_threads,
                                    spinning=config.spinning, stop_spinning_after_run=True)
        self.pool = KVPool(
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            head_dim=c["n_embd"] // c["n_head"],
            max_sequences=config.max_sequences,
            max_length=c["n_positions"],
            dtype=self.runtime.kv_dtype,
        )
        # the prefix cache copies pool rows: the in-place (static) pool only
        cache = PrefixCache(self.pool) if config.prefix_cache and self.runtime.kv_cache == "static" else None
        self.scheduler = Scheduler(self.runtime, self.pool, vocab_size=c["vocab_size"],
                                   idle_timeout_s=config.idle_timeout_s, prefix_cache=cache,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.metrics = StepMetrics(make_metric, free_slots=self.pool.max_sequences)
        self.lock = threading.RLock()  # the scheduler, the leases, the metrics: engine thread vs watcher
        self.leases: Optional[Leases] = None  # set by a decoupled adapter
        # engine-side generations (decoupled only), by sequence id, and their next steps
        self.generations: dict[int, EngineGeneration] = {}
        self._own: list[StepRequest] = []
        # set by the adapter: (request, token or None, error or None) -> a generation's response;
        # whether a generation's sender is cancelled; why generations must stop now (shutdown)
        self.answer_token: Callable[[Any, Optional[int], Optional[str]], Any] = lambda r, t, e: (r, t, e)
        self.cancelled: Callable[[Any], bool] = lambda sender: False
        self.refusal: Callable[[], Optional[str]] = lambda: None

    def watch(self, stop: threading.Event, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Until ``stop``: free the slots of dead clients (leases) and idle sequences, and bring
        the gauges up to date, every ``interval_s``."""
        while not stop.wait(interval_s):
            try:
                with self.lock:
                    if self.leases is not None:
                        self.leases.sweep(self.scheduler)
                    for g in list(self.generations.values()):
                        if not g.cancelled and self.cancelled(g.sender):
                            logger.info("the caller of generation %d went away; stopping it", g.sequence_id)
                            g.cancelled = True
                    self.scheduler.free_idle()
                    self.metrics.update(self.scheduler, 0)
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                logger.exception("gpt watcher failed")

    def run(self, requests: Sequence[Any], steps: Sequence[Step]) -> list[Any]:
        """Run one batch of requests, parsed into steps (or error messages); their responses,
        in order."""
        steps = [s if isinstance(s, (StepRequest, str)) else
                 "gptpipe_generate and gptpipe_cancel need the in-flight (decoupled) gpt model" for s in steps]
        with self.lock:
            valid = [s for s in steps if not isinstance(s, str)]
            results = iter(self.scheduler.step(valid))
            responses = []
            for request, step in zip(requests, steps):
                if isinstance(step, str):
                    responses.append(self.answer(request, None, step))
                else:
                    result = next(results)
                    responses.append(self.answer(request, result.logits, result.error))
            self.metrics.update(self.scheduler, len(requests))
            return responses

    def serve(self, queue: StepQueue, *, send: Callable[[Any, Any, bool], None],
              failed: Callable[[Any, Exception], Any]) -> None:
        """The in-flight batching thread: until the queue closes, gather the next batch of
        (request, step, sender, wants a lease), run one scheduler iteration (the decode steps,
        prompt chunks up to the token budget) and send each finished step's response
        (`send(sender, response, final)`; `failed(request, e)`: the response when answering
        raised). A prompt with chunks left is answered in a later iteration; meanwhile the loop
        does not block for new steps. A step that wants a lease, leaves its sequence active and
        is not END is answered with final=False and its sender held until the sequence's next
        step (see serving/engine/leases.py)."""
        cohort: set[int] = set()  # sequences answered last iteration and still active: worth waiting for
        while True:
            batch, _ = queue.gather(cohort, block=not (self.scheduler.prefilling or self._own))
            if not batch and queue.closed and not self._own:
                self._stop_generations("the gpt model is shutting down", send)
                return
            with self.lock:
                received = len(batch)
                batch = self._take_generation_steps(batch, send)
                for _, step, _, _ in batch:  # the previous step of each sequence is answered: complete it
                    if self.leases is not None and not isinstance(step, str):
                        self.leases.end(step.sequence_id)
                valid = [item for item in batch if not isinstance(item[1], str)]
                # (request, sender, wants a lease, step, logits, error: a message or what raised)
                answers = [(request, sender, lease, step, None, step) for request, step, sender, lease in batch
                           if isinstance(step, str)]
                own = self._own_steps(send)
                try:
                    done = self.scheduler.advance([step for _, step, _, _ in valid] + [s for _, s in own],
                                                  [(request, sender, lease, step) for request, step, sender, lease in valid]
                                                  + [g for g, _ in own])
                    for tag, r in done:
                        if isinstance(tag, EngineGeneration):
                            self._advance_generation(tag, r.logits, r.error, send, failed)
                        else:
                            answers.append((*tag, r.logits, r.error))
                except Exception as e:  # noqa: BLE001 - the thread must keep serving
                    logger.exception("gpt step failed")
                    answers += [(request, sender, lease, step, None, e) for request, step, sender, lease in valid]
                    for g, _ in own:
                        self._advance_generation(g, None, e, send, failed)
                try:
                    self.metrics.update(self.scheduler, received)
                except Exception:  # noqa: BLE001 - the numbers are extra; the steps must be answered
                    logger.exception("could not update the gpt metrics")
                active = self.scheduler.sequence_ids()
                cohort = set()
                for request, sender, lease, step, logits, error in answers:
                    try:
                        if isinstance(error, Exception):
                            response = failed(request, error)
                        else:
                            response = self.answer(request, logits, error)
                            if error is None and not isinstance(step, str):
                                cohort.add(step.sequence_id)
                    except Exception as e:  # noqa: BLE001 - e.g. the engine's logits were NaN
                        logger.exception("could not answer a gpt step")
                        response = failed(request, e)
                    keep = (lease and self.leases is not None and not isinstance(step, str) and not step.end
                            and step.sequence_id in active and not isinstance(error, Exception))
                    try:
                        send(sender, response, not keep)
                    except Exception:  # noqa: BLE001 - e.g. the client went away
                        logger.exception("could not send a gpt response")
                        keep = False
                    if keep:
                        self.leases.hold(step.sequence_id, sender)  # type: ignore[union-attr]
                cohort &= active

    # ------------------------------------------------------------------ engine-side generations

    def _take_generation_steps(self, batch: list, send: Callable[[Any, Any, bool], None]) -> list:
        """Register the batch's new generations (their first step stays in the batch, as a
        StepRequest), answer its cancels, refuse client steps of a generating sequence."""
        out = []
        for request, step, sender, lease in batch:
            if isinstance(step, CancelStep):
                g = self.generations.get(step.target)
                if g is not None:
                    g.cancelled = True
                self._send(send, sender, self.answer_token(request, None, None), True)
                continue
            if not isinstance(step, str) and step.sequence_id in self.generations:
                step = f"sequence {step.sequence_id} is generating in the engine: it takes no steps"
            elif isinstance(step, GenerateStep):
                g = EngineGeneration(step.sequence_id, step.generation, request, sender)
                self.generations[g.sequence_id] = g
                self._own.append(first_step(g.sequence_id, g.generation))
                continue
            out.append((request, step, sender, lease))
        return out

    def _own_steps(self, send: Callable[[Any, Any, bool], None]) -> list[tuple[EngineGeneration, StepRequest]]:
        """This iteration's steps of the running generations; cancelled ones end here."""
        own, self._own = self._own, []
        out = []
        for step in own:
            g = self.generations.get(step.sequence_id)
            if g is None:
                continue
            if g.cancelled:
                self._end_generation(g)
                self._send(send, g.sender, self.answer_token(g.request, None, None), True)
                continue
            out.append((g, step))
        return out

    def _advance_generation(self, g: EngineGeneration, logits: Optional[np.ndarray], error: Any,
                            send: Callable[[Any, Any, bool], None], failed: Callable[[Any, Exception], Any]) -> None:
        """Sample a generation's next token from its step's logits, answer it, queue its next step."""
        if self.generations.get(g.sequence_id) is not g:
            return  # it ended already (a prompt dropped with its slot answers late)
        nxt = None
        try:
            if isinstance(error, Exception):
                response = failed(g.request, error)
            else:
                error = error or (self.refusal() if not g.cancelled else None)
                if error is None and not g.cancelled:
                    gen = g.generation
                    # greedy, nothing else of the logits used: the float32 row's argmax, without
                    # the sampler's float64 copy and pass (greedy_token: the same token and errors)
                    output = np.array([greedy_token(logits)]) if gen.argmax_only else logits
                    event, nxt = gen.advance(output, sent_at=g.sent_at)
                    g.sent_at = time.perf_counter()
                    response = self.answer_token(g.request, event.token_id, None)
                else:
                    response = self.answer_token(g.request, None, error)
        except Exception as e:  # noqa: BLE001 - e.g. NaN logits: this generation fails, the engine serves on
            logger.exception("could not advance generation %d", g.sequence_id)
            response, nxt = failed(g.request, e), None
        final = nxt is None
        if not self._send(send, g.sender, response, final) and not final:
            final = True  # its caller is gone
        if final:
            self._end_generation(g)
        else:
            self._own.append(StepRequest(g.sequence_id, np.array(nxt.tokens, dtype=np.int64), end=nxt.end))

    def _end_generation(self, g: EngineGeneration) -> None:
        self.generations.pop(g.sequence_id, None)
        self.scheduler.finish(g.sequence_id)  # no-op when its last step carried END

    def _stop_generations(self, error: str, send: Callable[[Any, Any, bool], None]) -> None:
        with self.lock:
            for g in list(self.generations.values()):
                self._end_generation(g)
                self._send(send, g.sender, self.answer_token(g.request, None, error), True)

    @staticmethod
    def _send(send: Callable[[Any, Any, bool], None], sender: Any, response: Any, final: bool) -> bool:
        try:
            send(sender, response, final)
            return True
        except Exception:  # noqa: BLE001 - e.g. the caller went away
            logger.exception("could not send a gpt response")
            return False
