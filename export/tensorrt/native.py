"""config.pbtxt of the native flavour: `gpt` served by Triton's TensorRT backend (no Python in the
loop), the KV cache as Triton implicit state. EXPERIMENTAL (see serving/templates/gpt_trt/)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Mapping

from serving import tensors
from serving.repository import ServingOptions, io_section, parse_config

NATIVE_TEMPLATE = Path(__file__).parent.parent.parent / "serving" / "templates" / "gpt_trt" / "config.pbtxt"


def render_native_config(*, model_config: Mapping[str, Any], kv_dtype: str,
                         options: ServingOptions = ServingOptions(), engine_file: str = "model.plan") -> str:
    """config.pbtxt of `gpt` served by Triton's TensorRT backend (platform tensorrt_plan), the KV
    cache as Triton implicit state (sequence-batcher `state`: past_key_values.* in, present.* out).
    The client sends the graph's own inputs (input_ids, position_ids, attention_mask); see
    serving/templates/gpt_trt/config.pbtxt for what this flavour does not do."""
    c = model_config
    n_layer, n_head = int(c["n_layer"]), int(c["n_head"])
    head_dim = int(c["n_embd"]) // n_head
    sizes = {tensors.VOCAB: int(c["vocab_size"])}
    graph_in = tensors.graph_inputs(n_layer, n_head, head_dim, kv_dtype=kv_dtype, kv_cache="dynamic")
    graph_out = tensors.graph_outputs(n_layer, n_head, head_dim, int(c["vocab_size"]), kv_dtype=kv_dtype,
                                      logits_dtype="float32", kv_cache="dynamic")
    kv_names = {n for pair in tensors.kv_pairs(n_layer) for n in pair}
    # config.pbtxt dims leave out the batch axis (max_batch_size > 0 adds it)
    inputs = [tensors.TensorSpec(s.name, s.dtype, s.shape[1:]) for s in graph_in if s.name not in kv_names]
    outputs = [tensors.TensorSpec(s.name, s.dtype, s.shape[1:]) for s in graph_out if s.name not in kv_names]
    by_name = {s.name: s for s in graph_in + graph_out}
    states = []
    for past, present in tensors.kv_pairs(n_layer):
        spec = by_name[past]
        dims = ", ".join(str(d) for d in spec.dims())  # (-1, nh, -1, hs) -> leave out the batch
        dims = dims.split(", ", 1)[1]
        empty = ", ".join(str(d) for d in (n_head, 0, head_dim))
        states.append(f'    {{ input_name: "{past}" output_name: "{present}" data_type: {spec.config_data_type} '
                      f'dims: [ {dims} ] initial_state {{ data_type: {spec.config_data_type} dims: [ {empty} ] '
                      f'zero_data: true name: "empty past" }} }}')
    template = string.Template(NATIVE_TEMPLATE.read_text())
    text = template.safe_substitute(
        inputs=io_section("input", inputs, sizes), outputs=io_section("output", outputs, sizes),
        states="  state [\n" + ",\n".join(states) + "\n  ]", max_sequences=options.max_sequences,
        max_candidate_sequences=options.max_sequences,
        max_sequence_idle_microseconds=options.max_sequence_idle_microseconds,
        max_queue_delay_microseconds=options.max_queue_delay_microseconds, engine_file=engine_file)
    parse_config(text)  # Triton's own schema
    return text
