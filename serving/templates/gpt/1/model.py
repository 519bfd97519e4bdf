"""Triton python backend: the stateful `gpt` step model.

Triton's sequence batcher hands `execute` the steps of many sequences at once (START/END/CORRID
control inputs per request); the scheduler runs them through one ONNX Runtime engine and one
preallocated KV pool. The pool's use is exported as custom metrics on Triton's metrics port.

Two flavours, chosen by the config's transaction policy:

* plain (`export-model --no-inflight-batching`): `execute` runs the steps it is given and
  returns their responses. Steps that arrive while it runs form the next batch, so concurrent
  streams settle into groups that take turns on the engine (Triton's batching window counts
  from the oldest queued step, which has waited a whole engine call already, and so never
  merges them).
* decoupled, "in-flight batching" (the default; as TensorRT-LLM's batch manager): `execute`
  queues each step with its response sender and returns; one thread runs the engine. Before
  each call it waits, up to `max_step_wait_microseconds`, for every sequence of the previous
  call that is still active to send its next step, so N concurrent streams step together in one
  call. Clients reach a decoupled model over a gRPC stream (the gptpipe client does this itself).

A client's steps may carry the request parameter `gptpipe_lease` (the gptpipe client's stream
steps do): the step's response is then sent without the FINAL flag, and the request stays
open until the sequence's next step arrives, or for LEASE_HOLD_S at most. That open request is
the sequence's lease: when the client's stream dies (the process is killed, the connection
drops), Triton reports the request cancelled, and a watcher thread frees the sequence's KV slot
at once instead of at the idle timeout. The hold is bounded because Triton's shutdown waits for
open requests: a client that pauses longer than that between steps (and then dies) is reaped by
the idle timeout as before. The same thread reaps idle sequences and refreshes the pool gauges
without waiting for traffic.
"""

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from serving import tensors
from serving.errors import InvalidParameterError
from serving.kv_cache import KVPool
from serving.runtime import load_runtime
from serving.request_rules import check_known_fields
from serving.sampling import greedy_token
from serving.scheduler import Scheduler, StepQueue, StepRequest

logger = logging.getLogger("gptpipe.triton.gpt")

