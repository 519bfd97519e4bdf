"""By-hand check and paired timing of the peer engines (llama.cpp, OpenVINO GenAI) on gptpipe's weights.

Needs the peer venv (bash scripts/install_peers.sh). Runs in the project venv:

  .venv/bin/python scripts/bench_peers.py --work ~/.cache/gptpipe/peers-work --out peers.json
  .venv/bin/python scripts/bench_peers.py --skip-timing        # only the correctness check

1. Weights: `demo` and `gpt2-random` from export.sources.load_model, written as Hugging Face
   folders (save_model); each converted with serving.bench.peers.convert to GGUF (f32, q8_0, q4_0) and
   OpenVINO IR (fp32, int8, int4), and exported with `export-model` (fp32, int8) for the
   in-process ONNX Runtime loop (serving.bench.ort_loop.OrtLoop). Everything is kept in --work.
2. Correctness: the demo model's greedy tokens (AGREEMENT_PROMPTS, 32 tokens each) from every
   peer and precision against the PyTorch reference (export.model), position by position, plus
   max |logit difference| after each prompt; on gpt2-random (near-flat random logits, so greedy
   agreement says little) the max |logit difference| after a 128-token prompt.
3. Paired timing on gpt2-random: each repeat sends the same prompt to the ORT loop, then to each
   peer of that precision, in turn; decode tok/s and TTFT per engine (medians) and the per-repeat
   ratios ORT / peer (medians). OpenVINO's ContinuousBatchingPipeline at --streams prompts at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from serving.bench import peers
from serving.bench.ort_loop import AGREEMENT_NEW_TOKENS, OrtLoop
from serving.bench.probes import machine_info
from serving.bench.served import read_repository
from serving.bench.stats import greedy_agreement, random_prompts
from serving.bench.targets import AGREEMENT_PROMPTS

GGUF = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
OV = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
ONNX = ("fp32", "int8")
# (key, gptpipe precision, engine, OpenVINO precision): OpenVINO fp32 twice, in f32 (the function
# PyTorch computes) and with its CPU defaults (bf16 compute, f16 KV cache where the CPU has AMX);
# its int8/int4 IRs with its defaults (int8 dynamic quantization of activations, as llama.cpp's
# q8_0/q4_0 and ORT's int8 MatMulInteger quantize theirs)
PEERS = (("llama.cpp-fp32", "fp32", "llama.cpp", ""), ("openvino-fp32", "fp32", "openvino", "f32"),
         ("openvino-fp32-ovdefault", "fp32", "openvino", "default"),
         ("llama.cpp-int8", "int8", "llama.cpp", ""), ("openvino-int8", "int8", "openvino", "default"),
         ("llama.cpp-int4", "int4", "llama.cpp", ""), ("openvino-int4", "int4", "openvino", "default"))


def say(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ----------------------------------------------------------------------------- artefacts


def prepare(work: Path, source: str, *, threads: int, onnx: bool = True) -> dict[str, Path]:
    """HF folder, GGUF files, IR folders and ONNX repositories for one source (made once)."""
    base = work / source
    hf = base / "hf"
    if not (hf / "model.safetensors").is_file():
        from export.load import save_model
        from export.sources import load_model

        model, tok = load_model(source)
        save_model(model, tok, hf)
    paths: dict[str, Path] = {"hf": hf}
    todo = [GGUF[p] for p in GGUF if not (base / "gguf" / f"{GGUF[p]}.gguf").is_file()]
    if todo:
        say(f"{source}: GGUF {todo}")
        for r in peers.convert("gguf", hf, base / "gguf", types=["f32", *todo], threads=threads):
            say("  ", r)
    todo = [OV[p] for p in OV if not (base / "ov" / OV[p] / "openvino_model.xml").is_file()]
    if todo:
        say(f"{source}: OpenVINO IR {todo}")
        for r in peers.convert("openvino", hf, base / "ov", types=todo):
            say("  ", r)
    tokenizer = hf / "tokenizer.json" if (hf / "tokenizer.json").is_file() else base / "gguf" / "hf" / "tokenizer.json"
    for p in ONNX if onnx else ():
        repo = base / f"onnx-{p}"
        if not (repo / "gpt" / "config.pbtxt").is_file():
            say(f"{source}: export-model {p}")
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).with_name("export-model")), "--model", str(hf), "--tokenizer",
                            str(tokenizer), "--precision", p, "--max-batch-size", "1", "--output", str(repo),
                            "--force"], check=True, timeout=3600)
            say(f"   {time.perf_counter() - t0:.0f} s")
        paths[f"onnx-{p}"] = repo
    for p in GGUF:
        paths[f"gguf-{p}"] = base / "gguf" / f"{GGUF[p]}.gguf"
        paths[f"ov-{p}"] = base / "ov" / OV[p]
    return paths


def open_peer(key: str, paths: dict[str, Path], *, threads: int, n_ctx: int) -> peers.PeerWorker:
    _, precision, engine, ov_precision = next(spec for spec in PEERS if spec[0] == key)
    if engine == "llama.cpp":
        return peers.PeerWorker(engine, paths[f"gguf-{precision}"], threads=threads, n_ctx=n_ctx)
    return peers.PeerWorker(engine, paths[f"ov-{precision}"], threads=threads, ov_precision=ov_precision)


# ----------------------------------------------------------------------------- correctness


def check(paths: dict[str, Path], prompts: Sequence[Sequence[int]], reference: Callable[[Sequence[int], int], Any],
          *, new_tokens: int, threads: int, n_ctx: int) -> dict[str, Any]:
    """Per engine-precision: greedy agreement with the reference and max |Δlogit| after each prompt."""
    ref = [reference(p, new_tokens) for p in prompts]  # (logits, tokens)
    out: dict[str, Any] = {}
    for key, *_ in PEERS:
        with open_peer(key, paths, threads=threads, n_ctx=n_ctx) as peer:
            tokens = [list(peer.generate(p, new_tokens).token_ids) for p in prompts]
            dlogit = max(float(np.abs(peer.logits(p) - r[0]).max()) for p, r in zip(prompts, ref))
        out[key] = {"greedy_agreement": greedy_agreement([r[1] for r in ref], tokens), "max_abs_dlogit": dlogit,
                    "first_token_agreement": float(np.mean([t[0] == r[1][0] for t, r in zip(tokens, ref)]))}
        say(f"  {key:16s} agreement {out[key]['greedy_agreement']:.3f}  max|Δlogit| {dlogit:.2e}")
    for p in (p for p in ONNX if f"onnx-{p}" in paths):
        loop = OrtLoop(read_repository(paths[f"onnx-{p}"]).engine, threads=threads)
        tokens = [list(loop.generate(q, new_tokens).tokens) for q in prompts]
        out[f"ort-{p}"] = {"greedy_agreement": greedy_agreement([r[1] for r in ref], tokens)}
        say(f"  ort-{p:12s} agreement {out[f'ort-{p}']['greedy_agreement']:.3f}")
    return out


def torch_reference(hf: Path, *, threads: int) -> Callable[[Sequence[int], int], Any]:
    import torch

    from export.sources import load_model
    from export.model import generate_greedy

    torch.set_num_threads(threads)
    model, _ = load_model(hf)

    def reference(prompt: Sequence[int], n: int) -> tuple[np.ndarray, list[int]]:
        with torch.inference_mode():
            logits, _ = model(torch.tensor([list(prompt)]), last_only=True)
            return logits[0].float().numpy(), generate_greedy(model, list(prompt), n)

    return reference


# ----------------------------------------------------------------------------- timing


def timing(paths: dict[str, Path], *, prompt_tokens: int, new_tokens: int, repeats: int, threads: int,
           streams: int, vocab_size: int) -> dict[str, Any]:
    prompts = random_prompts(repeats + 1, prompt_tokens, vocab_size=vocab_size, seed=128)
    n_ctx = prompt_tokens + new_tokens + 8
    runs: dict[str, list[dict[str, float]]] = {}
    engines: dict[str, Callable[..., tuple[float, float]]] = {}
    workers: list[peers.PeerWorker] = []
    try:
        for p in GGUF:
            if f"onnx-{p}" in paths:
                loop = OrtLoop(read_repository(paths[f"onnx-{p}"]).engine, threads=threads)

                def ort(prompt: Sequence[int], n: int = new_tokens, loop: OrtLoop = loop) -> tuple[float, float]:
                    t = loop.generate(prompt, n)
                    return t.decode_tokens_per_s, t.ttft

                engines[f"ort-{p}"] = ort
            for key in (spec[0] for spec in PEERS if spec[1] == p):
                worker = open_peer(key, paths, threads=threads, n_ctx=n_ctx)
                workers.append(worker)

                def peer(prompt: Sequence[int], n: int = new_tokens,
                         worker: peers.PeerWorker = worker) -> tuple[float, float]:
                    r = worker.generate(prompt, n)
                    return r.decode_tokens_per_s, r.ttft_s

                engines[key] = peer
        say("timing: warm-up")
        for run in engines.values():
            run(prompts[-1], 8)  # the first call compiles / allocates
        for i in range(repeats):
            for key, run in engines.items():  # one precision after another, the ORT loop first in each
                tps, ttft = run(prompts[i])
                runs.setdefault(key, []).append({"decode_tok_s": tps, "ttft_s": ttft})
            say(f"  repeat {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]['decode_tok_s']:.1f}" for k, v in runs.items()))
    finally:
        for w in workers:
            w.close()
    out: dict[str, Any] = {"engines": {}, "ratios": {}}
    for key, rs in runs.items():
        out["engines"][key] = {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rs),
                               "ttft_ms_median": 1e3 * statistics.median(r["ttft_s"] for r in rs), "runs": rs}
    for p in GGUF:
        for peer_key in (spec[0] for spec in PEERS if spec[1] == p):
            if f"ort-{p}" in runs and peer_key in runs:
                pairs = zip(runs[f"ort-{p}"], runs[peer_key])
                out["ratios"][f"ort_vs_{peer_key}"] = {
                    "decode": statistics.median(a["decode_tok_s"] / b["decode_tok_s"] for a, b in pairs),
                    "ttft": statistics.median(a["ttft_s"] / b["ttft_s"] for a, b in zip(runs[f"ort-{p}"], runs[peer_key]))}
    if streams > 1:
        say(f"timing: OpenVINO continuous batching, {streams} streams")
        cb_prompts = random_prompts(streams, prompt_tokens, vocab_size=vocab_size, seed=256)
        out["openvino_cb"] = {}
        for ov_precision in peers.OV_PRECISIONS:
            with peers.PeerWorker("openvino-cb", paths["ov-fp32"], threads=threads, ov_precision=ov_precision) as cb:
                cb.batch(cb_prompts[:2], 8)  # warm-up
                walls = [cb.batch(cb_prompts, new_tokens)[1] for _ in range(2)]
            out["openvino_cb"][ov_precision] = {"streams": streams, "walls_s": walls,
                                                "aggregate_tok_s": streams * new_tokens / min(walls)}
            say(f"  {ov_precision}: {out['openvino_cb'][ov_precision]['aggregate_tok_s']:.1f} tok/s aggregate")
    return out


def ov_on_onnx(paths: dict[str, Path], work: Path, *, prompt_tokens: int, new_tokens: int, threads: int,
               vocab_size: int, profile: bool) -> dict[str, Any]:
    """OpenVINO's runtime on the static-cache ONNX graph (scripts/peers/ov_onnx.py), checked
    against serving.engine.runtime's ORT step on the same prompt."""
    from serving.engine.runtime import OrtRuntime

    out: dict[str, Any] = {}
    for p in ONNX:
        engine = read_repository(paths[f"onnx-{p}"]).engine
        runtime = OrtRuntime(engine, intra_op_threads=threads)
        pool = runtime.new_pool(max_sequences=1, max_length=json.loads(
            (paths["hf"] / "config.json").read_text())["n_positions"])
        prompt = random_prompts(1, prompt_tokens, vocab_size=vocab_size, seed=77)[0]
        logits = runtime.step(np.asarray([prompt]), pool=pool, slot_start=0, past_lengths=np.zeros(1, dtype=np.int64))
        tokens, rows, past = [], [], len(prompt)
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(logits[0])))
            rows.append(logits[0].copy())
            if len(tokens) < new_tokens:
                logits = runtime.step(np.array([[tokens[-1]]]), pool=pool, slot_start=0,
                                      past_lengths=np.array([past], dtype=np.int64))
                past += 1
        ref = work / f"ort-ref-{p}.npz"
        np.savez(ref, prompt=np.asarray(prompt), tokens=np.asarray(tokens), logits=np.stack(rows),
                 kv_shape=np.asarray(pool.keys[0].shape))
        cmd = [str(peers.peers_python(peer="openvino")), str(peers.SCRIPTS / "ov_onnx.py"), "--onnx", str(engine), "--ref", str(ref),
               "--threads", str(threads)] + (["--profile"] if profile else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=peers.child_env())
        if done.returncode != 0:
            out[p] = {"error": done.stderr[-2000:]}
        else:
            out[p] = json.loads(done.stdout)
        say(f"  OpenVINO on the ONNX graph, {p}: {json.dumps(out[p])[:600]}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "gptpipe" / "peers-work")
    parser.add_argument("--out", type=Path, default=Path("peers-bench.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated peer keys to run (default: all of PEERS)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-gpt2", action="store_true", help="the demo check only")
    parser.add_argument("--demo-without-onnx", action="store_true", help="no export-model of the demo (no ORT rows)")
    parser.add_argument("--ov-onnx", action="store_true", help="also run OpenVINO on the static-cache ONNX graph")
    args = parser.parse_args(argv)
    peers.peers_python()  # fail early, with the install command
    if args.only:
        global PEERS
        keep = set(args.only.split(","))
        PEERS = tuple(spec for spec in PEERS if spec[0] in keep)
    report: dict[str, Any] = {"machine": machine_info(), "threads": args.threads, "started": time.strftime("%F %T")}
    if not args.skip_demo:
        say("demo: artefacts")
        demo = prepare(args.work, "demo", threads=args.threads, onnx=not args.demo_without_onnx)
        from serving.tokenizer import Tokenizer

        tok = Tokenizer.from_file(demo["hf"] / "tokenizer.json")
        prompts = [tok.encode(p) for p in AGREEMENT_PROMPTS]
        say("demo: correctness against PyTorch")
        report["demo_check"] = check(demo, prompts, torch_reference(demo["hf"], threads=args.threads),
                                     new_tokens=AGREEMENT_NEW_TOKENS, threads=args.threads, n_ctx=256)
    if args.skip_gpt2:
        args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
        say(f"written {args.out}")
        return 0
    say("gpt2-random: artefacts")
    gpt2 = prepare(args.work, "gpt2-random", threads=args.threads)
    vocab = json.loads((gpt2["hf"] / "config.json").read_text())["vocab_size"]
    say("gpt2-random: logits against PyTorch")
    report["gpt2_check"] = check(gpt2, random_prompts(1, args.prompt_tokens, vocab_size=vocab, seed=9),
                                 torch_reference(gpt2["hf"], threads=args.threads), new_tokens=8,
                                 threads=args.threads, n_ctx=1024)
    if not args.skip_timing:
        report["timing"] = timing(gpt2, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                  repeats=args.repeats, threads=args.threads, streams=args.streams, vocab_size=vocab)
    if args.ov_onnx:
        say("gpt2-random: OpenVINO on the ONNX graph")
        report["ov_on_onnx"] = ov_on_onnx(gpt2, args.work, prompt_tokens=args.prompt_tokens, new_tokens=32,
                                          threads=args.threads, vocab_size=vocab, profile=True)
    report["finished"] = time.strftime("%F %T")
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    say(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
