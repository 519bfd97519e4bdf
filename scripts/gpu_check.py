"""The TensorRT GPU check (run by scripts/gpu_check.sh): engines for the demo model and the
GPT-2 124M shape, logits and greedy parity against PyTorch, ITL and tokens/s at batch 1 and 16,
one JSON report. Needs a CUDA GPU, torch, tensorrt and cuda-python.

Checks per model (every engine goes through serving.engine.runtime_trt.TrtRuntime and the
serving Scheduler, as in the Triton `gpt` model):
- logits: 16 prompts of different lengths, prefill then DECODE teacher-forced steps (both sides
  read PyTorch's greedy tokens), against PyTorch fp32 on the GPU with TF32 off:
  fp32 engine: max |Δlogit| <= 1e-3; fp16 engine: rms(Δ)/std(logits) <= 0.02 per position and
  top-1 agreement >= 0.99 where PyTorch's top-1 leads by >= 0.1 (export/onnx/validate.py TOLERANCES);
- greedy parity: free-running greedy continuations of 4 prompts, engine vs PyTorch; fp32 must
  match exactly, fp16 may only diverge where PyTorch's top-2 margin is < 0.1 (a near-tie);
- speed: ITL (median decode step) and tokens/s at batch 1 and 16, context 32 -> 32 + STEPS.

Usage: python scripts/gpu_check.py --out gpu_check_out [--deadline-s 450]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the .sh may not install)

DECODE = 24
BENCH_STEPS = 64
FP16_TOL = dict(max_rel_logits=0.02, min_agreement=0.99, decisive_margin=0.1)
FP32_MAX_ABS = 1e-3


def _now() -> float:
    return time.perf_counter()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = _now() + seconds

    def left(self) -> float:
        return self.end - _now()


def environment() -> dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        from serving.engine.gpu_libs import import_tensorrt

        env["tensorrt"] = import_tensorrt().__version__
    except Exception as e:  # reported, not fatal here: the .sh checked already
        env["tensorrt"] = f"unavailable: {e}"
    return env


def make_model(name: str) -> tuple[Any, str]:
    """(model on CPU in fp32, where its weights come from)."""
    import torch

    from export.config import GPTConfig
    from export.model import GPT

    if name == "demo" and os.environ.get("GPU_CHECK_DEMO", "trained") == "trained":
        from export.demo import load_demo

        model, _ = load_demo(progress=False)
        return model.float().eval(), "trained demo (export/demo/)"
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(name)).eval(), f"random weights, {name} preset"


def prompts(vocab: int, n: int, *, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(length)).tolist() for length in rng.integers(4, 40, n)]


class Reference:
    """PyTorch on the GPU, fp32, TF32 off, with its KV cache: one sequence at a time."""

    def __init__(self, model: Any) -> None:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.torch = torch
        self.model = model.cuda().eval()

    def teacher_forced(self, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """PyTorch's greedy tokens and the logits after the prompt and after each, (steps + 1, V)."""
        torch = self.torch
        with torch.no_grad():
            logits, past = self.model(torch.tensor([prompt], device="cuda"), last_only=True)
            fed, out = [], [logits[0].float().cpu().numpy()]
            for _ in range(steps):
                token = int(logits[0].argmax())
                fed.append(token)
                logits, past = self.model(torch.tensor([[token]], device="cuda"), past_key_values=past, last_only=True)
                out.append(logits[0].float().cpu().numpy())
        return fed, np.stack(out)


def compare(ref: np.ndarray, got: np.ndarray, margin: float) -> dict[str, Any]:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = got - ref
    rel = np.sqrt((diff ** 2).mean(axis=1)) / np.maximum(ref.std(axis=1), 1e-12)
    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= margin
    agree = ref.argmax(1) == got.argmax(1)
    return {"positions": int(len(ref)), "max_abs_logits": float(np.abs(diff).max()), "max_rel_logits": float(rel.max()),
            "decisive": int(decisive.sum()),
            "agreement_decisive": float(agree[decisive].mean()) if decisive.any() else None,
            "agreement_all": float(agree.mean()), "finite": bool(np.isfinite(got).all())}


