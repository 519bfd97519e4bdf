"""The in-process ONNX Runtime baseline: the served engine's greedy loop without Triton, and int8 agreement."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serving.bench.stats import RequestTiming, greedy_agreement


AGREEMENT_NEW_TOKENS = 32


def engine_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The GPTConfig dict an exported graph carries in its metadata ({} if none)."""
    text = metadata.get("gptpipe.config")
    return json.loads(text) if text else {}


class OrtLoop:
    """Baseline 3: greedy decoding with the exported graph in this process, no Triton — the same
    engine the `gpt` model runs (`serving.engine.runtime.OrtRuntime.step` over a one-slot
    `serving.engine.kv_cache.KVPool`), minus the server, the client and the network."""

    def __init__(self, engine: Path | str, *, threads: int, max_length: Optional[int] = None) -> None:
        from serving.engine.runtime import OrtRuntime  # onnxruntime: only when this baseline runs

        self.runtime = OrtRuntime(engine, intra_op_threads=threads)
        length = max_length or engine_config(self.runtime.metadata).get("n_positions", 0)
        if length < 1:
            raise ValueError(f"max_length: {engine} does not say its context length; pass max_length")
        self.pool = self.runtime.new_pool(max_sequences=1, max_length=length)

    def __call__(self, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        return self.generate(prompt, max_tokens)

    def generate(self, prompt: Sequence[int], max_tokens: int) -> RequestTiming:
        if len(prompt) + max_tokens > self.pool.max_length:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context "
                             f"length {self.pool.max_length}")
        step = self.runtime.step
        times: list[float] = []
        tokens: list[int] = []
        sent = time.perf_counter()
        logits = step(np.asarray([prompt], dtype=np.int64), pool=self.pool, slot_start=0,
                      past_lengths=np.zeros(1, dtype=np.int64))
        past = len(prompt)
        while True:
            token = int(np.argmax(logits[0]))
            times.append(time.perf_counter())
            tokens.append(token)
            if len(tokens) == max_tokens:
                break
            logits = step(np.array([[token]], dtype=np.int64), pool=self.pool, slot_start=0,
                          past_lengths=np.array([past], dtype=np.int64))
            past += 1
        return RequestTiming(sent=sent, token_times=tuple(times), prompt_tokens=len(prompt), tokens=tuple(tokens))


    def logits(self, prompt: Sequence[int]) -> np.ndarray:
        """The next-token logits after `prompt` (one prefill), float32 (vocab,)."""
        if len(prompt) > self.pool.max_length:
            raise ValueError(f"prompt ({len(prompt)}) exceeds the context length {self.pool.max_length}")
        logits = self.runtime.step(np.asarray([prompt], dtype=np.int64), pool=self.pool, slot_start=0,
                                   past_lengths=np.zeros(1, dtype=np.int64))
        return np.asarray(logits[0], dtype=np.float32)

    def forced_argmax(self, prompt: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """This engine's greedy choice at each position of `prompt` + `tokens`, reading `tokens`
        (teacher forcing): choice i is made after tokens[:i]."""
        if len(prompt) + len(tokens) > self.pool.max_length:
            raise ValueError(f"prompt + tokens ({len(prompt)} + {len(tokens)}) exceeds the context "
                             f"length {self.pool.max_length}")
        logits = self.runtime.step(np.asarray([prompt], dtype=np.int64), pool=self.pool, slot_start=0,
                                   past_lengths=np.zeros(1, dtype=np.int64))
        choices = [int(np.argmax(logits[0]))]
        for i, token in enumerate(tokens[:-1]):
            logits = self.runtime.step(np.array([[token]], dtype=np.int64), pool=self.pool, slot_start=0,
                                       past_lengths=np.array([len(prompt) + i], dtype=np.int64))
            choices.append(int(np.argmax(logits[0])))
        return choices


def int8_agreement(fp32_engine: Path, int8_engine: Path, prompts: Sequence[Sequence[int]], *, threads: int,
                   max_length: int, new_tokens: int = AGREEMENT_NEW_TOKENS) -> dict[str, Any]:
    """Greedy agreement of int8 with fp32 in the serving engine (in process), two readings:
    free-running (each continues its own tokens) and teacher-forced (int8 reads fp32's tokens)."""
    ref_loop = OrtLoop(fp32_engine, threads=threads, max_length=max_length)
    ref = [list(ref_loop(p, new_tokens).tokens) for p in prompts]
    del ref_loop
    loop = OrtLoop(int8_engine, threads=threads, max_length=max_length)
    free = [list(loop(p, new_tokens).tokens) for p in prompts]
    forced = [loop.forced_argmax(p, r) for p, r in zip(prompts, ref)]
    return {
        "free_running": greedy_agreement(ref, free),
        "teacher_forced": greedy_agreement(ref, forced),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "first_divergence": [next((i for i, (a, b) in enumerate(zip(r, f)) if a != b), None) for r, f in zip(ref, free)],
    }
