"""Triton python backend: `generate`, the decoupled server-side generation loop.

Text (`text_input`) or ids (`input_ids`) in; tokens out, one response per token when
`stream` is true, else one final response. It also takes the inputs Triton's own OpenAI
frontend sends TensorRT-LLM models (`seed`, `presence_penalty`, `frequency_penalty`,
`exclude_input_in_output`), vLLM's `min_tokens` and `stop_token_ids`, and answers
`num_input_tokens` / `num_output_tokens`. (No top-N alternatives: only the chosen tokens'
`output_log_probs`; the OpenAI frontend runs top_logprobs requests on the client-side loop.) The loop is serving.generation's, the same one
the client runs: each step is a BLS call into the stateful `gpt` model under a correlation
id of its own, so server-side generations share `gpt`'s engine, KV pool and batching with
client-side ones. Every request runs in a worker thread (execute returns at once), so many
generations step concurrently and the sequence batcher batches their steps.
"""

import faulthandler
import json
import logging
import os
import queue
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from serving import tensors
from serving.generation import (
    Generation,
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    check_stop,
    generate_tokens,
    make_sampling_params,
)
from serving.engine.generations import generation_spec
from serving.engine.stub_bls import RetiredIterators
from serving.request_rules import (
    SEED_LIMIT,
    check_bool,
    check_float,
    check_int,
    check_known_fields,
    check_max_new_tokens,
    check_prompt_bytes,
)
from serving.tokenizer import Tokenizer

logger = logging.getLogger("gptpipe.triton.generate")

