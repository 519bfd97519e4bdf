"""An exported graph against the model in PyTorch, through the engine that serves it
(serving/engine/runtime.py): logits, greedy agreement and perplexity, the tolerance table per precision,
and ValidationError naming the check, the value and the limit."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from export.config import GPTConfig
from export.model import GPT
from export.onnx.graph import PRECISIONS
from serving import tensors
from serving.engine.runtime import OrtRuntime

logger = logging.getLogger(__name__)

DECODE_STEPS = 16
PPL_ROWS = 4
MAX_PPL_TOKENS = 512


@dataclass(frozen=True)
class CheckResult:
    name: str
    positions: int  # logit vectors compared
    max_abs_logits: float  # max |onnx - torch| over all of them
    rel_logits: float  # rms(onnx - torch) / rms(torch - its mean), over all positions
    max_rel_logits: float  # the same ratio at the worst single position
    agreement: Optional[float]  # greedy top-1 agreement over the decisive positions
    decisive: int  # positions where the fp32 top-1 leads the top-2 by >= the margin
    detail: str = ""


@dataclass(frozen=True)
class _PositionStats:
    """Per-position statistics of one comparison, kept so that checks can be pooled."""

    sq_err: np.ndarray  # (N,) mean((onnx - torch)^2)
    var: np.ndarray  # (N,) var(torch)
    max_abs: np.ndarray  # (N,) max |onnx - torch|
    decisive: np.ndarray  # (N,) bool
    agree: np.ndarray  # (N,) bool

    @staticmethod
    def concat(stats: Sequence["_PositionStats"]) -> "_PositionStats":
        return _PositionStats(*(np.concatenate([getattr(s, f.name) for s in stats])
                                for f in dataclasses.fields(_PositionStats)))

    def result(self, name: str, detail: str = "") -> CheckResult:
        n = len(self.sq_err)
        rel = math.sqrt(self.sq_err.sum() / max(self.var.sum(), 1e-30))
        per_position = np.sqrt(self.sq_err / np.maximum(self.var, 1e-30))
        agreement = float(self.agree[self.decisive].mean()) if self.decisive.any() else None
        return CheckResult(name=name, positions=n, max_abs_logits=float(self.max_abs.max()), rel_logits=rel,
                           max_rel_logits=float(per_position.max()), agreement=agreement,
                           decisive=int(self.decisive.sum()), detail=detail)


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored
    ppl_torch: float
    ppl_onnx: float

    @property
    def rel_change(self) -> float:
        return abs(self.ppl_onnx - self.ppl_torch) / self.ppl_torch


@dataclass(frozen=True)
class Tolerance:
    max_abs_logits: Optional[float] = None  # every check
    max_rel_logits: Optional[float] = None  # all checks pooled: CheckResult.rel_logits
    min_agreement: Optional[float] = None  # all checks pooled, decisive positions only
    decisive_margin: float = 0.0  # logits
    max_rel_ppl: Optional[float] = None  # |Δppl| / ppl on the held-out text


# Per precision; see validate_onnx for the reasoning and the measurements behind the numbers.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_logits=1e-4, max_rel_ppl=1e-4),
    "fp16": Tolerance(max_rel_logits=0.01, min_agreement=0.99, decisive_margin=0.1, max_rel_ppl=0.01),
    "int8": Tolerance(max_rel_logits=0.10, min_agreement=0.97, decisive_margin=0.5, max_rel_ppl=0.05),
    "int4": Tolerance(max_rel_logits=0.40, min_agreement=0.95, decisive_margin=1.0, max_rel_ppl=0.05),
}


@dataclass(frozen=True)
class ValidationReport:
    precision: str
    kv_cache: str
    tolerance: Tolerance
    checks: tuple[CheckResult, ...]
    overall: CheckResult  # every position of every check
    perplexity: Optional[PerplexityResult] = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.perplexity is not None:
            out["perplexity"]["rel_change"] = self.perplexity.rel_change
        return out


class ValidationError(AssertionError):
    """An exported graph disagrees with PyTorch beyond the tolerance of its precision."""

    def __init__(self, check: str, metric: str, value: float, limit: float, report: "ValidationReport"):
        self.check, self.metric, self.value, self.limit, self.report = check, metric, value, limit, report
        super().__init__(
            f"ONNX validation failed ({report.precision}, {report.kv_cache} cache): check {check!r}: "
            f"{metric} = {value:.6g}, limit {limit:.6g}")


def default_prompts(config: GPTConfig) -> list[list[int]]:
    """Two fixed prompts of different lengths (seeded, any vocabulary)."""
    rng = np.random.default_rng(1234)
    lengths = [min(n, config.n_positions - DECODE_STEPS - 1) for n in (7, 12)]
    return [rng.integers(0, config.vocab_size, size=max(1, n)).tolist() for n in lengths]


def validate_onnx(
    onnx_path: str | Path,
    model: GPT,
    *,
    precision: str,
    text_tokens: Optional[Sequence[int]] = None,
    prompts: Optional[Sequence[Sequence[int]]] = None,
    tolerance: Optional[Tolerance] = None,
    intra_op_threads: Optional[int] = None,
) -> ValidationReport:
    """Run the ONNX graph in ONNX Runtime through serving.engine.runtime.OrtRuntime (the serving engine)
    against `model` in PyTorch fp32; raise ValidationError naming the check, value and limit.

    Checks (tokens are teacher-forced: both sides read the PyTorch greedy continuation, so one
    early disagreement does not make every later position differ):
    - "prefill+decode": each prompt, then DECODE_STEPS single-token steps;
    - "empty past": static: a prompt prefilled into a slot that still holds another sequence's
      stale keys; dynamic: a prompt run with an explicit (B, nh, 0, hs) past;
    - "batched lengths": static: rows of different lengths, in a pool slot range with a free slot
      riding along as a dummy row, decoded together in single batched calls (as the scheduler
      does); dynamic: a left-padded batch with attention_mask, prefill and decode;
    - "perplexity" (with text_tokens): the first MAX_PPL_TOKENS tokens of the held-out text, cut
      into PPL_ROWS segments scored token by token (batched decode) in ONNX and in one forward
      in PyTorch; also adds its positions to the logit statistics.

    Tolerances (TOLERANCES). fp32 is checked per check; fp16/int8/int4 on all positions pooled, since
    a check of 5-30 positions makes a poor statistic.
    - fp32: max |Δlogits| <= 1e-4, hard: the graph computes the same function (measured ~4e-7).
    - fp16 and int8 compare distributions, not bits. Random-weight models have near-flat output
      distributions (top-1 margins ~1e-3): any rounding flips the argmax legitimately there, and
      perplexity sits near the vocabulary size whatever the graph does, so neither greedy
      agreement over every position nor perplexity alone tells a broken graph from a good one.
      Hence three checks, all of which a broken graph (relative error ~1) fails:
      * rel_logits = rms(Δlogits) / rms(logits - their mean): scale-free, as meaningful for
        random weights as for trained ones. Measured: fp16 3e-4 (tiny, trained on text), 6e-4
        (tiny, random), 1.1e-3 (gpt2 shape, random); int8 0.014, 0.015, 0.040. Limits: fp16 0.01,
        int8 0.10 (~2.5x the worst measured; the tiny model's 64-wide dot products are the
        hardest case for per-tensor activation quantization, GPT-2's 768 wide ones average out).
      * greedy agreement at the decisive positions, where fp32's top-1 leads by >= 0.1 logits
        (fp16) or 0.5 (int8, whose logit errors reach ~0.4 on the trained tiny model): there a
        correct graph has no excuse to pick another token. Measured 1.000 everywhere; limits
        0.99 and 0.97.
      * |Δppl| / ppl on the held-out text: measured fp16 <= 5e-5, int8 2e-4 (trained tiny) and
        2.5e-3 (gpt2 shape); limits 1% and 5% (the usual budget for int8 GPT-2-class models).
    - int4 (MatMulNBits, symmetric blocks of 32, int8 activations in the kernel), the same three
      checks, looser: 4-bit weights carry ~16x int8's rounding step. Measured rel_logits 0.083
      (demo, trained), 0.10 (tiny, random), 0.26 (gpt2 shape, random: 12 layers of Gaussian
      weights, the worst case for 4-bit blocks); a graph of another model gives 1.37. Limit 0.40
      (1.5x the worst measured, well under a broken graph's ~1). Decisive margin 1.0 logit (the
      demo's logit errors reach 2.0, at most 1.4 outside the perplexity text); agreement there
      measured 1.000 (demo, 201 decisive positions), limit 0.95. |Δppl| / ppl measured 8e-3
      (demo) and 1e-3 (tiny), limit 5%, the int8 budget.
    """
    onnx_path = Path(onnx_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tol = tolerance or TOLERANCES[precision]
    t0 = time.perf_counter()
    runtime = OrtRuntime(onnx_path, intra_op_threads=intra_op_threads)
    exported_as = runtime.metadata.get("gptpipe.precision", precision)
    if exported_as != precision:
        raise ValueError(f"{onnx_path.name} was exported as {exported_as}; validating it as {precision} "
                         "would apply the wrong tolerances")
    config = model.config
    if (runtime.n_layer, runtime.vocab_size) != (config.n_layer, config.vocab_size):
        raise ValueError(f"{onnx_path.name} has {runtime.n_layer} layers and vocab {runtime.vocab_size}; "
                         f"the model has {config.n_layer} and {config.vocab_size}")
    model = model.eval()
    prompts = [list(p) for p in (prompts or default_prompts(config))]
    run = _StaticRun(runtime, config) if runtime.kv_cache == "static" else _DynamicRun(runtime, config)
    logger.info("validating %s (%s cache, %s) against PyTorch", onnx_path.name, runtime.kv_cache, precision)

    stats = {
        "prefill+decode": _position_stats(*run.prefill_decode(model, prompts), tol),
        "empty past": _position_stats(*run.empty_past(model, prompts), tol),
        "batched lengths": _position_stats(*run.batched_lengths(model, prompts), tol),
    }
    perplexity = None
    if text_tokens is not None:
        ref, got, perplexity = run.perplexity(model, text_tokens)
        stats["perplexity"] = _position_stats(ref, got, tol)
    checks = tuple(s.result(name) for name, s in stats.items())
    overall = _PositionStats.concat(list(stats.values())).result("all checks")
    report = ValidationReport(precision=precision, kv_cache=runtime.kv_cache, tolerance=tol,
                              checks=checks, overall=overall, perplexity=perplexity,
                              seconds=time.perf_counter() - t0)
    for check in checks + (overall,):
        logger.info("  %-16s %4d positions  max|Δ| %.3g  rel %.3g (worst %.3g)  agreement %s (%d decisive)",
                    check.name, check.positions, check.max_abs_logits, check.rel_logits, check.max_rel_logits,
                    "n/a" if check.agreement is None else f"{check.agreement:.4f}", check.decisive)
    if perplexity is not None:
        logger.info("  perplexity torch %.4f onnx %.4f (Δ %.3g)", perplexity.ppl_torch,
                    perplexity.ppl_onnx, perplexity.rel_change)
    _enforce(report)
    return report


def _enforce(report: ValidationReport) -> None:
    tol, overall = report.tolerance, report.overall
    if tol.max_abs_logits is not None:
        for check in report.checks:
            if not check.max_abs_logits <= tol.max_abs_logits:
                raise ValidationError(check.name, "max |Δlogits|", check.max_abs_logits, tol.max_abs_logits, report)
    name = f"{overall.name} ({overall.positions} positions)"
    if tol.max_rel_logits is not None and not overall.rel_logits <= tol.max_rel_logits:
        raise ValidationError(name, "rms(Δlogits)/rms(logits - mean)", overall.rel_logits, tol.max_rel_logits,
                              report)
    if tol.min_agreement is not None and overall.agreement is not None and not overall.agreement >= tol.min_agreement:
        raise ValidationError(name, f"greedy agreement on {overall.decisive} decisive positions",
                              overall.agreement, tol.min_agreement, report)
    ppl = report.perplexity
    if ppl is not None and tol.max_rel_ppl is not None and not ppl.rel_change <= tol.max_rel_ppl:
        raise ValidationError("perplexity", "|Δppl|/ppl", ppl.rel_change, tol.max_rel_ppl, report)


def _position_stats(ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> _PositionStats:
    """ref, got: (N, V) logits of the same N positions."""
    if ref.shape != got.shape:
        raise ValueError(f"reference logits {ref.shape} vs onnx {got.shape}")
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = np.where(np.isfinite(got), got - ref, np.inf)  # a NaN must fail every check
    top2 = np.sort(ref, axis=1)[:, -2:]
    return _PositionStats(sq_err=(diff**2).mean(axis=1), var=ref.var(axis=1), max_abs=np.abs(diff).max(axis=1),
                          decisive=(top2[:, 1] - top2[:, 0]) >= tol.decisive_margin,
                          agree=ref.argmax(axis=1) == got.argmax(axis=1))


@torch.no_grad()
def _torch_teacher_forced(model: GPT, prompt: Sequence[int], steps: int) -> tuple[list[int], np.ndarray]:
    """PyTorch greedy continuation of `prompt`: the fed tokens (steps of them) and the logits
    after the prompt and after each fed token, (steps + 1, V)."""
    logits, past = model(torch.tensor([list(prompt)]), last_only=True)
    fed, out = [], [logits[0]]
    for _ in range(steps):
        token = int(logits[0].argmax())
        fed.append(token)
        logits, past = model(torch.tensor([[token]]), past_key_values=past, last_only=True)
        out.append(logits[0])
    return fed, torch.stack(out).numpy()


def _segments(config: GPTConfig, tokens: Sequence[int]) -> np.ndarray:
    """(rows, L) equal segments of the held-out text for the perplexity check."""
    tokens = np.asarray(tokens, dtype=np.int64)[:MAX_PPL_TOKENS]
    if tokens.ndim != 1 or len(tokens) < 2 * PPL_ROWS:
        raise ValueError(f"text_tokens needs at least {2 * PPL_ROWS} tokens, got {len(tokens)}")
    if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise ValueError(f"text_tokens must be in [0, {config.vocab_size})")
    length = min(len(tokens) // PPL_ROWS, config.n_positions)
    return tokens[: PPL_ROWS * length].reshape(PPL_ROWS, length)


@torch.no_grad()
def _torch_segment_logits(model: GPT, segments: np.ndarray) -> np.ndarray:
    logits, _ = model(torch.from_numpy(segments))  # (R, L, V)
    return logits[:, :-1].numpy()  # the logits that predict tokens 1..L-1


def _ppl(logits: np.ndarray, segments: np.ndarray) -> float:
    """exp(mean NLL) of segments[:, 1:] under logits (R, L-1, V)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, segments[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


class _StaticRun:
    """The validation scenarios through OrtRuntime.step and a KVPool (the serving path)."""

    def __init__(self, runtime: OrtRuntime, config: GPTConfig) -> None:
        self.rt, self.config = runtime, config

    def _pool(self, sequences: int):
        return self.rt.new_pool(max_sequences=sequences, max_length=self.config.n_positions)

    def _step(self, pool, tokens: np.ndarray, slot: int, past: Sequence[int]) -> np.ndarray:
        return self.rt.step(tokens, pool=pool, slot_start=slot, past_lengths=np.asarray(past)).copy()

    def _sequence(self, pool, slot: int, prompt: list[int], fed: list[int]) -> np.ndarray:
        out = [self._step(pool, np.array([prompt]), slot, [0])[0]]
        for i, token in enumerate(fed):
            out.append(self._step(pool, np.array([[token]]), slot, [len(prompt) + i])[0])
        return np.stack(out)

    def prefill_decode(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        pool = self._pool(len(prompts))
        refs, gots = [], []
        for slot, prompt in enumerate(prompts):
            fed, ref = _torch_teacher_forced(model, prompt, DECODE_STEPS)
            refs.append(ref)
            gots.append(self._sequence(pool, slot, prompt, fed))
        return np.concatenate(refs), np.concatenate(gots)

    def empty_past(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # slot 0 first holds the longer prompt's sequence; it is freed and reused for the shorter
        # one, whose prefill must ignore the stale keys beyond its length
        pool = self._pool(1)
        long, short = max(prompts, key=len), min(prompts, key=len)
        if len(short) == len(long):
            short = long[: max(1, len(long) // 2)]
        fed, _ = _torch_teacher_forced(model, long, 4)
        slot = pool.allocate()
        self._sequence(pool, slot, long, fed)
        pool.free(slot)
        slot = pool.allocate()
        fed, ref = _torch_teacher_forced(model, short, 4)
        return ref, self._sequence(pool, slot, short, fed)

    def batched_lengths(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # slots 0, 2, 3 hold prompts of different lengths; slot 1 is free and rides along
        rows = {0: prompts[0], 2: prompts[-1], 3: prompts[0][: max(1, len(prompts[0]) // 2)]}
        pool = self._pool(4)
        for slot in range(4):
            pool.allocate()
        pool.free(1)
        steps = 4
        fed = {}
        refs = {}
        for slot, prompt in rows.items():
            fed[slot], refs[slot] = _torch_teacher_forced(model, prompt, steps)
            self._step(pool, np.array([prompt]), slot, [0])  # prefill alone, as the scheduler does
        gots: dict[int, list[np.ndarray]] = {slot: [] for slot in rows}
        for i in range(steps):
            tokens = np.array([[fed[s][i] if s in rows else 0] for s in range(4)])
            past = [len(rows[s]) + i if s in rows else 0 for s in range(4)]
            logits = self._step(pool, tokens, 0, past)
            for slot in rows:
                gots[slot].append(logits[slot])
        ref = np.concatenate([refs[s][1:] for s in rows])
        got = np.concatenate([np.stack(gots[s]) for s in rows])
        return ref, got

    def perplexity(self, model: GPT, text_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, PerplexityResult]:
        segments = _segments(self.config, text_tokens)
        rows, length = segments.shape
        pool = self._pool(rows)
        got = np.stack([self._step(pool, segments[:, t : t + 1], 0, [t] * rows)
                        for t in range(length - 1)], axis=1)  # (R, L-1, V)
        ref = _torch_segment_logits(model, segments)
        ppl = PerplexityResult(tokens=rows * (length - 1), ppl_torch=_ppl(ref, segments), ppl_onnx=_ppl(got, segments))
        return ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), ppl


class _DynamicRun:
    """The validation scenarios through OrtRuntime.run with past ++ new."""

    def __init__(self, runtime: OrtRuntime, config: GPTConfig) -> None:
        self.rt, self.config = runtime, config

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {tensors.INPUT_IDS: ids.astype(np.int64), tensors.POSITION_IDS: positions.astype(np.int64),
                 tensors.ATTENTION_MASK: mask.astype(np.int64), **past}
        out = self.rt.run(feeds)
        present = {}
        for i in range(self.rt.n_layer):
            present[tensors.past_key(i)] = out[tensors.present_key(i)]
            present[tensors.past_value(i)] = out[tensors.present_value(i)]
        return out[tensors.LOGITS], present

    def _sequence(self, prompt: list[int], fed: list[int]) -> np.ndarray:
        ids = np.array([prompt])
        mask = np.ones_like(ids)
        logits, past = self._run(ids, mask, np.arange(len(prompt))[None], self.rt.empty_past(1))
        out = [logits[0]]
        for token in fed:
            n = mask.shape[1]
            mask = np.ones((1, n + 1), dtype=np.int64)
            logits, past = self._run(np.array([[token]]), mask, np.array([[n]]), past)
            out.append(logits[0])
        return np.stack(out)

    def prefill_decode(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        refs, gots = [], []
        for prompt in prompts:
            fed, ref = _torch_teacher_forced(model, prompt, DECODE_STEPS)
            refs.append(ref)
            gots.append(self._sequence(prompt, fed))
        return np.concatenate(refs), np.concatenate(gots)

    def empty_past(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # a batch of two rows through an explicit zero-length past (prefill_decode has B=1)
        prompt = prompts[0]
        ids = np.array([prompt, prompt[::-1]])
        logits, _ = self._run(ids, np.ones_like(ids), np.tile(np.arange(ids.shape[1]), (2, 1)),
                              self.rt.empty_past(2))
        with torch.no_grad():
            ref, _ = model(torch.from_numpy(ids), past_key_values=model.empty_past(2), last_only=True)
        return ref.numpy(), logits

    def batched_lengths(self, model: GPT, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        # left padding: row b is (pad ... pad, prompt_b); positions count real tokens only
        rows = [prompts[0], prompts[-1], prompts[0][: max(1, len(prompts[0]) // 2)]]
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, prompt in enumerate(rows):
            ids[b, width - len(prompt):] = prompt
            mask[b, width - len(prompt):] = 1
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
        steps = 4
        fed, refs = zip(*(_torch_teacher_forced(model, p, steps) for p in rows))
        logits, past = self._run(ids, mask, positions, self.rt.empty_past(len(rows)))
        got = [logits]
        next_pos = positions[:, -1] + 1
        for i in range(steps):
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            tokens = np.array([[f[i]] for f in fed])
            logits, past = self._run(tokens, mask, next_pos[:, None] + i, past)
            got.append(logits)
        got_arr = np.stack(got, axis=1)  # (R, steps + 1, V)
        return np.concatenate(refs), got_arr.reshape(-1, got_arr.shape[-1])

    def perplexity(self, model: GPT, text_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, PerplexityResult]:
        segments = _segments(self.config, text_tokens)
        rows, length = segments.shape
        past = self.rt.empty_past(rows)
        got = []
        for t in range(length - 1):
            logits, past = self._run(segments[:, t : t + 1], np.ones((rows, t + 1)), np.full((rows, 1), t), past)
            got.append(logits)
        got_arr = np.stack(got, axis=1)
        ref = _torch_segment_logits(model, segments)
        ppl = PerplexityResult(tokens=rows * (length - 1), ppl_torch=_ppl(ref, segments), ppl_onnx=_ppl(got_arr, segments))
        return ref.reshape(-1, ref.shape[-1]), got_arr.reshape(-1, got_arr.shape[-1]), ppl