LEASE_PARAMETER = tensors.LEASE_PARAMETER  # a step that keeps its request open as the sequence's lease
WATCH_INTERVAL_S = 0.25  # how often dead clients' leases and idle sequences are looked for
LEASE_HOLD_S = 5.0  # the longest a lease stays open after its step's answer (shutdown waits for it)
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_config = json.loads(params["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(params.get("intra_op_threads") or 0) or None
        # spinning workers would take the cores Triton and the clients need between steps
        spinning = params.get("intra_op_spinning", "0") == "1"
        self.runtime = load_runtime(version_dir / params["engine_file"], intra_op_threads=threads, spinning=spinning)
        self.pool = KVPool(
            n_layer=model_config["n_layer"],
            n_head=model_config["n_head"],
            head_dim=model_config["n_embd"] // model_config["n_head"],
            max_sequences=int(params["max_sequences"]),
            max_length=model_config["n_positions"],
            dtype=self.runtime.kv_dtype,
        )
        idle_us = int(config["sequence_batching"].get("max_sequence_idle_microseconds") or 1_000_000)
        self.scheduler = Scheduler(self.runtime, self.pool, vocab_size=model_config["vocab_size"],
                                   idle_timeout_s=idle_us / 1e6)
        self._init_metrics(config["name"])
        self._lock = threading.Lock()  # the scheduler, the leases and the metrics
        self._leases = {}  # sequence id -> (the response sender of its open last step, when it was answered)
        self._stop = threading.Event()
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        if self.decoupled:
            self._queue = StepQueue(int(params.get("max_step_wait_microseconds") or 0) / 1e6)
            self._thread = threading.Thread(target=self._loop, name="gpt-inflight", daemon=True)
            self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="gpt-watch", daemon=True)
        self._watcher.start()
        logger.info("gpt: %d slots x %d positions, KV pool %.1f MiB%s", self.pool.max_sequences,
                    self.pool.max_length, self.pool.nbytes / 2**20,
                    f", in-flight batching (wait <= {self._queue.wait_s * 1e3:g} ms)" if self.decoupled else "")

    def execute(self, requests):
        parsed = [self._parse(request) for request in requests]
        steps = [step for step, _ in parsed]
        if not self.decoupled:
            with self._lock:
                return self._run(requests, steps)
        for request, (step, lease) in zip(requests, parsed):
            sequence_id = None if isinstance(step, str) else step.sequence_id
            self._queue.put(sequence_id, (request, step, request.get_response_sender(), lease))
        return None

    def finalize(self):
        self._stop.set()
        if self.decoupled:
            self._queue.close()
            self._thread.join(timeout=10)
        self._watcher.join(timeout=5)
        with self._lock:
            for sequence_id in list(self._leases):
                self._end_lease(sequence_id)

    # ------------------------------------------------------------------ leases and the watcher

    def _end_lease(self, sequence_id):
        """Complete the open request of a sequence's previous step (call with the lock held)."""
        sender, _ = self._leases.pop(sequence_id, (None, 0.0))
        if sender is not None:
            try:
                sender.send(flags=_FINAL)
            except Exception:  # noqa: BLE001 - the client may be gone already
                logger.debug("could not complete the lease of sequence %d", sequence_id)

    def _watch(self):
        """Free the slots of sequences whose client went away, reap idle ones, refresh the gauges."""
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                with self._lock:
                    expired = time.monotonic() - LEASE_HOLD_S
                    for sequence_id, (sender, answered) in list(self._leases.items()):
                        if sender.is_cancelled():
                            logger.info("the client of sequence %d went away; freeing its slot", sequence_id)
                            self.scheduler.release(sequence_id)
                            self._end_lease(sequence_id)
                        elif answered < expired:
                            self._end_lease(sequence_id)  # held long enough: let shutdown go ahead
                    self.scheduler.free_idle()
                    for sequence_id in set(self._leases) - self.scheduler.sequence_ids():
                        self._end_lease(sequence_id)  # idled out: nothing left to hold
                    self._update_metrics(0)
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                logger.exception("gpt watcher failed")
                time.sleep(WATCH_INTERVAL_S)

    # ------------------------------------------------------------------ in-flight batching

    def _loop(self):
        cohort = set()  # sequences of the last call that are still active: worth waiting for
        while True:
            batch, ids = self._queue.gather(cohort)
            if not batch:
                return
            requests, steps, senders, leases = zip(*batch)
            with self._lock:
                for step in steps:  # the previous step of each sequence is answered: complete it
                    if not isinstance(step, str):
                        self._end_lease(step.sequence_id)
                try:
                    responses = self._run(requests, steps)
                except Exception as e:  # noqa: BLE001 - the thread must keep serving
                    logger.exception("gpt step failed")
                    error = pb_utils.TritonError(f"gpt step failed: {e}")
                    responses = [pb_utils.InferenceResponse(error=error) for _ in requests]
                for step, sender, lease, response in zip(steps, senders, leases, responses):
                    keep = (lease and not isinstance(step, str) and not step.end and not response.has_error()
                            and step.sequence_id in self.scheduler.sequence_ids())
                    try:
                        sender.send(response, flags=0 if keep else _FINAL)
                    except Exception:  # noqa: BLE001 - e.g. the client went away
                        logger.exception("could not send a gpt response")
                        keep = False
                    if keep:
                        self._leases[step.sequence_id] = (sender, time.monotonic())
                cohort = self.scheduler.sequence_ids() & ids

    # ------------------------------------------------------------------ one batch

    def _run(self, requests, steps):
        """Run one batch of requests, parsed into steps (or error messages); their responses,
        in order."""
        valid = [s for s in steps if not isinstance(s, str)]
        results = iter(self.scheduler.step(valid))
        responses = []
        for request, step in zip(requests, steps):
            result = None if isinstance(step, str) else next(results)
            error = step if isinstance(step, str) else result.error
            outputs = None
            if error is None:
                try:
                    outputs = self._outputs(request, result.logits)
                except ValueError as e:  # the argmax of NaN logits: the engine's fault
                    error = f"engine error: {e}"
            if error is not None:
                code = (pb_utils.TritonError.UNAVAILABLE if error.startswith("server busy")
                        else pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error, code)))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        self._update_metrics(len(requests))
        return responses

    @staticmethod
    def _outputs(request, logits):
        """The outputs the request asked for (Triton lists all of them when it named none):
        the logits (1, V), and/or the greedy token (1, 1), which spares a greedy client the
        vocab_size floats per step."""
        outputs = []
        for name in request.requested_output_names():
            if name == tensors.LOGITS:
                outputs.append(pb_utils.Tensor(name, logits[None, :]))
            elif name == tensors.OUTPUT_IDS:
                outputs.append(pb_utils.Tensor(name, np.array([[greedy_token(logits)]], dtype=np.int64)))
        return outputs

    @staticmethod
    def _parse(request):
        """(a StepRequest or an error message for a request that cannot be one, whether the
        step keeps its request open as the sequence's lease)."""
        try:
            parameters = json.loads(request.parameters() or "{}")
            check_known_fields(parameters, (LEASE_PARAMETER,), where=f" of the {tensors.GPT_MODEL} request")
        except InvalidParameterError as e:
            return f"invalid parameter: {e}", False
        lease = parameters.get(LEASE_PARAMETER) is True

        def scalar(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy().reshape(-1)[0]

        ids = pb_utils.get_input_tensor_by_name(request, tensors.INPUT_IDS).as_numpy()
        if ids.ndim != 2 or ids.shape[0] != 1:
            return f"input_ids must have shape [1, tokens] (one sequence per request), got {list(ids.shape)}", False
        return StepRequest(
            sequence_id=int(scalar(tensors.CONTROL_CORRID)),
            tokens=ids[0].astype(np.int64, copy=False),
            start=bool(scalar(tensors.CONTROL_START)),
            end=bool(scalar(tensors.CONTROL_END)),
        ), lease

    def _init_metrics(self, model_name):
        labels = {"model": model_name}
        self._families = []  # a MetricFamily must outlive its Metric objects

        def metric(kind, name, doc):
            family = pb_utils.MetricFamily(name=name, description=doc, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels)

        def gauge(name, doc):
            return metric(pb_utils.MetricFamily.GAUGE, name, doc)

        def counter(name, doc):
            return metric(pb_utils.MetricFamily.COUNTER, name, doc)

        self._m_active = gauge("gptpipe_kv_active_sequences", "Sequences holding a KV-pool slot")
        self._m_free = gauge("gptpipe_kv_free_slots", "Free KV-pool slots")
        self._m_max_rows = gauge("gptpipe_max_rows_per_call", "Most real rows in one runtime call")
        self._m_requests = counter("gptpipe_step_requests_total", "Step requests received")
        self._m_calls = counter("gptpipe_runtime_calls_total", "Runtime (ONNX Runtime) calls")
        self._m_batched = counter("gptpipe_batched_rows_total", "Rows run in multi-row decode calls")
        self._m_busy = counter("gptpipe_busy_rejections_total", "STARTs refused: pool full")
        self._m_idle = counter("gptpipe_idled_out_total", "Sequences freed by the idle timeout")
        self._last = dict(calls=0, batched=0, busy=0, idle=0)
        self._m_free.set(self.pool.max_sequences)

    def _update_metrics(self, n_requests):
        s = self.scheduler.stats
        self._m_active.set(self.scheduler.active)
        self._m_free.set(self.scheduler.free_slots)
        self._m_max_rows.set(s.max_rows_in_call)
        self._m_requests.increment(n_requests)
        now = dict(calls=s.runtime_calls, batched=s.batched_rows, busy=s.busy_rejections,
                   idle=s.sequences_idled_out)
        for key, metric in (("calls", self._m_calls), ("batched", self._m_batched),
                            ("busy", self._m_busy), ("idle", self._m_idle)):
            if now[key] > self._last[key]:
                metric.increment(now[key] - self._last[key])
        self._last = now
