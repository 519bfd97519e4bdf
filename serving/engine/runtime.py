"""ONNX Runtime behind the `Runtime` step interface: `OrtRuntime` (numpy + onnxruntime only; never torch).

`OrtRuntime(path)` reads the graph's inputs to learn what it serves: the cache kind (the past's
sequence axis is `max_sequence_length` for the static graph, `past_sequence_length` for the
dynamic one, as the tensor table names them), n_layer, heads, head size, vocab and dtypes.

Static graph (`step`): a step runs rows `[slot_start, slot_start + B)` of a `KVPool`. The runtime
binds each layer's `pool.keys[l][slot_start:slot_start + B]` (a contiguous view) as BOTH
`past_key_values.l.key` and `present.l.key` (same for values) by raw pointer, so
GroupQueryAttention sees past == present and writes the new keys/values in place: no cache copy,
no cache allocation. attention_mask and position_ids are built from `past_lengths`; the logits
land in a buffer the runtime allocates once (grown when a larger batch comes).

Invariants the caller (the scheduler) keeps:
- every row of the range gets its token(s) written at positions [past_lengths[b], +T). A row that
  is not really stepping (a free slot, or a sequence without a token in this batch) rides along
  with a dummy token written at its next position — beyond its valid prefix, and overwritten by
  its own next real token later — and its logits are ignored. So: a stepping row passes its true
  length; a ride-along sequence passes a value >= its true length (its next position; a smaller
  one would overwrite a valid position); a free slot may pass 0; always past_lengths[b] + T <=
  pool.max_length.
- `step` never changes `pool.lengths`: the caller advances the lengths of the real rows.
- one step at a time per runtime (IO bindings are cached and reused): not thread-safe.
- calls follow GroupQueryAttention's contract: T == 1 (batched decode, any past lengths), or all
  past lengths 0 (first prompts of the same length), or B == 1 (a prompt after a past).

Mixed calls (`step_mixed`, issue 15): the static graph has a second attention group, `chunk.*` in
the tensor table, for one prompt chunk (1 row x C tokens after a past), bound in place to its slot
`pool.keys[l][chunk_slot]` the same way; GroupQueryAttention refuses several rows of many tokens
after a past in one node, hence one node per group. Everything but attention runs once over the
packed B * T + C tokens, and the logits are each row's last, then the chunk's last, (B + 1, V).
`step` is a mixed call whose chunk is a dummy token written into the runtime's own
(1, nh, 1, hs) scratch rows (measured: ONNX Runtime 1.32's GQA fails on an empty sequence, and a
batch of 0 kills the process with SIGFPE, so the group is never empty). The chunk's slot may lie
inside the rows' range only as a ride-along row that writes beyond the chunk.

With the CUDA provider the pool still lives in host memory: ONNX Runtime copies the bound buffers
to the device and back (correct — GQA then sees two buffers and concatenates — but it moves the
whole range each step); a device-resident pool is future work.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort

from serving import tensors
from serving.engine.contract import check_pool, check_rows, check_tokens
from serving.engine.kv_cache import KVPool

logger = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(float)": np.dtype("float32"), "tensor(float16)": np.dtype("float16"),
               "tensor(int8)": np.dtype("int8"),
               "tensor(int64)": np.dtype("int64"), "tensor(int32)": np.dtype("int32")}


def physical_cores() -> int:
    """Physical cores: ORT's intra-op threads beyond them only contend for the same FPUs."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is a dependency; stay importable without it anyway
        n = None
    return max(1, n or os.cpu_count() or 1)


