"""Triton python backend: the stateful `gpt` step model, a thin adapter over serving/engine/step.py.

Triton's sequence batcher hands `execute` the steps of many sequences at once (START/END/CORRID
control inputs per request); the engine (serving/engine/step.py: scheduler, runtime, KV pool)
runs them. This file only turns Triton requests into steps and results into Triton responses,
and gives the engine Triton's custom metrics. Plain or decoupled (in-flight batching): see
serving/engine/step.py. A step with the request parameter `gptpipe_lease` (the gptpipe client's
stream steps) keeps its request open as the sequence's lease (serving/engine/leases.py); any
other request parameter is refused, naming the closest valid one.
"""

import faulthandler
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from serving import tensors
from serving.engine.generations import CancelStep, GenerateStep, check_flags, parse_generation
from serving.engine.drain import DRAIN_IDLE_S, RUNNING, SHUTTING_DOWN, STOPPING, DrainFlag
from serving.engine.leases import Leases
from serving.engine.scheduler import StepQueue
from serving.engine.stub_bls import RetiredIterators
from serving.engine.step import EngineConfig, StepEngine, is_busy, parse_step
from serving.errors import InvalidParameterError
from serving.request_rules import check_known_fields
from serving.sampling import greedy_token

logger = logging.getLogger("gptpipe.triton.gpt")
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The drain's decoupled BLS iterators, held until the stub has let go of them (serving/engine/stub_bls.py).
_RETIRED = RetiredIterators()


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub prints every thread's stack to Triton's log
        config = json.loads(args["model_config"])
        settings = EngineConfig.from_triton(config, Path(args["model_repository"]) / args["model_version"])
        self._families = []  # a MetricFamily must outlive its Metric objects
        self._labels = {"model": config["name"]}
        self.engine = StepEngine(settings, answer=self._answer, make_metric=self._metric)
        self._limits = (int(settings.model_config["n_positions"]), int(settings.model_config["vocab_size"]))
        self._start_drain_watch(config)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        if self.decoupled:
            self.engine.leases = Leases(complete=lambda sender: sender.send(flags=_FINAL),
                                        cancelled=lambda sender: _RETIRED.is_cancelled(sender.is_cancelled))
            self.engine.answer_token = _answer_token
            self.engine.cancelled = lambda sender: _RETIRED.is_cancelled(sender.is_cancelled)
            self.engine.refusal = lambda: (f"{SHUTTING_DOWN}: the generation was stopped"
                                           if self._drain.state() == STOPPING else None)
            self._queue = StepQueue(settings.max_step_wait_s)
            self._thread = threading.Thread(target=self.engine.serve, args=(self._queue,),
                                            kwargs=dict(send=_send, failed=_failed), name="gpt-inflight", daemon=True)
            self._thread.start()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self.engine.watch, args=(self._stop,), name="gpt-watch", daemon=True)
        self._watcher.start()
        pool = self.engine.pool
        logger.info("gpt: %d slots x %d positions, KV pool %.1f MiB%s", pool.max_sequences, pool.max_length,
                    pool.nbytes / 2**20,
                    f", in-flight batching (wait <= {self._queue.wait_s * 1e3:g} ms)" if self.decoupled else "")

    def execute(self, requests):
        parsed = [(self._admit(step), lease) for step, lease in (_parse(r, self._limits) for r in requests)]
        steps = [step for step, _ in parsed]
        if not self.decoupled:
            return self.engine.run(requests, steps)
        for request, (step, lease) in zip(requests, parsed):
            sequence_id = None if isinstance(step, str) else step.sequence_id
            self._queue.put(sequence_id, (request, step, request.get_response_sender(), lease))
        return None

    def finalize(self):
        self._stop.set()
        self._closed.set()
        if self.decoupled:
            self._queue.close()
            self._thread.join(timeout=10)
        self._watcher.join(timeout=5)
        if self.engine.leases is not None:
            with self.engine.lock:
                self.engine.leases.end_all()

    # ------------------------------------------------------------------ drain (gptpipe serve)

    def _start_drain_watch(self, config):
        """With a drain file (serving.engine.drain), a thread ends sequences when the server drains."""
        self._drain, self._last_step, self._closed = DrainFlag(), {}, threading.Event()
        self._name, self._ended = config["name"], set()
        if self._drain.path is not None:
            threading.Thread(target=self._drain_watch, name="gpt-drain", daemon=True).start()

    def _admit(self, step):
        """The step, or its refusal while the server shuts down (new sequences first)."""
        if isinstance(step, str):
            return step
        self._last_step[step.sequence_id] = time.monotonic()
        refusal = self._drain.refusal(start=step.start)
        return refusal if refusal is not None and step.start else step

    def _answer(self, request, logits, error):
        if error is None and self._drain.state() == STOPPING:
            error = f"{SHUTTING_DOWN}: the sequence was ended"
        return _answer(request, logits, error)

    def _drain_watch(self):
        """Draining or stopping: end the sequences idle longer than DRAIN_IDLE_S. Ending one is an
        END step through Triton (a BLS call to this model), so Triton's sequence batcher lets it go
        too and an idle client-side sequence cannot hold shutdown up. A sequence still stepping is
        not ended behind its client's back while stopping: Triton would answer its next step with
        its own "must specify the START flag"; that step gets "server shutting down" (_answer), and
        the client ENDs the sequence itself."""
        while not self._closed.wait(0.1):
            state = self._drain.state()
            try:
                open_ids = self.engine.scheduler.sequence_ids()
            except RuntimeError:  # changed while copied: the next tick
                continue
            for sid in [s for s in list(self._last_step) if s not in open_ids and s not in self._ended]:
                self._last_step.pop(sid, None)
            if state == RUNNING:
                continue
            now = time.monotonic()
            for sid in open_ids - self._ended - set(self.engine.generations):  # those end by themselves
                if now - self._last_step.get(sid, now) > DRAIN_IDLE_S:
                    self._ended.add(sid)
                    logger.info("gpt: ending sequence %d (%s, idle %.2f s)", sid, state,
                                now - self._last_step.get(sid, now))
                    self._end_sequence(sid)

    def _end_sequence(self, sid):
        request = pb_utils.InferenceRequest(
            model_name=self._name, inputs=[pb_utils.Tensor(tensors.INPUT_IDS, np.zeros((1, 1), dtype=np.int64))],
            requested_output_names=[tensors.OUTPUT_IDS], correlation_id=sid,
            flags=pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END, timeout=5_000_000)
        try:
            _RETIRED.exec_decoupled(request) if self.decoupled else request.exec()
        except Exception:  # noqa: BLE001 - best effort: the idle timeout ends it otherwise
            logger.exception("gpt: could not end sequence %d", sid)

    def _metric(self, kind, name, doc):
        kinds = {"gauge": pb_utils.MetricFamily.GAUGE, "counter": pb_utils.MetricFamily.COUNTER}
        family = pb_utils.MetricFamily(name=name, description=doc, kind=kinds[kind])
        self._families.append(family)
        return family.Metric(labels=self._labels)


