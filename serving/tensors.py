"""THE tensor table: the name, dtype and shape of every tensor of the ONNX graph, the Triton
models and the client. Everything else (torch.onnx.export names and dynamic axes, config.pbtxt,
the runtime's bindings, the client's requests) is generated from here; no tensor name is typed
twice. (onnxruntime-genai builder style: inputs/outputs declared once.)

Names follow the ecosystem (HF Optimum, onnxruntime-genai): `past_key_values.{i}.key|value` in,
`present.{i}.key|value` out, layout (batch, heads, seq, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

Dim = Union[int, str]  # a fixed size, or a symbolic axis name
KVCache = Literal["static", "dynamic"]

# symbolic axes
BATCH = "batch_size"
SEQ = "sequence_length"  # new tokens in this step
PAST = "past_sequence_length"  # dynamic cache: tokens already in the cache
TOTAL = "total_sequence_length"  # past + new
MAX_SEQ = "max_sequence_length"  # static cache: the preallocated buffer length (n_positions)
# static cache, the prompt-chunk group of a mixed call (one row): its own axes
CHUNK_SEQ = "chunk_sequence_length"
CHUNK_TOTAL = "chunk_total_sequence_length"
CHUNK_MAX_SEQ = "chunk_max_sequence_length"
LOGIT_ROWS = "logit_rows"  # static cache: batch_size + 1 (the rows, then the chunk)

# numpy dtype name -> (ONNX / Triton client datatype, config.pbtxt data_type)
_TRITON = {
    "int64": ("INT64", "TYPE_INT64"),
    "int32": ("INT32", "TYPE_INT32"),
    "int8": ("INT8", "TYPE_INT8"),
    "uint64": ("UINT64", "TYPE_UINT64"),
    "float32": ("FP32", "TYPE_FP32"),
    "float16": ("FP16", "TYPE_FP16"),
    "bool": ("BOOL", "TYPE_BOOL"),
    "bytes": ("BYTES", "TYPE_STRING"),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, or "bytes" for Triton strings
    shape: tuple[Dim, ...]
    optional: bool = False
    doc: str = ""

    @property
    def datatype(self) -> str:
        """The Triton wire datatype (tritonclient InferInput), e.g. "INT64"."""
        return _TRITON[self.dtype][0]

    @property
    def config_data_type(self) -> str:
        """The config.pbtxt data_type, e.g. "TYPE_INT64"."""
        return _TRITON[self.dtype][1]

    def dims(self, sizes: dict[str, int] | None = None) -> list[int]:
        """Concrete dims; symbolic axes become -1 unless given in sizes."""
        sizes = sizes or {}
        return [d if isinstance(d, int) else sizes.get(d, -1) for d in self.shape]


# ---------------------------------------------------------------- the ONNX graph


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"


CHUNK_PREFIX = "chunk."


def chunk(name: str) -> str:
    """The name of a tensor of the static graph's second attention group, the prompt chunk of a
    mixed call: `chunk.input_ids`, `chunk.past_key_values.0.key` -> `chunk.present.0.key`, ..."""
    return CHUNK_PREFIX + name


def graph_inputs(n_layer: int, n_head: int, head_dim: int, *, kv_dtype: str, kv_cache: KVCache) -> list[TensorSpec]:
    """Inputs of the exported graph.

    static: past buffers are (B, nh, max_sequence_length, hs), updated in place (ORT IO binding
    binds the same buffer as past and present); attention_mask (B, total) holds each row's
    valid length as its number of ones (right padding). Then the same inputs again, `chunk.`
    names, for one more row (the prompt chunk of a mixed call) with axes of its own: the graph
    runs both groups' tokens packed together and each group through its own attention.
    dynamic: past is (B, nh, past_sequence_length, hs); present = past ++ new.
    """
    kv_len = MAX_SEQ if kv_cache == "static" else PAST
    specs = _group_inputs("", BATCH, SEQ, TOTAL, kv_len, n_layer, n_head, head_dim, kv_dtype)
    if kv_cache == "static":
        specs += _group_inputs(CHUNK_PREFIX, 1, CHUNK_SEQ, CHUNK_TOTAL, CHUNK_MAX_SEQ, n_layer, n_head, head_dim, kv_dtype)
    return specs


def _group_inputs(prefix: str, rows: Dim, seq: str, total: str, kv_len: str, n_layer: int, n_head: int,
                  head_dim: int, kv_dtype: str) -> list[TensorSpec]:
    specs = [
        TensorSpec(prefix + INPUT_IDS, "int64", (rows, seq), doc="new token ids of this step"),
        TensorSpec(prefix + POSITION_IDS, "int64", (rows, seq), doc="absolute positions of the new tokens"),
        TensorSpec(prefix + ATTENTION_MASK, "int64", (rows, total), doc="1 for real tokens, 0 for padding"),
    ]
    for i in range(n_layer):
        for name in (past_key(i), past_value(i)):
            specs.append(TensorSpec(prefix + name, kv_dtype, (rows, n_head, kv_len, head_dim)))
    return specs


def graph_outputs(n_layer: int, n_head: int, head_dim: int, vocab_size: int, *, kv_dtype: str,
                  logits_dtype: str, kv_cache: KVCache) -> list[TensorSpec]:
    """Outputs: the last position's logits only (a decode step must not return seq x vocab
    floats), and the presents. static: logits (B + 1, V), each row's last position then the
    chunk's last, and the chunk's presents after the rows'."""
    kv_len = MAX_SEQ if kv_cache == "static" else TOTAL
    rows = LOGIT_ROWS if kv_cache == "static" else BATCH
    specs = [TensorSpec(LOGITS, logits_dtype, (rows, vocab_size), doc="logits of the last position")]
    for prefix, batch, length in (("", BATCH, kv_len), (CHUNK_PREFIX, 1, CHUNK_MAX_SEQ)):
        if prefix and kv_cache != "static":
            break
        for i in range(n_layer):
            for name in (present_key(i), present_value(i)):
                specs.append(TensorSpec(prefix + name, kv_dtype, (batch, n_head, length, head_dim)))
    return specs