# Defaults for fields a request leaves out (the HTTP generate extension sends only what
# the JSON body has): OpenAI's completions defaults.
DEFAULT_MAX_TOKENS = 16
# Generations running at once; more wait in the queue (the KV pool bounds them anyway).
MAX_WORKERS = 64
# A START that `gpt` refuses as "server busy" (every KV slot taken) is retried this long, so
# a burst of generate requests queues instead of failing.
QUEUE_TIMEOUT_S = 30.0
# A step (BLS call into `gpt`) that takes longer fails the generation and frees its worker: a dead
# `gpt` stub never answers. GPTPIPE_STEP_TIMEOUT_S overrides it (tests use a short one).
STEP_TIMEOUT_S = float(os.environ.get("GPTPIPE_STEP_TIMEOUT_S") or 30.0)
# Triton's request timeout only covers a step still queued; one a dead stub had taken never comes
# back, so each BLS call runs here and the worker waits for it at most STEP_TIMEOUT_S.
_BLS_CALLS = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="generate-bls")
# Finished decoupled BLS iterators, held until the stub has let go of them (Triton 2.51 frees them
# without the GIL otherwise, which crashes this stub under load): see serving/engine/stub_bls.py.
_RETIRED = RetiredIterators()
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_INPUT_NAMES = frozenset(spec.name for spec in tensors.GENERATE_INPUTS)


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub prints every thread's stack to Triton's log
        self.model_config = json.loads(args["model_config"])
        tokenizer_dir = Path(args["model_repository"]).parent / tensors.TOKENIZER_MODEL / "1"
        self.tokenizer = Tokenizer.from_file(tokenizer_dir / "tokenizer.json")
        defaults = json.loads((tokenizer_dir / "generation_config.json").read_text(encoding="utf-8"))
        self.eos_token_id = defaults.get("eos_token_id")
        self.n_positions = int(defaults["n_positions"])
        self.vocab_size = int(defaults["vocab_size"])
        self.gpt_decoupled = bool(defaults.get("inflight_batching", False))
        self.pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="generate")
        logger.info("generate: n_positions=%d vocab_size=%d eos=%s", self.n_positions, self.vocab_size,
                    self.eos_token_id)

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ one request

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except _Cancelled:
            logger.info("generate: request %r cancelled by the client", request.request_id())
            try:
                sender.send(flags=_FINAL)
            except Exception:  # noqa: BLE001 - the client is gone; nothing to tell it
                pass
        except InvalidParameterError as e:  # a client mistake: HTTP 400, gRPC INVALID_ARGUMENT
            message = str(e) if isinstance(e, PromptTooLongError) else f"invalid parameter: {e}"
            sender.send(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)), flags=_FINAL)
        except GptpipeError as e:  # server busy ...
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=_FINAL)
        except Exception as e:  # noqa: BLE001 - whatever it was, the client gets the message
            logger.exception("generate failed")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generate failed: {e}")),
                        flags=_FINAL)

    def _generate(self, request, sender):
        generation = self._parse(request)
        stream = check_bool("stream", _scalar(request, "stream", False))
        return_logprobs = generation.return_logprobs
        counts = [len(generation.prompt_ids), 0]  # num_input_tokens, num_output_tokens
        # TensorRT-LLM's default: the prompt's text is not repeated in text_output
        prefix = "" if check_bool("exclude_input_in_output", _scalar(request, "exclude_input_in_output", True)) else \
            self.tokenizer.decode(generation.prompt_ids)
        if self.gpt_decoupled and not return_logprobs:  # the engine runs the loop (one BLS call)
            events = _engine_tokens(generation)
        else:  # a BLS call into `gpt` per token: log-probs need the logits here
            step = _BlsStep(correlation_id=secrets.randbits(63) + 1,  # 0 means "no sequence"
                            argmax=generation.argmax_only, decoupled=self.gpt_decoupled)
            events = generate_tokens(step, generation)
        ids, logprobs, text = [], [], []
        try:
            for event in events:
                if _cancelled(sender):
                    raise _Cancelled()
                counts[1] += 1
                if stream:
                    response = _response(prefix + event.text, [event.token_id],
                                         [event.logprob] if return_logprobs else None,
                                         event.finish_reason or "", counts)
                    prefix = ""
                    sender.send(response, flags=_FINAL if event.finish_reason else 0)
                else:
                    ids.append(event.token_id)
                    logprobs.append(event.logprob)
                    text.append(event.text)
        finally:
            events.close()  # sends END if the loop did not finish (cancel, error)
        if not stream:
            sender.send(_response(prefix + "".join(text), ids, logprobs if return_logprobs else None,
                                  generation.finish_reason, counts), flags=_FINAL)

    def _parse(self, request):
        """A Generation from the request's tensors; InvalidParameterError for bad fields.

        Triton's HTTP generate extension has already turned the JSON body into these tensors:
        a field named like an input became that input, cast to its declared type (a JSON value
        of the wrong type was refused by Triton, with HTTP 500 and no field named); any other
        scalar field became a request parameter, which is refused here as an unknown field."""
        check_known_fields(json.loads(request.parameters() or "{}"), _INPUT_NAMES, where=" of the generate request")
        text = _scalar(request, "text_input", None)
        input_ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if text is not None and input_ids is not None:
            raise InvalidParameterError("give text_input or input_ids, not both")
        max_tokens = check_max_new_tokens(_scalar(request, "max_tokens", DEFAULT_MAX_TOKENS),
                                          n_positions=self.n_positions, field_name="max_tokens")
        room = self.n_positions - max_tokens
        if input_ids is not None:
            ids = input_ids.as_numpy().reshape(-1)
            if ids.size > room:  # before any per-id work
                raise PromptTooLongError(
                    f"prompt too long: {ids.size} prompt tokens + max_tokens={max_tokens} exceeds the "
                    f"context length n_positions={self.n_positions}")
            prompt_ids = ids.tolist()
        elif text is not None:
            try:
                prompt = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            except UnicodeDecodeError:
                raise InvalidParameterError("text_input is not valid UTF-8") from None
            check_prompt_bytes(prompt, n_positions=self.n_positions, max_new_tokens=max_tokens,
                               max_token_bytes=self.tokenizer.max_token_bytes, field_name="text_input",
                               max_new_tokens_field="max_tokens")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            raise InvalidParameterError("the request needs text_input (a prompt) or input_ids")
        stop_tensor = pb_utils.get_input_tensor_by_name(request, "stop_words")
        try:
            stop = [] if stop_tensor is None else [s.decode("utf-8") if isinstance(s, bytes) else str(s)
                                                   for s in stop_tensor.as_numpy().reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidParameterError("stop_words are not valid UTF-8") from None
        end_id = _scalar(request, "end_id", None)
        if end_id is not None:
            end_id = check_int("end_id", end_id, lo=-1, hi=self.vocab_size - 1, why=" (-1 = none)")
        eos = self.eos_token_id if end_id is None else (None if end_id < 0 else end_id)
        seed = _scalar(request, "random_seed", None)
        trtllm_seed = _scalar(request, "seed", None)  # Triton's OpenAI frontend / TensorRT-LLM name
        if seed is not None and trtllm_seed is not None:
            raise InvalidParameterError("give random_seed or seed, not both")
        seed_field = "random_seed" if trtllm_seed is None else "seed"
        seed = trtllm_seed if seed is None else seed
        params = make_sampling_params(
            temperature=check_float("temperature", _scalar(request, "temperature", 1.0)),
            top_k=check_int("top_k", _scalar(request, "top_k", 0), lo=0, why=" (0 = off)"),
            top_p=check_float("top_p", _scalar(request, "top_p", 1.0)),
            repetition_penalty=check_float("repetition_penalty", _scalar(request, "repetition_penalty", 1.0)),
            seed=None if seed is None else check_int(seed_field, seed, lo=0, hi=SEED_LIMIT - 1),
            presence_penalty=check_float("presence_penalty", _scalar(request, "presence_penalty", 0.0)),
            frequency_penalty=check_float("frequency_penalty", _scalar(request, "frequency_penalty", 0.0)),
        )
        min_tokens = _scalar(request, "min_tokens", 0)
        min_tokens = check_int("min_tokens", min_tokens, lo=0, hi=max_tokens, why=" (<= max_tokens)")
        stop_ids = pb_utils.get_input_tensor_by_name(request, "stop_token_ids")
        stop_ids = () if stop_ids is None else stop_ids.as_numpy().reshape(-1).tolist()
        return Generation(
            prompt_ids,
            min_tokens=min_tokens,
            stop_token_ids=stop_ids,
            max_new_tokens=max_tokens,
            max_new_tokens_field="max_tokens",
            params=params,
            n_positions=self.n_positions,
            vocab_size=self.vocab_size,
            eos_token_id=eos,
            stop=check_stop(stop, field_name="stop_words"),
            tokenizer=self.tokenizer,
            return_logprobs=check_bool("return_log_probs", _scalar(request, "return_log_probs", False)),
        )


class _BlsStep:
    """step(tokens, start=, end=) -> logits (V,) through a BLS call into `gpt`; with argmax,
    the greedy token id (1,) instead (the `gpt` of this repository has that output)."""

    def __init__(self, *, correlation_id, argmax=False, decoupled=False):
        self.correlation_id = correlation_id
        self.output = tensors.OUTPUT_IDS if argmax else tensors.LOGITS
        self.decoupled = decoupled  # `gpt` batches in flight: its one answer comes as a stream

    def _exec(self, request):
        try:
            return _BLS_CALLS.submit(self._exec_now, request).result(timeout=STEP_TIMEOUT_S)
        except FutureTimeout:
            raise RuntimeError(f"{tensors.GPT_MODEL} answered no step within {STEP_TIMEOUT_S:g} s") from None

    def _exec_now(self, request):
        if not self.decoupled:
            return request.exec()
        answer = None
        for response in _RETIRED.exec_decoupled(request):  # one response (FINAL), then the stream ends
            if answer is None and (response.has_error() or response.output_tensors()):
                answer = response
        if answer is None:
            raise RuntimeError(f"{tensors.GPT_MODEL} answered no response")
        return answer

    def _end_refused(self, ids):
        """END the sequence `gpt` refused as busy (Triton's batcher took its START): a retry under
        the same id would otherwise log a "sequence conflict" warning each time."""
        request = pb_utils.InferenceRequest(
            model_name=tensors.GPT_MODEL, inputs=[pb_utils.Tensor(tensors.INPUT_IDS, ids[:, -1:])],
            requested_output_names=[self.output], correlation_id=self.correlation_id,
            flags=pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END, timeout=int(STEP_TIMEOUT_S * 1e6))
        self._exec(request)  # `gpt` answers "not active": expected

    def __call__(self, tokens, *, start, end):
        flags = 0
        if start:
            flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
        if end:
            flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        ids = np.asarray(tokens, dtype=np.int64)[None, :]  # (1, T)
        request = pb_utils.InferenceRequest(
            model_name=tensors.GPT_MODEL,
            inputs=[pb_utils.Tensor(tensors.INPUT_IDS, ids)],
            requested_output_names=[self.output],
            correlation_id=self.correlation_id,
            flags=flags,
            timeout=int(STEP_TIMEOUT_S * 1e6),  # microseconds
        )
        retry = _BusyRetry()
        while True:
            response = self._exec(request)
            if not response.has_error():
                return pb_utils.get_output_tensor_by_name(response, self.output).as_numpy()[0]  # (V,) or (1,)
            message = response.error().message()
            busy = message.startswith("server busy")
            if busy and start:
                self._end_refused(ids)
            if not (busy and start and retry.wait()):
                raise _refusal(message)


class _BusyRetry:
    """The waits between tries of a START that `gpt` refused as busy (another sequence ends
    soon): doubling from 5 ms to at most 0.2 s, for up to QUEUE_TIMEOUT_S in all."""

    def __init__(self):
        self.deadline, self.delay = time.monotonic() + QUEUE_TIMEOUT_S, 0.005

    def wait(self):
        """Wait before the next try; False (no wait) when it would pass the deadline."""
        if time.monotonic() + self.delay >= self.deadline:
            return False
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, 0.2)
        return True


