"""The peer engines in `gptpipe bench` (`--peers openvino,llama.cpp`): the served weights converted
for each peer, checked to compute the served function, then timed request by request against
served requests; the peer rows of bench.json's `ratios`.

Each peer runs in its own worker process of the peer venv (serving.bench.peers, made by
scripts/install_peers.sh). A peer that is not installed, or whose check fails, is recorded with
the reason and the rest of the run goes on. Example::

    entries = measure_peers(served, ("openvino",), prompts=prompts, output_tokens=128,
                            make_generator=lambda: ServedGenerator(url))
    ratios = peer_ratios(entries, precision="fp32")
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serving.bench import peers
from serving.bench.baselines import paired_run
from serving.bench.levels import run_level
from serving.bench.ort_loop import OrtLoop
from serving.bench.progress import NoProgress, Progress
from serving.bench.served import ServedModel
from serving.bench.stats import Generator, judge, random_prompts

logger = logging.getLogger(__name__)

PEERS = peers.PEERS
# (key, comparison, target, what it is): issue 16's rows, in the order bench.json lists them
PEER_TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("served_vs_openvino_fp32", ">=", 1.0, "served decode tokens/s / OpenVINO GenAI LLMPipeline in process, fp32 "
                                           "IR (f32 compute), paired"),
    ("served_vs_openvino_int8", ">=", 1.0, "served decode tokens/s / OpenVINO GenAI, int8 IR, paired"),
    ("served_vs_llamacpp_fp32", ">=", 1.1, "served decode tokens/s / llama.cpp in process, f32 GGUF, paired"),
    ("served_vs_llamacpp_int8", ">=", 1.1, "served decode tokens/s / llama.cpp, q8_0 GGUF, paired"),
    ("served_vs_llamacpp_int4", ">=", 1.1, "served decode tokens/s / llama.cpp, q4_0 GGUF, paired"),
    ("ttft_vs_best_peer", "<=", 0.9, "served TTFT / the faster peer's TTFT (paired), the worst precision measured"),
    ("aggregate8_vs_openvino", ">=", 1.0, "aggregate tokens/s, 8 served streams / OpenVINO GenAI "
                                          "ContinuousBatchingPipeline at 8 (adjacent runs, same prompts), "
                                          "the worst precision measured"),
    ("int4_greedy_agreement", ">=", 0.9, "greedy tokens int4 agrees with fp32 on the demo prompts (demo model)"),
)
ROW_PEER = {"openvino": "openvino", "llamacpp": "llama.cpp"}
# served precision -> (OpenVINO IR weight format, OpenVINO compute precision, GGUF type). fp32 runs
# OpenVINO in f32 (the function PyTorch computes); int8/int4 with its CPU defaults (int8 dynamic
# quantization of activations, as llama.cpp's q8_0/q4_0 and ORT's int8 MatMulInteger do)
FORMATS = {"fp32": ("fp32", "f32", "f32"), "int8": ("int8", "default", "q8_0"), "int4": ("int4", "default", "q4_0")}
# the check before timing: max |peer logit - served engine logit| after a prompt, as a fraction
# of the served logits' range (max - min). fp32 is the same function up to summation order;
# the quantized formats are each engine's own quantizer of the same fp32 weights, so they differ
# from each other by both quantization errors
CHECK_TOLERANCE = {"fp32": 1e-3, "int8": 0.15, "int4": 0.4}
AGGREGATE_STREAMS = 8
AGGREGATE_REPEATS = 2
# prompts the server has not seen (its prefix cache would answer a seen one's prefill): the
# pairs' seeds start here, the 8-stream runs' at PROMPT_SEED + 100 (a new set each repeat)
PROMPT_SEED = 16_000


def peer_prompts(n: int, length: int, *, vocab_size: int, peer: int = 0) -> list[list[int]]:
    """The paired requests' prompts of the `peer`-th peer timed against one server: none of them
    sent to the server before, by the bench or by another peer's pairs (no prefix-cache hits)."""
    return random_prompts(n, length, vocab_size=vocab_size, seed=PROMPT_SEED + 1000 * peer)