# Which present output updates which past input (the in-place static cache aliases them).
def kv_pairs(n_layer: int) -> list[tuple[str, str]]:
    return [(past_key(i), present_key(i)) for i in range(n_layer)] + [
        (past_value(i), present_value(i)) for i in range(n_layer)
    ]


# ---------------------------------------------------------------- the Triton models
# config.pbtxt dims exclude the batch dimension (max_batch_size > 0 adds it); "vocab_size" is
# filled in at export time from the model config.

VOCAB = "vocab_size"

# Triton's sequence-batcher controls of the stateful `gpt` model (filled by Triton from the
# client's sequence_id / sequence_start / sequence_end request fields).
CONTROL_START = "START"
CONTROL_END = "END"
CONTROL_CORRID = "CORRID"
# A request parameter (bool) of a `gpt` step sent over a gRPC stream: keep the step's request
# open until the sequence's next step, as a lease whose cancellation frees the KV slot at once.
LEASE_PARAMETER = "gptpipe_lease"
# Request parameters of a START+END `gpt` request that runs a whole generation in the engine
# (a JSON object: max_new_tokens and the sampling fields), and of one that stops such a
# generation (the int correlation id of its request): serving/engine/generations.py.
GENERATE_PARAMETER = "gptpipe_generate"
CANCEL_PARAMETER = "gptpipe_cancel"

# `gpt`: one step of one sequence; the KV cache stays on the server, keyed by the correlation id.
GPT_MODEL = "gpt"
GPT_INPUTS = [
    TensorSpec(INPUT_IDS, "int64", (SEQ,), doc="the whole prompt at START, then the new token(s)"),
]
OUTPUT_IDS = "output_ids"
GPT_OUTPUTS = [
    TensorSpec(LOGITS, "float32", (VOCAB,), doc="logits of the last position"),
    # A client that samples greedily (no repetition penalty, no log-probs) asks for this one
    # alone: 8 bytes per step instead of vocab_size floats (200 KB at gpt2's 50257).
    TensorSpec(OUTPUT_IDS, "int64", (1,), doc="the greedy next token: argmax of the logits, lowest id on ties"),
]