def _refusal(message):
    """The error for a message `gpt` answered a step or a generation with: a refusal the client
    can act on is passed on as is (busy, too long, shutting down, a bad parameter)."""
    if message.startswith("invalid parameter"):
        return InvalidParameterError(message.removeprefix("invalid parameter: "))
    if message.startswith(("server busy", "prompt too long", "server shutting down")):
        return _StepRefused(message)
    return RuntimeError(message)


def _gpt_request(ids, correlation_id, parameters):
    """A START+END request to `gpt`: a whole sequence (serving/engine/generations.py)."""
    return pb_utils.InferenceRequest(
        model_name=tensors.GPT_MODEL, inputs=[pb_utils.Tensor(tensors.INPUT_IDS, ids)],
        requested_output_names=[tensors.OUTPUT_IDS], correlation_id=correlation_id,
        flags=pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START | pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
        parameters=parameters, timeout=int(STEP_TIMEOUT_S * 1e6))


class _Stream:
    """The responses of one decoupled BLS call, each waited for at most STEP_TIMEOUT_S (a dead
    `gpt` stub never answers): a worker thread iterates the call and hands them over."""

    def __init__(self, request):
        self._queue, self.ended = queue.SimpleQueue(), False
        _BLS_CALLS.submit(self._pump, request)

    def _pump(self, request):
        try:
            for response in _RETIRED.stream_decoupled(request):  # each as it comes
                self._queue.put(response)
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._queue.put(e)
        self._queue.put(None)

    def next(self):
        """The next response, or None once the stream ended."""
        if self.ended:
            return None
        try:
            item = self._queue.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"{tensors.GPT_MODEL} answered no token within {STEP_TIMEOUT_S:g} s") from None
        if isinstance(item, Exception):
            raise item
        self.ended = item is None
        return item

    def drain(self):
        """Read to the end, within a bound (after a cancel: the engine ends the stream)."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not self.ended and time.monotonic() < deadline:
            self.next()


def _engine_tokens(generation):
    """The generation's tokens from `gpt`'s engine-side loop, through the generation's own
    text, stop strings and finish. A stop string, a cancel or an error of the caller stops the
    engine (a cancel request: Triton 2.51's BLS cannot cancel a request)."""
    ids = np.asarray(generation.prompt_ids, dtype=np.int64)[None, :]
    spec = {tensors.GENERATE_PARAMETER: generation_spec(generation)}
    retry = _BusyRetry()
    while True:  # a START refused as busy is retried until a slot frees
        correlation_id = secrets.randbits(63) + 1
        stream = _Stream(_gpt_request(ids, correlation_id, spec))
        response, sent_at = stream.next(), time.perf_counter()
        if response is None:
            raise RuntimeError(f"{tensors.GPT_MODEL} ended the generation without a token")
        if not response.has_error():
            break
        message = response.error().message()
        stream.drain()
        if not (message.startswith("server busy") and retry.wait()):
            raise _refusal(message)
    try:
        while True:
            if response.has_error():
                raise _refusal(response.error().message())
            token = pb_utils.get_output_tensor_by_name(response, tensors.OUTPUT_IDS)
            if token is None:
                raise RuntimeError(f"{tensors.GPT_MODEL} ended the generation before its last token")
            event, _ = generation.accept(int(token.as_numpy().reshape(-1)[0]), sent_at=sent_at)
            yield event
            if event.finish_reason is not None:
                # the engine ended with this token too, unless a stop string (text: found here) ended it
                if event.finish_reason != "stop" or event.token_id in generation.stop_token_ids:
                    stream.drain()
                return
            response, sent_at = stream.next(), time.perf_counter()
            if response is None:
                raise RuntimeError(f"{tensors.GPT_MODEL} ended the generation before its last token")
    finally:
        if not stream.ended:
            _cancel(correlation_id)
            try:
                stream.drain()
            except Exception:  # noqa: BLE001 - the first error is the one the caller sees
                logger.debug("draining a stopped generation failed", exc_info=True)


def _cancel(correlation_id):
    """Stop the engine-side generation of ``correlation_id`` (best effort: it ends at its limit anyway)."""
    request = _gpt_request(np.zeros((1, 1), dtype=np.int64), secrets.randbits(63) + 1,
                           {tensors.CANCEL_PARAMETER: correlation_id})
    try:
        _Stream(request).drain()
    except Exception:  # noqa: BLE001
        logger.warning("could not stop generation %d", correlation_id, exc_info=True)


class _StepRefused(GptpipeError):
    """`gpt` refused a step with a message the client can act on; passed on as is."""


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1:
        raise InvalidParameterError(f"{name} must hold one value, got {array.size}")
    return array[0]


def _cancelled(sender):
    """The client cancelled (the sender and its request share one flag in the stub). Also the fence
    that lets _RETIRED drop the iterators of earlier steps."""
    return _RETIRED.is_cancelled(sender.is_cancelled)


def _response(text, ids, logprobs, finish_reason, counts):
    outputs = [
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
        pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.asarray(counts[:1], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.asarray(counts[1:], dtype=np.int32)),
    ]
    if logprobs is not None:
        outputs.append(pb_utils.Tensor("output_log_probs", np.asarray(logprobs, dtype=np.float32)))
    return pb_utils.InferenceResponse(output_tensors=outputs)