def check_logits(runtime: Any, reference: Reference, vocab: int, precision: str) -> dict[str, Any]:
    from serving.engine.scheduler import Scheduler, StepRequest

    ps = prompts(vocab, 16, seed=1)
    pool = runtime.new_pool(max_sequences=16, max_length=reference.model.config.n_positions)
    scheduler = Scheduler(runtime, pool, vocab_size=vocab)
    refs, fed = zip(*((logits, tokens) for tokens, logits in (reference.teacher_forced(p, DECODE) for p in ps)))
    got = {i: [] for i in range(len(ps))}
    results = scheduler.step([StepRequest(i, np.array(p), start=True) for i, p in enumerate(ps)])
    for i, r in enumerate(results):
        if r.error:
            raise RuntimeError(r.error)
        got[i].append(r.logits)
    for step in range(DECODE):
        requests = [StepRequest(i, np.array([fed[i][step]])) for i in range(len(ps))]
        for i, r in enumerate(scheduler.step(requests)):
            if r.error:
                raise RuntimeError(r.error)
            got[i].append(r.logits)
    stats = compare(np.concatenate(refs), np.concatenate([np.stack(got[i]) for i in range(len(ps))]),
                    FP16_TOL["decisive_margin"])
    stats["runtime_calls"] = scheduler.stats.runtime_calls
    stats["max_rows_in_call"] = scheduler.stats.max_rows_in_call
    if precision == "fp32":
        stats["tolerance"] = {"max_abs_logits": FP32_MAX_ABS}
        stats["ok"] = stats["finite"] and stats["max_abs_logits"] <= FP32_MAX_ABS
    else:
        stats["tolerance"] = FP16_TOL
        agreement = stats["agreement_decisive"]
        stats["ok"] = stats["finite"] and stats["max_rel_logits"] <= FP16_TOL["max_rel_logits"] and (
            agreement is None or agreement >= FP16_TOL["min_agreement"])
    return stats


def check_greedy(runtime: Any, reference: Reference, vocab: int, precision: str, steps: int = 32) -> dict[str, Any]:
    from serving.engine.scheduler import Scheduler, StepRequest

    ps = prompts(vocab, 4, seed=2)
    pool = runtime.new_pool(max_sequences=4, max_length=reference.model.config.n_positions)
    scheduler = Scheduler(runtime, pool, vocab_size=vocab)
    engine_tokens: dict[int, list[int]] = {i: [] for i in range(len(ps))}
    results = scheduler.step([StepRequest(i, np.array(p), start=True) for i, p in enumerate(ps)])
    for _ in range(steps):
        for i, r in enumerate(results):
            engine_tokens[i].append(int(r.logits.argmax()))
        results = scheduler.step([StepRequest(i, np.array([engine_tokens[i][-1]])) for i in range(len(ps))])
    rows = []
    for i, p in enumerate(ps):
        ref_tokens, logits = reference.teacher_forced(p, steps)  # PyTorch's own greedy = free-running
        first = next((k for k, (a, b) in enumerate(zip(ref_tokens, engine_tokens[i])) if a != b), None)
        margin = None
        if first is not None:
            top2 = np.sort(logits[first])[-2:]
            margin = float(top2[1] - top2[0])
        rows.append({"prompt_tokens": len(p), "matched": steps if first is None else first, "first_divergence": first,
                     "reference_margin_there": margin})
    if precision == "fp32":
        ok = all(r["first_divergence"] is None for r in rows)
    else:
        ok = all(r["first_divergence"] is None or r["reference_margin_there"] < FP16_TOL["decisive_margin"] for r in rows)
    return {"steps": steps, "sequences": rows, "ok": ok,
            "rule": "fp32: identical; fp16: any divergence only at a near-tie (reference top-2 margin < 0.1)"}


