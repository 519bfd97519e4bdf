"""By-hand probe: OpenVINO's runtime on gptpipe's static-cache ONNX graph, as a candidate second
engine behind `step()`. Runs in the peer venv:

    python ov_onnx.py --onnx REPO/gpt/1/model.onnx --ref ref.npz --threads 2 [--profile]

ref.npz (from the project venv, serving.runtime's ORT step): prompt (T,), tokens (N,) greedy,
logits (N, V) — the logits that chose each token. The probe steps the same graph with OpenVINO:
each layer's KV buffer [1, H, MAX, hs] handed to the request as the past input AND as the present
output (one host buffer, shared memory: the in-place update ORT's GroupQueryAttention does), then,
where that is refused or wrong, with a copy of present back into the buffer each step. It prints
JSON: whether the shared buffer works (same greedy tokens, max |Δlogit|), prefill and decode step
times, and with --profile OpenVINO's per-node-type time of a decode step (PERF_COUNT).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def kv_inputs(model: Any) -> list[tuple[str, str]]:
    """(past name, present name) per layer and kind, from the graph's own names."""
    names = {n for port in model.inputs for n in port.get_names()}
    pairs = []
    for name in sorted(n for n in names if n.startswith("past_key_values.")):
        _, layer, kind = name.split(".")
        pairs.append((name, f"present.{layer}.{kind}"))
    return pairs


class Stepper:
    def __init__(self, compiled: Any, pairs: list[tuple[str, str]], shape: list[int], *, shared: bool) -> None:
        import openvino as ov

        self.request = compiled.create_infer_request()
        self.pairs, self.shared = pairs, shared
        self.buffers = {past: np.zeros(shape, dtype=np.float32) for past, _ in pairs}
        self.max_length = shape[2]
        for past, present in pairs:
            tensor = ov.Tensor(self.buffers[past], shared_memory=True)
            self.request.set_tensor(past, tensor)
            if shared:
                self.request.set_tensor(present, tensor)

    def step(self, ids: list[int], past: int) -> np.ndarray:
        import openvino as ov

        T = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "position_ids": np.arange(past, past + T, dtype=np.int64)[None],
                "attention_mask": np.ones((1, past + T), dtype=np.int64)}
        for name, value in feed.items():
            self.request.set_tensor(name, ov.Tensor(value))
        self.request.infer()
        if not self.shared:
            for past_name, present in self.pairs:
                out = self.request.get_tensor(present).data
                if out.shape == self.buffers[past_name].shape:
                    np.copyto(self.buffers[past_name], out)
                else:  # a present of the used length only: copy that part
                    self.buffers[past_name][:, :, : out.shape[2]] = out
        return np.array(self.request.get_tensor("logits").data).reshape(-1)[-self.vocab:]

    vocab = 0


def run(stepper: Stepper, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray], float, list[float]]:
    t0 = time.perf_counter()
    logits = stepper.step(prompt, 0)
    prefill = time.perf_counter() - t0
    tokens, all_logits, steps = [], [], []
    past = len(prompt)
    for _ in range(n):
        token = int(np.argmax(logits))
        tokens.append(token)
        all_logits.append(logits.copy())
        if len(tokens) == n:
            break
        t0 = time.perf_counter()
        logits = stepper.step([token], past)
        steps.append(time.perf_counter() - t0)
        past += 1
    return tokens, all_logits, prefill, steps


def main() -> int:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--precision", default="f32", help="INFERENCE_PRECISION_HINT: f32 or bf16")
    args = parser.parse_args()
    ref = np.load(args.ref)
    prompt, ref_tokens, ref_logits = ref["prompt"].tolist(), ref["tokens"].tolist(), ref["logits"]
    core = ov.Core()
    model = core.read_model(str(args.onnx))
    pairs = kv_inputs(model)
    shape = list(ref["kv_shape"])
    report: dict[str, Any] = {"openvino": ov.__version__, "layers_x_kinds": len(pairs),
                              "present_shape": str(model.output(pairs[0][1]).get_partial_shape())}
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": bool(args.profile),
              "INFERENCE_PRECISION_HINT": args.precision}
    t0 = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    report["compile_s"] = time.perf_counter() - t0
    Stepper.vocab = ref_logits.shape[1]
    for shared in (True, False):
        key = "shared_buffer" if shared else "copy_present"
        try:
            stepper = Stepper(compiled, pairs, shape, shared=shared)
            run(stepper, prompt, 4)  # warm-up
            tokens, logits, prefill, steps = run(Stepper(compiled, pairs, shape, shared=shared), prompt, len(ref_tokens))
        except Exception as e:  # refused: say so, try the other way
            report[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            continue
        report[key] = {"same_greedy_tokens": tokens == ref_tokens,
                       "first_divergence": next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None),
                       "max_abs_dlogit_first": float(np.abs(logits[0] - ref_logits[0]).max()),
                       "max_abs_dlogit_all_steps": float(np.abs(np.stack(logits) - ref_logits[:len(logits)]).max()),
                       "prefill_ms": prefill * 1e3, "decode_ms_median": statistics.median(steps) * 1e3,
                       "decode_tok_s": 1 / statistics.median(steps)}
        if shared:  # did OpenVINO write into our buffer, or hand back memory of its own?
            past0, present0 = pairs[0]
            report[key]["present_is_the_past_buffer"] = bool(
                np.asarray(stepper.request.get_tensor(present0).data).ctypes.data == stepper.buffers[past0].ctypes.data)
        if args.profile and shared and tokens == ref_tokens:
            stepper.step([tokens[0]], len(prompt))
            by_type: dict[str, float] = collections.Counter()
            for info in stepper.request.profiling_info:
                by_type[info.node_type] += info.real_time.total_seconds() * 1e3
            total = sum(by_type.values())
            report["profile_decode_ms_by_node_type"] = {k: round(v, 3) for k, v in by_type.most_common(15)}
            report["profile_decode_ms_total"] = total
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