def parse_peers(text: str) -> tuple[str, ...]:
    """"openvino,llama.cpp" -> ("openvino", "llama.cpp"); ValueError naming the choices."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [n for n in names if n not in PEERS]
    if bad or not names:
        raise ValueError(f"{text!r}: choose from {', '.join(PEERS)} (comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r} names a peer twice")
    return names


def default_work() -> Path:
    """Where converted weights are kept between runs: $GPTPIPE_PEERS_WORK, else
    ~/.cache/gptpipe/peers-work (scripts/bench_peers.py's --work default)."""
    env = os.environ.get("GPTPIPE_PEERS_WORK")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptpipe" / "peers-work"


def _work_key(source: str) -> str:
    if re.fullmatch(r"[\w.-]+", source):
        return source
    return f"{Path(source).name or 'model'}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def _hf_folder(source: str, folder: Path) -> Path:
    from export.baselines import write_hf_folder  # torch: only when a peer runs

    return write_hf_folder(source, folder)


def _artefact(peer: str, precision: str, base: Path, hf: Path, *, threads: int) -> Path:
    """The peer's converted weights for `precision` (converted once, then kept in `base`)."""
    ov_format, _, gguf_type = FORMATS[precision]
    if peer == "openvino":
        path = base / "ov" / ov_format
        if not (path / "openvino_model.xml").is_file():
            peers.convert("openvino", hf, base / "ov", types=[ov_format], threads=threads)
        return path
    path = base / "gguf" / f"{gguf_type}.gguf"
    if not path.is_file():
        peers.convert("gguf", hf, base / "gguf", types=["f32", gguf_type], threads=threads)
    return path


def _open(peer: str, precision: str, model: Path, *, threads: int, n_ctx: int) -> peers.PeerWorker:
    if peer == "openvino":
        return peers.PeerWorker("openvino", model, threads=threads, ov_precision=FORMATS[precision][1])
    return peers.PeerWorker("llama.cpp", model, threads=threads, n_ctx=n_ctx)


def served_precision(served: ServedModel) -> str:
    """The manifest's precision, else the one the engine's metadata records (export.onnx.graph)."""
    if served.precision != "?":
        return served.precision
    import onnxruntime as ort

    meta = ort.InferenceSession(str(served.engine), providers=["CPUExecutionProvider"]).get_modelmeta()
    return meta.custom_metadata_map.get("gptpipe.precision", "?")


def check_function(worker: peers.PeerWorker, loop: OrtLoop, prompts: Sequence[Sequence[int]], *,
                   precision: str) -> dict[str, Any]:
    """The peer's next-token logits against the served engine's (in process) after each prompt."""
    worst = 0.0
    argmax_same = 0
    for prompt in prompts:
        ref = loop.logits(prompt)
        got = worker.logits(prompt)
        if got.shape != ref.shape:
            raise peers.PeerError(f"{worker.engine}: logits of shape {got.shape}, the served engine's are {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max() / max(float(ref.max() - ref.min()), 1e-12)))
        argmax_same += int(np.argmax(got) == np.argmax(ref))
    tolerance = CHECK_TOLERANCE[precision]
    return {"max_abs_dlogit_over_range": worst, "tolerance": tolerance, "passed": worst <= tolerance,
            "argmax_equal": f"{argmax_same}/{len(prompts)}", "prompts": len(prompts)}


def measure_peers(served: ServedModel, names: Sequence[str], *, prompts: Sequence[Sequence[int]], output_tokens: int,
                  make_generator: Callable[[], Generator], source: Optional[str] = None,
                  work_dir: Optional[Path] = None, venv: Optional[Path] = None,
                  progress: Progress = NoProgress()) -> dict[str, Any]:
    """One entry per peer at the served precision ("openvino-fp32", ...): the check, then the
    prompts paired with served requests (`paired_run`; prompts the server has not seen, see
    `peer_prompts`: `prompts` for the first peer, new ones for each later peer); OpenVINO also at 8 streams with its
    ContinuousBatchingPipeline against 8 served streams ("openvino-cb-<precision>").

    An entry that could not be measured is {"skipped": reason} (peer not installed, no format
    for the precision, no source weights) or {"error": ...} (the check or a run failed)."""
    precision = served_precision(served)
    threads = served.threads
    out: dict[str, Any] = {}
    source = source or served.manifest.get("source")
    keys = {name: f"{name}-{precision}" for name in names}
    todo = []
    for name in names:
        if not peers.installed(name, venv):
            reason = (f"{name} is not installed in {venv or peers.default_venv()}; run: "
                      f"{peers.install_hint(Path(venv) if venv else peers.default_venv(), name)}")
            logger.warning("peer %s skipped: %s", name, reason)
            out[keys[name]] = {"skipped": reason}
        elif precision not in FORMATS:
            out[keys[name]] = {"skipped": f"no {name} format for the served precision {precision!r} "
                                          f"(one of {', '.join(FORMATS)})"}
        elif not source:
            out[keys[name]] = {"skipped": "no source weights to convert: the repository has no manifest naming "
                                          "its source; pass --checkpoint"}
        else:
            todo.append(name)
    if not todo:
        return out
    base = (work_dir or default_work()) / _work_key(str(source))
    n_ctx = max(len(p) for p in prompts) + output_tokens + 8
    loop = OrtLoop(served.engine, threads=threads, max_length=served.config["n_positions"])
    check_prompts = [list(prompts[0]), list(prompts[0][: max(1, len(prompts[0]) // 4)])]
    try:
        progress.start(f"peers: the {precision} weights for {', '.join(todo)} (converted once, kept in {base})", 1)
        hf = _hf_folder(str(source), base / "hf")
        progress.advance()
        for index, name in enumerate(todo):
            key = keys[name]
            # a later peer's served requests on the first one's prompts would be prefix-cache hits
            pairs = prompts if index == 0 else peer_prompts(len(prompts), len(prompts[0]),
                                                             vocab_size=served.config["vocab_size"], peer=index)
            try:
                model = _artefact(name, precision, base, hf, threads=threads)
                with _open(name, precision, model, threads=threads, n_ctx=n_ctx) as worker:
                    progress.start(f"peer {key}: the same function as the served engine?", 1)
                    check = check_function(worker, loop, check_prompts, precision=precision)
                    progress.advance()
                    if not check["passed"]:
                        out[key] = {"error": f"{key} does not compute the served function: max |Δlogit| "
                                             f"{check['max_abs_dlogit_over_range']:.3g} of the logits' range, over "
                                             f"the tolerance {check['tolerance']:g}", "check": check}
                        continue
                    version = worker.info.get("openvino_genai") or worker.info.get("llama_cpp")
                    served_generator = make_generator()
                    try:
                        entry = paired_run(peers.peer_generator(worker), pairs, output_tokens=output_tokens,
                                           label=f"peer {key}", served_generator=served_generator,
                                           progress=progress, note=f"{name} {version} on {model}, {threads} "
                                                                   "thread(s), in its own process")
                    finally:
                        getattr(served_generator, "close", lambda: None)()
                out[key] = {**entry, "check": check, "peer": name, "precision": precision, "model": str(model)}
            except peers.PeerError as e:
                logger.exception("peer %s failed", key)
                out[key] = {"error": f"{type(e).__name__}: {e}"}
        if "openvino" in todo and "error" not in out.get(keys["openvino"], {}):
            out[f"openvino-cb-{precision}"] = _aggregate_vs_cb(served, base / "ov" / FORMATS[precision][0],
                                                               precision=precision, prompt_tokens=len(prompts[0]),
                                                               output_tokens=output_tokens,
                                                               make_generator=make_generator, progress=progress)
    finally:
        del loop
    return out


def _aggregate_vs_cb(served: ServedModel, model: Path, *, precision: str, prompt_tokens: int, output_tokens: int,
                     make_generator: Callable[[], Generator], progress: Progress) -> dict[str, Any]:
    """8 served streams and OpenVINO's ContinuousBatchingPipeline with the same 8 prompts at once,
    in turn (served, peer, served, peer): aggregate tokens/s of each, the median of the ratios."""
    streams = AGGREGATE_STREAMS
    if served.max_sequences < streams:
        return {"skipped": f"the server has max_sequences={served.max_sequences} KV slots, {streams} streams are needed"}
    vocab = served.config["vocab_size"]
    ratios, served_tps, peer_tps = [], [], []
    try:
        with peers.PeerWorker("openvino-cb", model, threads=served.threads, ov_precision=FORMATS[precision][1]) as cb:
            cb.batch(random_prompts(2, prompt_tokens, vocab_size=vocab, seed=PROMPT_SEED + 99), 4)  # warm-up
            for r in range(AGGREGATE_REPEATS):
                # a new set each repeat: a prompt seen before would be a prefix-cache hit
                prompts = random_prompts(streams, prompt_tokens, vocab_size=vocab, seed=PROMPT_SEED + 100 + r)
                stats, _ = run_level(make_generator, prompts, concurrency=streams, output_tokens=output_tokens,
                                     progress=progress, description=f"served, {streams} streams ({r + 1})")
                results, wall_s = cb.batch(prompts, output_tokens)
                tps = sum(len(x.token_ids) for x in results) / wall_s
                served_tps.append(stats.aggregate_tokens_per_s)
                peer_tps.append(tps)
                ratios.append(stats.aggregate_tokens_per_s / tps)
    except peers.PeerError as e:
        logger.exception("OpenVINO continuous batching failed")
        return {"error": f"{type(e).__name__}: {e}"}
    return {"streams": streams, "served_aggregate_tokens_per_s": served_tps, "peer_aggregate_tokens_per_s": peer_tps,
            "ratios": ratios, "ratio": float(np.median(ratios)),
            "note": "aggregate tokens/s = all new tokens of the run (prefills included) / its wall time; "
                    "served and peer runs alternate, each pair on the same 8 prompts, new ones per pair"}


def peer_ratios(entries: Mapping[str, Any], *, precisions: Sequence[str], peers_asked: Sequence[str] = PEERS,
                extra: Optional[Mapping[str, Optional[float]]] = None,
                extra_skipped: Optional[Mapping[str, str]] = None) -> dict[str, dict[str, Any]]:
    """The PEER_TARGETS rows from measure_peers' entries (of one or more runs, keyed
    "<peer>-<precision>"): measured rows get their value, the rest the reason they were not."""
    values: dict[str, Optional[float]] = dict(extra or {})
    skipped: dict[str, str] = dict(extra_skipped or {})

    def why(key: str, peer: str, precision: str) -> str:
        if peer not in peers_asked:
            return f"{peer} was not asked for (--peers)"
        if precision not in precisions:
            return f"no {precision} server in this run (serve a {precision} export: export-model --precision {precision})"
        entry = entries.get(key, {})
        return entry.get("skipped") or entry.get("error") or "not measured"

    for row, *_ in PEER_TARGETS:
        m = re.fullmatch(r"served_vs_(openvino|llamacpp)_(\w+)", row)
        if not m:
            continue
        peer, precision = ROW_PEER[m.group(1)], m.group(2)
        entry = entries.get(f"{peer}-{precision}", {})
        if "paired_ratio" in entry:
            values[row] = entry["paired_ratio"]
        else:
            skipped.setdefault(row, why(f"{peer}-{precision}", peer, precision))
    # every timed peer at every precision, rows of its own or not (OpenVINO int4 has none)
    ttft = [e["paired_ttft_ratio"] for k, e in entries.items()
            if not k.startswith("openvino-cb-") and "paired_ttft_ratio" in e]
    if ttft:  # the faster peer's TTFT gives the larger ratio; the worst precision is the row
        values["ttft_vs_best_peer"] = max(ttft)
    else:
        skipped["ttft_vs_best_peer"] = "no peer was timed"
    cb = [v for k, v in entries.items() if k.startswith("openvino-cb-") and "ratio" in v]
    if cb:
        values["aggregate8_vs_openvino"] = min(v["ratio"] for v in cb)  # as ttft_vs_best_peer: the worst
    else:
        cb_entries = [v for k, v in entries.items() if k.startswith("openvino-cb-")]
        skipped["aggregate8_vs_openvino"] = ((cb_entries[0].get("skipped") or cb_entries[0].get("error"))
                                             if cb_entries else why("openvino-fp32", "openvino", "fp32"))
    if "int4_greedy_agreement" not in values:
        skipped.setdefault("int4_greedy_agreement", "measured by --suite targets (the demo model's int4 and fp32 "
                                                    "exports)")
    return judge(values, PEER_TARGETS, skipped=skipped)