def session_options(*, intra_op_threads: Optional[int] = None, spinning: bool = True,
                    stop_spinning_after_run: bool = False) -> ort.SessionOptions:
    """Options for a latency-bound decode loop.

    - intra-op threads = physical cores; one inter-op thread, sequential execution (a decoder is
      a chain of ops: there is nothing to run side by side);
    - all graph optimisations (ORT's own fusions and constant folding on load);
    - the memory-pattern planner off: it plans for one set of input shapes, and every decode
      step brings a new total length (ORT's advice for dynamic shapes).
    - spinning intra-op threads (ORT's default; ``spinning=False`` sets
      ``session.intra_op.allow_spinning`` to 0). The served engine spins too, unless its
      config.pbtxt says ``intra_op_spinning: "0"`` (``export-model --no-intra-op-spinning``).
      Measured on the AVX-512 host (gpt2 shape, 2 cores, `gptpipe bench --concurrency 1,8
      --requests 8`, spinning off and on alternating, 3 rounds, 2026-12-02): int8 decode
      tokens/s at 1 stream on ÷ off 1.13, 1.07, 1.17 (the engine's own loop) and 1.27, 1.07,
      1.16 (the client-side loop); at 8 streams 1.39, 1.05, 1.04 and 0.98, 1.01, 1.08, but ITL
      p99 at 8 grew in 5 of those 6 pairs (by up to 55%). fp32: 1.16, 0.97, 0.99 at 1 stream.
      On the earlier AVX-only host, with the client loop of then, off was 5.5% faster at 1.
    - ``stop_spinning_after_run`` (ORT's ``session.force_spinning_stop``): the workers spin
      inside a step and stop when it returns, so between steps the cores are Triton's, the
      stub's and the clients'. The served engine sets it. Measured (int8, `--mode server
      --concurrency 1,8 --requests 16`, off / spinning / spinning that stops, 3 rounds,
      2026-12-02 16:20 UTC): aggregate tokens/s at 8 streams 219/192/227, 241/242/300,
      231/243/271; ITL p99 at 8 57.9/75.5/59.9, 51.6/51.7/52.8, 53.3/55.4/51.7 ms (the tail
      of no spinning, a lower median); 1 stream 67/81/85, 79/92/95, 80/96/96 tokens/s.
    """
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtRuntime:
    def __init__(self, onnx_path: str | os.PathLike, *, intra_op_threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None, spinning: bool = True,
                 stop_spinning_after_run: bool = False) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        self.path = path
        self.session = ort.InferenceSession(
            str(path), session_options(intra_op_threads=intra_op_threads, spinning=spinning,
                                       stop_spinning_after_run=stop_spinning_after_run),
            providers=list(providers) if providers else default_providers())
        self._read_graph()
        self._logits: Optional[np.ndarray] = None  # (rows + 1, V), grown on demand
        self._scratch_kv: Optional[tuple[list[np.ndarray], list[np.ndarray]]] = None
        # IO bindings with the KV buffers of a slot range already bound, by (pool, start, rows):
        # binding 4 x n_layer raw pointers costs ~0.5 ms, a few % of a decode step
        self._bindings: OrderedDict[tuple[int, int, int, Optional[int]], tuple[weakref.ref, ort.IOBinding]] = OrderedDict()
        logger.info("ORT session %s: %s cache, %d layers, kv %s, logits %s, providers %s", path.name,
                    self.kv_cache, self.n_layer, self.kv_dtype, self.logits_dtype, self.providers)

    # ------------------------------------------------------------------ graph facts

    def _read_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in (tensors.INPUT_IDS, tensors.POSITION_IDS, tensors.ATTENTION_MASK,
                               tensors.past_key(0)) if n not in inputs]
        if missing or tensors.LOGITS not in outputs:
            raise ValueError(f"{self.path} is not a gptpipe graph: missing inputs {missing} "
                             f"or output {tensors.LOGITS!r}; inputs are {sorted(inputs)}")
        n_layer = 0
        while tensors.past_key(n_layer) in inputs:
            n_layer += 1
        self.n_layer = n_layer
        past = inputs[tensors.past_key(0)]
        _, n_head, seq_axis, head_dim = past.shape
        if seq_axis == tensors.MAX_SEQ:
            self.kv_cache: tensors.KVCache = "static"
        elif seq_axis == tensors.PAST:
            self.kv_cache = "dynamic"
        else:
            raise ValueError(f"{self.path}: the past's sequence axis is {seq_axis!r}; expected "
                             f"{tensors.MAX_SEQ!r} (static cache) or {tensors.PAST!r} (dynamic)")
        if self.kv_cache == "static" and tensors.chunk(tensors.INPUT_IDS) not in inputs:
            raise ValueError(f"{self.path} is a static-cache graph without the prompt-chunk group "
                             f"({tensors.chunk(tensors.INPUT_IDS)!r}: mixed calls): it was exported by an "
                             "older gptpipe; export it again")
        self.n_head, self.head_dim = int(n_head), int(head_dim)
        self.kv_dtype = _ORT_DTYPES[past.type]
        logits = outputs[tensors.LOGITS]
        self.vocab_size = int(logits.shape[-1])
        self.logits_dtype = _ORT_DTYPES[logits.type]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        # the model's context length (learned positions end there), when the export recorded it
        config = json.loads(self.metadata.get("gptpipe.config", "{}"))
        self.n_positions: Optional[int] = config.get("n_positions")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def new_pool(self, *, max_sequences: int, max_length: int) -> KVPool:
        """A pool shaped for this graph."""
        if self.n_positions is not None and max_length > self.n_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's context length "
                             f"n_positions={self.n_positions}")
        return KVPool(n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                      max_sequences=max_sequences, max_length=max_length, dtype=self.kv_dtype)

    # ------------------------------------------------------------------ static graph

    def step(self, input_ids: np.ndarray, *, pool: KVPool, slot_start: int,
             past_lengths: np.ndarray | Sequence[int], out: Optional[np.ndarray] = None) -> np.ndarray:
        """Run T new tokens for rows [slot_start, slot_start + B) of `pool`, in place.

        input_ids (B, T) int; past_lengths (B,): each row's cached positions. Returns the last
        position's logits (B, V): `out` when given, else a view of the runtime's logits buffer,
        valid until the next step (copy what you keep). The graph's prompt-chunk group runs a
        dummy token into the runtime's own scratch buffers."""
        logits = self._step(input_ids, pool, slot_start, past_lengths, None)[:-1]
        if out is None:
            return logits
        if out.shape != logits.shape or out.dtype != self.logits_dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.logits_dtype} array of shape "
                             f"{logits.shape}, got {out.dtype} {out.shape}")
        out[...] = logits
        return out

    def step_mixed(self, input_ids: np.ndarray, *, pool: KVPool, slot_start: int,
                   past_lengths: np.ndarray | Sequence[int], chunk_ids: np.ndarray, chunk_slot: int,
                   chunk_past: int) -> np.ndarray:
        """`step`'s rows and a prompt chunk in ONE call: C new tokens `chunk_ids` (C,) of slot
        `chunk_slot` after its `chunk_past` cached positions, written in place too. Returns
        (B + 1, V): each row's last logits, then the chunk's last (a view, as in `step`).

        The chunk's slot may ride along among the rows (a dummy row) only if that row writes
        beyond the chunk: past_lengths of it >= chunk_past + C."""
        chunk_ids = np.ascontiguousarray(chunk_ids, dtype=np.int64).reshape(1, -1)
        return self._step(input_ids, pool, slot_start, past_lengths, (chunk_ids, int(chunk_slot), int(chunk_past)))

    def _step(self, input_ids: np.ndarray, pool: KVPool, slot_start: int, past_lengths,
              chunk: Optional[tuple[np.ndarray, int, int]]) -> np.ndarray:
        if self.kv_cache != "static":
            raise ValueError(f"step() needs the static-cache graph; {self.path.name} has a "
                             "dynamic cache (use run())")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        past = np.ascontiguousarray(past_lengths, dtype=np.int64)
        B, T = self._check_step(input_ids, pool, slot_start, past)
        if chunk is not None:
            self._check_chunk(pool, int(slot_start), past, T, *chunk)
        io = self._kv_binding(pool, int(slot_start), B, None if chunk is None else chunk[1])
        self._bind_group(io, "", input_ids, past)
        if chunk is None:  # the chunk group's dummy: one token at position 0 of the scratch row
            self._bind_group(io, tensors.CHUNK_PREFIX, np.zeros((1, 1), np.int64), np.zeros(1, np.int64))
        else:
            self._bind_group(io, tensors.CHUNK_PREFIX, chunk[0], np.array([chunk[2]], np.int64))
        if self._logits is None or self._logits.shape[0] < B + 1:
            self._logits = np.empty((B + 1, self.vocab_size), self.logits_dtype)
        logits = self._logits[:B + 1]
        io.bind_output(tensors.LOGITS, "cpu", 0, self.logits_dtype.type, [B + 1, self.vocab_size],
                       logits.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits

    @staticmethod
    def _bind_group(io: ort.IOBinding, prefix: str, input_ids: np.ndarray, past: np.ndarray) -> None:
        """One attention group's ids, positions and mask (B, past + T ones per row, right padded)."""
        T = input_ids.shape[1]
        total = past + T  # (B,)
        mask = (np.arange(int(total.max()))[None, :] < total[:, None]).astype(np.int64)  # (B, total)
        io.bind_cpu_input(prefix + tensors.INPUT_IDS, input_ids)
        io.bind_cpu_input(prefix + tensors.POSITION_IDS, past[:, None] + np.arange(T)[None, :])  # (B, T)
        io.bind_cpu_input(prefix + tensors.ATTENTION_MASK, mask)

    _MAX_BINDINGS = 256

    def _kv_binding(self, pool: KVPool, slot_start: int, B: int, chunk_slot: Optional[int]) -> ort.IOBinding:
        """An IO binding with rows [slot_start, slot_start + B) of every layer's buffers bound as
        both past input and present output (the in-place update), and the chunk group's past
        and present to row `chunk_slot` (or, without a chunk, to the runtime's scratch row).
        Cached: the pool's buffers never move. The cache holds the pool weakly; a dead pool's
        bindings are never used."""
        key = (id(pool), slot_start, B, chunk_slot)
        entry = self._bindings.get(key)
        if entry is not None and entry[0]() is pool:
            self._bindings.move_to_end(key)
            return entry[1]
        io = self.session.io_binding()
        row_bytes = pool.n_head * pool.max_length * pool.head_dim * pool.dtype.itemsize
        groups = [("", [B, self.n_head, pool.max_length, self.head_dim], pool.keys, pool.values,
                   slot_start * row_bytes)]
        if chunk_slot is None:
            groups.append((tensors.CHUNK_PREFIX, [1, self.n_head, 1, self.head_dim], *self._scratch(), 0))
        else:
            groups.append((tensors.CHUNK_PREFIX, [1, self.n_head, pool.max_length, self.head_dim], pool.keys,
                           pool.values, chunk_slot * row_bytes))
        for prefix, rows, keys, values, offset in groups:
            for layer in range(self.n_layer):
                for past_name, present_name, buffers in (
                    (tensors.past_key(layer), tensors.present_key(layer), keys),
                    (tensors.past_value(layer), tensors.present_value(layer), values),
                ):
                    ptr = buffers[layer].ctypes.data + offset  # rows from `offset` of (S, nh, MAX, hs)
                    io.bind_input(prefix + past_name, "cpu", 0, pool.dtype.type, rows, ptr)
                    io.bind_output(prefix + present_name, "cpu", 0, pool.dtype.type, rows, ptr)
        self._bindings[key] = (weakref.ref(pool), io)
        if len(self._bindings) > self._MAX_BINDINGS:
            self._bindings.popitem(last=False)
        return io

    def _scratch(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per layer, a (1, nh, 1, hs) key and value row: where the chunk group's dummy token of
        a call without a chunk goes."""
        if self._scratch_kv is None:
            shape = (1, self.n_head, 1, self.head_dim)
            self._scratch_kv = ([np.zeros(shape, self.kv_dtype) for _ in range(self.n_layer)],
                                [np.zeros(shape, self.kv_dtype) for _ in range(self.n_layer)])
        return self._scratch_kv

    def _check_step(self, input_ids: np.ndarray, pool: KVPool, slot_start: int,
                    past: np.ndarray) -> tuple[int, int]:
        B, T = check_tokens(input_ids, self.vocab_size)
        check_pool(pool, n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                   kv_dtype=self.kv_dtype, owner="graph")
        check_rows(pool, slot_start, past, B)
        limit = min(pool.max_length, self.n_positions or pool.max_length)
        if past.min() < 0 or int(past.max()) + T > limit:
            raise ValueError(f"past_lengths + new tokens must be in [{T}, {limit}] (the pool's "
                             f"max_length, the model's n_positions), got past_lengths {past.tolist()} + {T}")
        if T > 1 and B > 1 and past.any():
            raise ValueError(f"a step of {B} rows x {T} tokens needs all past lengths 0 (first "
                             f"prompts); prompts after a past run one row per call, got {past.tolist()}")
        return B, T

    def _check_chunk(self, pool: KVPool, slot_start: int, past: np.ndarray, T: int, chunk_ids: np.ndarray,
                     chunk_slot: int, chunk_past: int) -> None:
        _, C = check_tokens(chunk_ids, self.vocab_size)
        if not 0 <= chunk_slot < pool.max_sequences:
            raise ValueError(f"chunk_slot must lie in [0, {pool.max_sequences}), got {chunk_slot}")
        limit = min(pool.max_length, self.n_positions or pool.max_length)
        if chunk_past < 0 or chunk_past + C > limit:
            raise ValueError(f"chunk_past + chunk tokens must be in [{C}, {limit}] (the pool's max_length, the "
                             f"model's n_positions), got {chunk_past} + {C}")
        row = chunk_slot - slot_start
        if 0 <= row < len(past) and past[row] < chunk_past + C:
            raise ValueError(f"the chunk's slot {chunk_slot} rides along among the rows: its row must write "
                             f"beyond the chunk (past_lengths >= {chunk_past + C}), got {int(past[row])}")

    # ------------------------------------------------------------------ any graph

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain `session.run` by name (the dynamic graph, validation): every output, as numpy."""
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; the graph takes {self.input_names}")
        outputs = self.session.run(None, dict(feeds))
        return dict(zip(self.output_names, outputs))

    def empty_past(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zero-length past feeds for the dynamic graph: (B, nh, 0, hs) per layer."""
        shape = (batch_size, self.n_head, 0, self.head_dim)
        return {name: np.zeros(shape, self.kv_dtype)
                for i in range(self.n_layer) for name in (tensors.past_key(i), tensors.past_value(i))}