def bench(runtime: Any, vocab: int, batch: int, n_positions: int) -> dict[str, Any]:
    from serving.engine.scheduler import Scheduler, StepRequest

    pool = runtime.new_pool(max_sequences=batch, max_length=n_positions)
    scheduler = Scheduler(runtime, pool, vocab_size=vocab)
    rng = np.random.default_rng(3)
    prompt_len = 32
    t0 = _now()
    scheduler.step([StepRequest(i, rng.integers(0, vocab, prompt_len), start=True) for i in range(batch)])
    prefill_s = _now() - t0
    steps = min(BENCH_STEPS, n_positions - prompt_len - 1)
    times = []
    for _ in range(steps):
        requests = [StepRequest(i, rng.integers(0, vocab, 1)) for i in range(batch)]
        t = _now()
        results = scheduler.step(requests)
        times.append(_now() - t)
        assert all(r.error is None for r in results)
    warm = np.array(times[2:])  # the first decode steps capture CUDA graphs
    return {"batch": batch, "prompt_tokens": prompt_len, "decode_steps": steps, "prefill_s": round(prefill_s, 4),
            "itl_ms_median": round(float(np.median(warm)) * 1e3, 3),
            "itl_ms_p90": round(float(np.percentile(warm, 90)) * 1e3, 3),
            "tokens_per_s": round(batch / float(warm.mean()), 1), "runtime_calls": scheduler.stats.runtime_calls}


def run_model(name: str, out: Path, deadline: Deadline, report: dict[str, Any]) -> None:
    from export.tensorrt.build import build_engine
    from export.tensorrt.coverage import check_onnx_for_tensorrt
    from export.onnx import export_onnx
    from serving.engine.runtime_trt import TrtRuntime

    entry: dict[str, Any] = report.setdefault("models", {}).setdefault(name, {})
    t = _now()
    model, source = make_model(name)
    entry["weights"] = source
    entry["config"] = model.config.to_dict()
    onnx_path = out / f"{name}_dynamic.onnx"
    export_onnx(model, onnx_path, kv_cache="dynamic", precision="fp32", validate=False)
    entry["export_s"] = round(_now() - t, 1)
    compat = check_onnx_for_tensorrt(onnx_path)
    entry["op_check"] = {"ok": compat.ok, "op_counts": dict(compat.op_counts),
                         "problems": [p.message for p in compat.problems]}
    reference = Reference(model)
    precisions = ["fp16"] + (["fp32"] if name == "demo" else [])
    for precision in precisions:
        if deadline.left() < 60:
            entry[precision] = {"skipped": "time budget"}
            continue
        result: dict[str, Any] = entry.setdefault(precision, {})
        plan = out / f"{name}_{precision}.plan"
        summary = build_engine(onnx_path, plan, precision=precision, max_batch=16, progress=False,
                                          timing_cache=out / "timing.cache")
        result["engine"] = {k: v for k, v in summary.to_dict().items() if k not in ("io", "config")}
        runtime = TrtRuntime(plan)
        result["logits"] = _guard(lambda: check_logits(runtime, reference, model.config.vocab_size, precision))
        result["greedy"] = _guard(lambda: check_greedy(runtime, reference, model.config.vocab_size, precision))
        result["speed"] = [_guard(lambda b=b: bench(runtime, model.config.vocab_size, b, model.config.n_positions))
                           for b in (1, 16) if deadline.left() > 30]
        result["cuda_graphs"] = {"enabled": runtime.engine.cuda_graphs, "captured": len(runtime.engine._graphs)}
        _write(report, out)


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}


def _write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


def verdict(report: dict[str, Any]) -> bool:
    oks = []
    for model in report.get("models", {}).values():
        if "error" in model:
            return False
        oks.append(model.get("op_check", {}).get("ok", False))
        for precision in ("fp16", "fp32"):
            result = model.get(precision)
            if result and "skipped" not in result:
                oks += [result.get("logits", {}).get("ok", False), result.get("greedy", {}).get("ok", False)]
                oks += [("error" not in s) for s in result.get("speed", [])]
    return bool(oks) and all(oks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--deadline-s", type=float, default=450.0, help="stop starting new work after this")
    parser.add_argument("--models", default="gpt2,demo", help="gpt2 first: its speed is the headline")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.deadline_s)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "environment": environment()}
    for name in args.models.split(","):
        if deadline.left() < 90:
            report.setdefault("models", {})[name] = {"skipped": "time budget"}
            continue
        try:
            run_model(name, args.out, deadline, report)
        except Exception as e:
            report.setdefault("models", {}).setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            report["models"][name]["traceback"] = traceback.format_exc(limit=12)
        _write(report, args.out)
    report["ok"] = verdict(report)
    report["seconds"] = round(args.deadline_s - deadline.left(), 1)
    _write(report, args.out)
    print(json.dumps({"ok": report["ok"], "report": str(args.out / "gpu_check.json")}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
