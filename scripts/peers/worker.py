"""A peer engine (llama.cpp or OpenVINO GenAI) behind a JSON-lines protocol, for paired timing.

Runs inside the peer venv (scripts/install_peers.sh), started by `serving.peers.PeerWorker`:

    python worker.py --engine llama.cpp|openvino|openvino-cb --model PATH --threads N [--ov-precision f32|default]

It loads the model once, writes one line {"ready": true, ...}, then answers one line per request
line on stdin until {"op": "quit"} or end of input. Prompts travel as token ids, so the peers'
tokenizers never matter; decoding is greedy and ignores eos (exactly max_new_tokens tokens).

  {"id": 1, "op": "generate", "prompt_ids": [..], "max_new_tokens": 128}
    -> {"id": 1, "token_ids": [..], "ttft_s": .., "itl_s": [..], "wall_s": ..}
       ttft_s: request read -> first token; itl_s: the gaps between consecutive tokens
  {"id": 2, "op": "logits", "prompt_ids": [..]}
    -> {"id": 2, "logits": [..]}   the next-token logits after the prompt (not for openvino-cb)
  {"id": 3, "op": "batch", "prompts": [[..], ..], "max_new_tokens": 128}   (openvino-cb only)
    -> {"id": 3, "streams": [{"token_ids", "ttft_s", "itl_s"}, ..], "wall_s": ..}
  any failure -> {"id": .., "error": "..."} (the worker keeps serving)

Only protocol lines go to stdout: fd 1 is pointed at stderr before any engine loads, so what a
native library prints cannot corrupt the stream.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

PROTOCOL_VERSION = 1


def _timing(sent: float, times: Sequence[float], tokens: Sequence[int]) -> dict[str, Any]:
    return {"token_ids": [int(t) for t in tokens], "ttft_s": times[0] - sent if times else None,
            "itl_s": list(np.diff(np.asarray(times, dtype=np.float64))), "wall_s": (times[-1] if times else sent) - sent}


def _check_ids(ids: Any, field: str) -> list[int]:
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ValueError(f"{field} must be a non-empty list of non-negative token ids")
    return ids


# ----------------------------------------------------------------------------- llama.cpp


class LlamaCpp:
    """llama-cpp-python's Llama: eval() the prompt, then one eval() per token, argmax of the
    last position's logits as llama.cpp leaves them (`llama_get_logits_ith(ctx, -1)`, no copy):
    the loop `Llama.generate` runs, minus its sampler chain."""

    def __init__(self, model: Path, *, threads: int, n_ctx: int) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as api

        # A build with llama.cpp's AMX backend (-DGGML_NATIVE=ON on an AMX CPU) repacks q8_0/q4_0
        # weights into AMX buffers and segfaults in the first decode (0.3.36, GPT-2): load without
        # the extra buffer types there. install_peers.sh compiles AMX out, which keeps them (and
        # with them the AVX2/AVX-512 q4_0 repacking).
        system = api.llama_print_system_info().decode(errors="replace")
        extra_bufts = "AMX_INT8 = 1" not in system
        defaults = api.llama_model_default_params

        def model_params() -> Any:
            params = defaults()
            params.use_extra_bufts = extra_bufts
            return params

        api.llama_model_default_params = model_params  # Llama() reads its model params from here
        try:
            self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, n_gpu_layers=0, logits_all=False, verbose=False)
        finally:
            api.llama_model_default_params = defaults
        # llama.cpp pads n_ctx (128 -> 256) and asserts (abort) on positions past the model's own
        # context (GPT-2's learned position table), so requests are bounded by the smaller one
        self.context = min(self.llm.n_ctx(), self.llm._model.n_ctx_train())
        ctx, n_vocab = self.llm._ctx.ctx, self.llm.n_vocab()
        self._last_logits = lambda: np.ctypeslib.as_array(api.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        self.info = {"llama_cpp": llama_cpp.__version__, "n_ctx": self.context, "n_vocab": n_vocab,
                     "extra_bufts": extra_bufts, "system_info": system}

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        self.llm.reset()  # n_tokens = 0: eval() drops the KV cells past it, so nothing is reused
        self.llm.eval(prompt)
        return self._last_logits()

    def generate(self, prompt: list[int], max_new_tokens: int, sent: float) -> dict[str, Any]:
        if len(prompt) + max_new_tokens > self.context:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"{self.context} (n_ctx and the model's own)")
        logits = self._prefill(prompt)
        times: list[float] = []
        tokens: list[int] = []
        while True:
            token = int(np.argmax(logits))
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == max_new_tokens:
                break
            self.llm.eval([token])
            logits = self._last_logits()
        return _timing(sent, times, tokens)

    def logits(self, prompt: list[int]) -> list[float]:
        if len(prompt) > self.context:
            raise ValueError(f"prompt ({len(prompt)}) exceeds the context {self.context}")
        return [float(x) for x in self._prefill(prompt)]


# ----------------------------------------------------------------------------- OpenVINO GenAI


def _ov_config(threads: int, precision: str) -> dict[str, Any]:
    """precision "f32": f32 compute and KV cache, the function PyTorch fp32 computes; "default":
    OpenVINO's choice for the CPU (bf16 compute and an f16 KV cache where the CPU has AMX /
    AVX512-bf16, with int8 dynamic quantization of activations for compressed weights)."""
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision == "f32":
        config.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    elif precision != "default":
        raise ValueError(f"--ov-precision must be f32 or default, got {precision!r}")
    return config


def _generation_config(max_new_tokens: int) -> Any:
    import openvino_genai as og

    config = og.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = max_new_tokens
    config.ignore_eos = True
    config.do_sample = False
    return config


def _ids_tensor(prompt: list[int]) -> Any:
    import openvino as ov

    return ov.Tensor(np.asarray([prompt], dtype=np.int64))


class OpenVinoLLM:
    """openvino_genai.LLMPipeline (one sequence), a streamer stamping each token."""

    def __init__(self, model: Path, *, threads: int, precision: str) -> None:
        import openvino as ov
        import openvino_genai as og

        self.model = model
        self.config = _ov_config(threads, precision)
        self.pipe = og.LLMPipeline(str(model), "CPU", **self.config)
        self._request = None  # a plain infer request on the same IR, for logits (made when asked)
        self.info = {"openvino": ov.__version__, "openvino_genai": og.__version__, "ov_config": self.config}

    def generate(self, prompt: list[int], max_new_tokens: int, sent: float) -> dict[str, Any]:
        import openvino_genai as og

        times: list[float] = []
        tokens: list[int] = []

        class Clock(og.StreamerBase):
            def write(self, token: Any) -> Any:
                now = time.perf_counter()
                for t in token if isinstance(token, list) else [token]:
                    times.append(now)
                    tokens.append(int(t))
                return og.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        result = self.pipe.generate(_ids_tensor(prompt), _generation_config(max_new_tokens), Clock())
        produced = [int(t) for t in result.tokens[0]]
        if produced != tokens:
            raise RuntimeError(f"streamed tokens {tokens[:8]}... differ from the result's {produced[:8]}...")
        out = _timing(sent, times, tokens)
        metrics = result.perf_metrics
        out["engine_ttft_s"] = metrics.get_ttft().mean / 1e3
        out["engine_tpot_s"] = metrics.get_tpot().mean / 1e3
        return out

    def logits(self, prompt: list[int]) -> list[float]:
        """The IR's logits for the prompt, through openvino.Core on openvino_model.xml (the
        stateful model LLMPipeline runs: input_ids, attention_mask, position_ids, beam_idx)."""
        import openvino as ov

        if self._request is None:
            core = ov.Core()
            compiled = core.compile_model(str(self.model / "openvino_model.xml"), "CPU", self.config)
            self._request = compiled.create_infer_request()
        request = self._request
        request.reset_state()
        n = len(prompt)
        inputs = {"input_ids": np.asarray([prompt], dtype=np.int64),
                  "attention_mask": np.ones((1, n), dtype=np.int64),
                  "position_ids": np.arange(n, dtype=np.int64)[None],
                  "beam_idx": np.zeros(1, dtype=np.int32)}
        names = {name for port in request.model_inputs for name in port.get_names()}
        result = request.infer({k: v for k, v in inputs.items() if k in names})
        logits = next(iter(result.values()))  # the one output: logits (1, n, vocab)
        return [float(x) for x in np.asarray(logits)[0, -1]]


class OpenVinoCB:
    """openvino_genai.ContinuousBatchingPipeline: N prompts at once, each token stamped as the
    step that made it returns (add_request + step(), reading every handle after each step)."""

    def __init__(self, model: Path, *, threads: int, cache_gb: float, precision: str) -> None:
        import openvino as ov
        import openvino_genai as og

        scheduler = og.SchedulerConfig()
        scheduler.cache_size = max(1, int(round(cache_gb)))
        scheduler.dynamic_split_fuse = True
        config = _ov_config(threads, precision)
        self.pipe = og.ContinuousBatchingPipeline(str(model), scheduler, "CPU", config)
        self.info = {"openvino": ov.__version__, "openvino_genai": og.__version__, "cache_gb": scheduler.cache_size,
                     "ov_config": config}
        self._next_id = 0

    def batch(self, prompts: list[list[int]], max_new_tokens: int, sent: float) -> dict[str, Any]:
        config = _generation_config(max_new_tokens)
        handles = []
        for prompt in prompts:
            handles.append(self.pipe.add_request(self._next_id, _ids_tensor(prompt), config))
            self._next_id += 1
        times: list[list[float]] = [[] for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        while self.pipe.has_non_finished_requests():
            self.pipe.step()
            now = time.perf_counter()
            for i, handle in enumerate(handles):
                if handle.can_read():
                    for output in handle.read().values():
                        for t in output.generated_ids:
                            times[i].append(now)
                            tokens[i].append(int(t))
        end = time.perf_counter()
        return {"streams": [_timing(sent, ts, tk) for ts, tk in zip(times, tokens)], "wall_s": end - sent}


# ----------------------------------------------------------------------------- the loop


def load(engine: str, model: Path, *, threads: int, n_ctx: int, cache_gb: float, ov_precision: str) -> Any:
    if engine == "llama.cpp":
        return LlamaCpp(model, threads=threads, n_ctx=n_ctx)
    if engine == "openvino":
        return OpenVinoLLM(model, threads=threads, precision=ov_precision)
    if engine == "openvino-cb":
        return OpenVinoCB(model, threads=threads, cache_gb=cache_gb, precision=ov_precision)
    raise ValueError(f"--engine must be llama.cpp, openvino or openvino-cb, got {engine!r}")


def answer(peer: Any, request: dict[str, Any], sent: float) -> dict[str, Any]:
    op = request.get("op", "generate")
    handler: Callable[..., Any] | None = {"generate": getattr(peer, "generate", None),
                                          "logits": getattr(peer, "logits", None),
                                          "batch": getattr(peer, "batch", None)}.get(op)
    if handler is None:
        raise ValueError(f"op {op!r} is not served by this engine")
    if op == "logits":
        return {"logits": handler(_check_ids(request.get("prompt_ids"), "prompt_ids"))}
    n = request.get("max_new_tokens")
    if not isinstance(n, int) or n < 1:
        raise ValueError("max_new_tokens must be a positive int")
    if request.get("greedy", True) is not True:
        raise ValueError("greedy: only greedy decoding is served")
    if op == "batch":
        prompts = request.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts")
        return handler([_check_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)], n, sent)
    return handler(_check_ids(request.get("prompt_ids"), "prompt_ids"), n, sent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024, help="llama.cpp context (prompt + new tokens)")
    parser.add_argument("--cache-gb", type=float, default=1.0, help="openvino-cb KV cache size")
    parser.add_argument("--ov-precision", default="f32", help="openvino: f32 (the same function as PyTorch "
                        "fp32) or default (OpenVINO's choice for the CPU: bf16 where it has AMX)")
    args = parser.parse_args(argv)

    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own copy of stdout
    os.dup2(2, 1)  # anything else written to fd 1 (native libraries) lands on stderr
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        peer = load(args.engine, args.model, threads=args.threads, n_ctx=args.n_ctx, cache_gb=args.cache_gb,
                    ov_precision=args.ov_precision)
    except Exception as e:  # the driver reads this line and raises it
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    send({"ready": True, "protocol": PROTOCOL_VERSION, "engine": args.engine, "pid": os.getpid(),
          "load_s": time.perf_counter() - t0, "threads": args.threads, **peer.info})
    for line in sys.stdin:
        sent = time.perf_counter()
        if not line.strip():
            continue
        request_id = None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            request_id = request.get("id")
            if request.get("op") == "quit":
                send({"id": request_id, "bye": True})
                return 0
            send({"id": request_id, **answer(peer, request, sent)})
        except Exception as e:
            send({"id": request_id, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