# `generate`: decoupled, streaming, the server-side loop. Names as tensorrtllm_backend's
# ensemble/tensorrt_llm_bls models name them where they mean the same thing.
# Integers are INT64: Triton's HTTP generate extension casts a JSON number to the declared
# type before the model sees it (4294967300 into an INT32 is 4), so only a wide type lets the
# model check the range (serving.request_rules).
GENERATE_MODEL = "generate"
GENERATE_INPUTS = [
    TensorSpec("text_input", "bytes", (1,), optional=True, doc="the prompt as text"),
    TensorSpec(INPUT_IDS, "int64", (-1,), optional=True, doc="the prompt as token ids"),
    TensorSpec("max_tokens", "int64", (1,), optional=True, doc="new tokens at most (>= 1)"),
    TensorSpec("temperature", "float32", (1,), optional=True, doc="0 = greedy"),
    TensorSpec("top_k", "int64", (1,), optional=True, doc="0 = off"),
    TensorSpec("top_p", "float32", (1,), optional=True, doc="in (0, 1]"),
    TensorSpec("repetition_penalty", "float32", (1,), optional=True, doc="> 0; 1 = off"),
    TensorSpec("random_seed", "uint64", (1,), optional=True, doc="seed of the sampler"),
    TensorSpec("stop_words", "bytes", (-1,), optional=True, doc="stop strings, cut from the text"),
    TensorSpec("end_id", "int64", (1,), optional=True, doc="end-of-sequence token id; -1 = none"),
    TensorSpec("stream", "bool", (1,), optional=True, doc="one response per token"),
    TensorSpec("return_log_probs", "bool", (1,), optional=True, doc="add output_log_probs"),
    # OpenAI's additive penalties, and the rest of what Triton's own OpenAI frontend sends a
    # TensorRT-LLM-style model, so either frontend can drive `generate`
    TensorSpec("presence_penalty", "float32", (1,), optional=True, doc="in [-2, 2]; 0 = off"),
    TensorSpec("frequency_penalty", "float32", (1,), optional=True, doc="in [-2, 2]; 0 = off"),
    TensorSpec("seed", "uint64", (1,), optional=True, doc="seed of the sampler (random_seed's other name)"),
    TensorSpec("exclude_input_in_output", "bool", (1,), optional=True,
               doc="false: text_output starts with the prompt (default true)"),
    # vLLM's extras
    TensorSpec("min_tokens", "int64", (1,), optional=True,
               doc="end_id and stop_token_ids banned, stop_words not looked for, before this many tokens"),
    TensorSpec("stop_token_ids", "int64", (-1,), optional=True, doc="token ids that end the generation (stop)"),
]
GENERATE_OUTPUTS = [
    TensorSpec("text_output", "bytes", (1,), doc="the text (streaming: this response's delta)"),
    TensorSpec("output_ids", "int64", (-1,), doc="the new token ids (streaming: this response's)"),
    TensorSpec("finish_reason", "bytes", (1,), doc='"length" | "stop" | "eos" | "" while streaming'),
    TensorSpec("output_log_probs", "float32", (-1,), doc="log-probs of output_ids, when asked"),
    TensorSpec("num_input_tokens", "int32", (1,), doc="prompt tokens"),
    TensorSpec("num_output_tokens", "int32", (1,), doc="tokens generated so far"),
]

# `tokenizer`: what a remote client needs besides a URL.
TOKENIZER_MODEL = "tokenizer"
TOKENIZER_INPUTS = [
    TensorSpec("request", "bool", (1,), optional=True, doc="ignored; Triton models need an input"),
]
TOKENIZER_OUTPUTS = [
    TensorSpec("tokenizer_json", "bytes", (1,), doc="the tokenizers-library tokenizer.json"),
    TensorSpec("generation_config", "bytes", (1,), doc="JSON: eos_token_id, n_positions, vocab_size, ..."),
]