_PARAMETERS = (tensors.LEASE_PARAMETER, tensors.GENERATE_PARAMETER, tensors.CANCEL_PARAMETER)


def _parse(request, limits):
    """(a StepRequest, a GenerateStep or CancelStep (serving/engine/generations.py), or an error
    message for a request that cannot be one; whether the step keeps its request open as the
    sequence's lease). limits: (n_positions, vocab_size)."""
    try:
        parameters = json.loads(request.parameters() or "{}")
        check_known_fields(parameters, _PARAMETERS, where=f" of the {tensors.GPT_MODEL} request")
    except InvalidParameterError as e:
        return f"invalid parameter: {e}", False
    if tensors.GENERATE_PARAMETER in parameters or tensors.CANCEL_PARAMETER in parameters:
        return _parse_generation(request, parameters, limits), False

    def scalar(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(-1)[0]

    ids = pb_utils.get_input_tensor_by_name(request, tensors.INPUT_IDS).as_numpy()
    step = parse_step(ids, sequence_id=scalar(tensors.CONTROL_CORRID), start=scalar(tensors.CONTROL_START),
                      end=scalar(tensors.CONTROL_END))
    return step, parameters.get(tensors.LEASE_PARAMETER) is True


def _parse_generation(request, parameters, limits):
    """A GenerateStep or CancelStep, or the message of why the request is neither."""
    def scalar(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(-1)[0]

    sequence_id = int(scalar(tensors.CONTROL_CORRID))
    wrong = check_flags(bool(scalar(tensors.CONTROL_START)), bool(scalar(tensors.CONTROL_END)))
    if wrong is not None:
        return f"invalid parameter: {wrong}"
    if tensors.CANCEL_PARAMETER in parameters:
        target = parameters[tensors.CANCEL_PARAMETER]
        if isinstance(target, bool) or not isinstance(target, int) or tensors.GENERATE_PARAMETER in parameters:
            return (f"invalid parameter: {tensors.CANCEL_PARAMETER} must be the int correlation id of a "
                    f"generation (and alone), got {target!r}")
        return CancelStep(sequence_id, target)
    ids = pb_utils.get_input_tensor_by_name(request, tensors.INPUT_IDS).as_numpy()
    step = parse_step(ids, sequence_id=sequence_id, start=True, end=False)
    if isinstance(step, str):
        return step
    n_positions, vocab_size = limits
    try:
        generation = parse_generation(parameters[tensors.GENERATE_PARAMETER], step.tokens.tolist(),
                                      n_positions=n_positions, vocab_size=vocab_size)
    except InvalidParameterError as e:
        return str(e) if str(e).startswith("prompt too long") else f"invalid parameter: {e}"
    return GenerateStep(step, generation)


def _answer_token(request, token, error):
    """A generation's response: its next token (output_ids, (1, 1)), its error, or nothing (the end)."""
    if error is not None:
        return _answer(request, None, error)
    outputs = [] if token is None else [pb_utils.Tensor(tensors.OUTPUT_IDS, np.array([[token]], dtype=np.int64))]
    return pb_utils.InferenceResponse(output_tensors=outputs)


def _answer(request, logits, error):
    """The response to one request: the outputs it asked for, or its error."""
    outputs = None
    if error is None:
        try:
            outputs = _outputs(request, logits)
        except ValueError as e:  # the argmax of NaN logits: the engine's fault
            error = f"engine error: {e}"
    if error is not None:
        unavailable = is_busy(error) or error.startswith(SHUTTING_DOWN)
        code = pb_utils.TritonError.UNAVAILABLE if unavailable else pb_utils.TritonError.INVALID_ARG
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(error, code))
    return pb_utils.InferenceResponse(output_tensors=outputs)


def _outputs(request, logits):
    """The outputs the request asked for (Triton lists all of them when it named none): the logits
    (1, V), and/or the greedy token (1, 1), which spares a greedy client the vocab_size floats."""
    outputs = []
    for name in request.requested_output_names():
        if name == tensors.LOGITS:
            outputs.append(pb_utils.Tensor(name, logits[None, :]))
        elif name == tensors.OUTPUT_IDS:
            outputs.append(pb_utils.Tensor(name, np.array([[greedy_token(logits)]], dtype=np.int64)))
    return outputs


def _failed(request, error):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"gpt step failed: {error}"))


def _send(sender, response, final):
    sender.send(response, flags=_FINAL if final else 0)
