"""By-hand micro-benchmark of the KV-cache engine: ITL vs context, int8 vs fp32, batch 8 vs 1.

Exports a GPT-2-shaped model (random weights) once per precision as the static-cache graph (each
export in a child process, for its time and peak RSS), then runs it through serving.engine.runtime's
OrtRuntime and a KVPool, as the server does:

  .venv/bin/python scripts/bench_kv.py                      # gpt2 shape, fp32 and int8
  .venv/bin/python scripts/bench_kv.py --precisions fp32 --baseline   # + the plain concat export
  .venv/bin/python scripts/bench_kv.py --preset tiny --steps 10       # a quick smoke run

ITL is the median (and 10th percentile) over --steps single-token steps around each context (a
real prefill gets there); every case steps once per round, interleaved, so that load from other
processes hits all cases alike. The baseline is the dynamic (past ++ new) graph stepped with
session.run. Numbers on a shared machine are noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from serving import tensors
from serving.engine.runtime import OrtRuntime

ROOT = Path(__file__).resolve().parents[1]

EXPORT_CHILD = """
import json, resource, sys, time, torch
from export.config import GPTConfig
from export.model import GPT
from export.onnx import export_onnx
preset, kv_cache, precision, path, validate = sys.argv[1:6]
torch.manual_seed(0)
model = GPT(GPTConfig.from_preset(preset)).eval()
t0 = time.perf_counter()
result = export_onnx(model, path, kv_cache=kv_cache, precision=precision, validate=validate == "1")
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": result.bytes, "fusions": result.fusions.get("fused"),
                  "validation": result.validation.overall.__dict__ if result.validation else None,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def export(preset: str, kv_cache: str, precision: str, path: Path, *, validate: bool) -> dict:
    """Export in a child process, so that its peak RSS is the export's alone."""
    out = subprocess.run([sys.executable, "-c", EXPORT_CHILD, preset, kv_cache, precision, str(path),
                          "1" if validate else "0"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"export failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def p10_ms(times: list[float]) -> float:
    """The 10th percentile: on a shared machine, closer to the uncontended time than the median."""
    return 1e3 * float(np.percentile(times, 10))


class Timer:
    """Wall and process-CPU time of each timed call."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> "Timer":
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.times.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


WARMUP = 3


PAIR = 2  # steps per case per round: the first warms the caches with this case's weights, untimed


def window_start(rt: OrtRuntime, ctx: int, steps: int) -> int:
    """Where the steps start: centred on ctx, ending inside the context length."""
    n = PAIR * (WARMUP + steps)
    start = ctx - n // 2
    limit = rt.n_positions or ctx + n
    return max(1, min(start, limit - n))


class StaticCase:
    """Rows of one pool prefilled to `start`, stepped together (batch rows) one token a step."""

    def __init__(self, rt: OrtRuntime, *, start: int, batch: int, steps: int, rng) -> None:
        self.rt, self.start, self.batch, self.rng = rt, start, batch, rng
        self.pool = rt.new_pool(max_sequences=batch, max_length=start + PAIR * (WARMUP + steps))
        t0 = time.perf_counter()
        for slot in range(batch):  # prompts run one per call, as the scheduler runs them
            rt.step(rng.integers(0, rt.vocab_size, (1, start)), pool=self.pool, slot_start=slot, past_lengths=[0])
        self.prefill_ms = 1e3 * (time.perf_counter() - t0) / batch
        self.i, self.timer = 0, Timer()

    def step(self, *, timed: bool = True) -> None:
        tokens = self.rng.integers(0, self.rt.vocab_size, (self.batch, 1))
        with self.timer if timed else nullcontext():
            self.rt.step(tokens, pool=self.pool, slot_start=0, past_lengths=np.full(self.batch, self.start + self.i))
        self.i += 1


class DynamicCase:
    """The concat graph: session.run with the presents fed back as the next past."""

    def __init__(self, rt: OrtRuntime, *, start: int, rng) -> None:
        self.rt, self.n, self.rng = rt, start, rng
        ids = rng.integers(0, rt.vocab_size, (1, start))
        feeds = {tensors.INPUT_IDS: ids, tensors.POSITION_IDS: np.arange(start)[None],
                 tensors.ATTENTION_MASK: np.ones((1, start), np.int64), **rt.empty_past(1)}
        self._next(rt.run(feeds))
        self.timer, self.prefill_ms, self.batch = Timer(), None, 1

    def _next(self, out: dict) -> None:
        self.feeds = {tensors.INPUT_IDS: self.rng.integers(0, self.rt.vocab_size, (1, 1)),
                      tensors.POSITION_IDS: np.array([[self.n]]),
                      tensors.ATTENTION_MASK: np.ones((1, self.n + 1), np.int64)}
        for layer in range(self.rt.n_layer):
            self.feeds[tensors.past_key(layer)] = out[tensors.present_key(layer)]
            self.feeds[tensors.past_value(layer)] = out[tensors.present_value(layer)]

    def step(self, *, timed: bool = True) -> None:
        with self.timer if timed else nullcontext():
            out = self.rt.run(self.feeds)
        self.n += 1
        self._next(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--contexts", default="100,1000")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--baseline", action="store_true", help="also time the dynamic (concat) graph")
    parser.add_argument("--validate", action="store_true", help="validate each export against PyTorch")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the exports here")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    contexts = [int(c) for c in args.contexts.split(",")]
    lo, hi = contexts[0], contexts[-1]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_kv-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    results: dict = {"preset": args.preset, "contexts": contexts, "steps": args.steps, "batch": args.batch}
    graphs = [("static", p) for p in args.precisions.split(",")] + ([("dynamic", "fp32")] if args.baseline else [])

    cases: dict[tuple[str, str], object] = {}  # (graph, case) -> StaticCase | DynamicCase
    for kv_cache, precision in graphs:
        path = workdir / f"{args.preset}-{kv_cache}-{precision}.onnx"
        name = f"{kv_cache}/{precision}"
        if path.exists():
            print(f"[{name}] using {path}", flush=True)
            info: dict = {"reused": str(path)}
        else:
            print(f"[{name}] exporting ...", flush=True)
            info = export(args.preset, kv_cache, precision, path, validate=args.validate)
            print(f"[{name}] export {info['seconds']:.1f} s, {info['bytes'] / 2**20:.0f} MiB, peak RSS "
                  f"{info['peak_rss_gib']:.2f} GiB, fused {info['fusions']}", flush=True)
        results[name] = info
        rt = OrtRuntime(path, intra_op_threads=args.threads)
        for ctx in contexts:
            start = window_start(rt, ctx, args.steps)
            cases[(name, f"b1@{ctx}")] = (StaticCase(rt, start=start, batch=1, steps=args.steps, rng=rng)
                                          if kv_cache == "static" else DynamicCase(rt, start=start, rng=rng))
        if kv_cache == "static" and args.batch > 1:
            start = window_start(rt, lo, args.steps)
            cases[(name, f"b{args.batch}@{lo}")] = StaticCase(rt, start=start, batch=args.batch,
                                                               steps=args.steps, rng=rng)

    # every case steps in every round (in a new order each round), so load changes on a shared
    # machine hit all of them alike; within a round a case runs PAIR steps back to back and only
    # the last is timed, so that it sees its own weights in the caches, as a serving loop does
    print(f"timing {len(cases)} cases x {WARMUP + args.steps} interleaved rounds ...", flush=True)
    order = list(cases.values())
    for _ in range(WARMUP + args.steps):
        rng.shuffle(order)
        for case in order:
            for k in range(PAIR):
                case.step(timed=k == PAIR - 1)

    for (name, label), case in cases.items():
        wall, cpu = case.timer.times[WARMUP:], case.timer.cpu[WARMUP:]
        itl = median_ms(wall)
        results[name][label] = {"itl_ms": itl, "itl_p10_ms": p10_ms(wall), "cpu_ms": median_ms(cpu),
                                "prefill_ms": case.prefill_ms}
        prefill = f", prefill {case.prefill_ms:.0f} ms" if case.prefill_ms else ""
        print(f"[{name}] {label}: step median {itl:.1f} ms, p10 {p10_ms(wall):.1f} ms, cpu {median_ms(cpu):.1f} ms "
              f"({1e3 * case.batch / itl:.1f} tokens/s){prefill}", flush=True)
    print("---", flush=True)
    for kv_cache, precision in graphs:
        name = f"{kv_cache}/{precision}"
        r = results[name]
        r["itl_ratio"] = r[f"b1@{hi}"]["itl_ms"] / r[f"b1@{lo}"]["itl_ms"]
        r["itl_ratio_p10"] = r[f"b1@{hi}"]["itl_p10_ms"] / r[f"b1@{lo}"]["itl_p10_ms"]
        print(f"[{name}] ITL context {hi} / context {lo}: {r['itl_ratio']:.2f} (median), "
              f"{r['itl_ratio_p10']:.2f} (p10)", flush=True)
        if f"b{args.batch}@{lo}" in r:
            r["batch_cost_ratio"] = r[f"b{args.batch}@{lo}"]["itl_ms"] / r[f"b1@{lo}"]["itl_ms"]
            print(f"[{name}] batch {args.batch} step / batch 1 step at context {lo}: {r['batch_cost_ratio']:.2f}"
                  f" ({args.batch / r['batch_cost_ratio']:.1f}x the tokens/s)", flush=True)
    if "static/fp32" in results and "static/int8" in results:
        for ctx in contexts:
            fp32, int8 = results["static/fp32"][f"b1@{ctx}"], results["static/int8"][f"b1@{ctx}"]
            results[f"int8_speedup@{ctx}"] = speedup = fp32["itl_ms"] / int8["itl_ms"]
            print(f"int8 / fp32 speed, batch 1, context {ctx}: {speedup:.2f}x (median), "
                  f"{fp32['itl_p10_ms'] / int8['itl_p10_ms']:.2f}x (p10)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
