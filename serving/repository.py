"""Writes and validates the Triton model repository.

config.pbtxt files come from the templates in serving/templates (deploy-time values are
`${var}`, filled with string.Template.safe_substitute, as tensorrtllm_backend's fill_template
does) and from the tensor table in serving/tensors.py for every input and output, so the
configs, the engine and the client cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from serving import tensors
from serving.tensors import TensorSpec

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
MANIFEST = "manifest.json"
MODELS = (tensors.GPT_MODEL, tensors.GENERATE_MODEL, tensors.TOKENIZER_MODEL)
_IO = {
    tensors.GPT_MODEL: (tensors.GPT_INPUTS, tensors.GPT_OUTPUTS),
    tensors.GENERATE_MODEL: (tensors.GENERATE_INPUTS, tensors.GENERATE_OUTPUTS),
    tensors.TOKENIZER_MODEL: (tensors.TOKENIZER_INPUTS, tensors.TOKENIZER_OUTPUTS),
}


class RepositoryError(ValueError):
    pass


@dataclass(frozen=True)
class ServingOptions:
    """Deploy-time values of the repository (config.pbtxt parameters)."""

    max_sequences: int = 8  # KV-pool slots = sequences served at once
    max_sequence_idle_microseconds: int = 60_000_000
    # The batching window of the sequence batcher. 0: a step runs as soon as the model is free;
    # steps that arrive while it runs form the next batch. Measured (gpt2 shape, 2 cores, client
    # loop): 1000 µs cost 3 ms of ITL at concurrency 1 (36.5 vs 33.2 ms) and batched no better at
    # concurrency 8 (3.9 vs 4.3 steps per call): Triton counts the delay from the oldest queued
    # request, which has waited a whole engine call already. Raise it for bursty arrivals.
    max_queue_delay_microseconds: int = 0
    # In-flight batching (the default): `gpt` is a decoupled model with its own batching thread,
    # which waits up to max_step_wait_microseconds for every sequence of its previous engine call
    # to send its next step, so concurrent client-side streams step together in one call (see
    # serving/engine/step.py). Clients step it over gRPC streams. Off: the plain
    # request/response model (HTTP client-side loops, other clients, perf_analyzer without
    # --streaming). Measured (gpt2 shape, 2 cores, 8 client-side streams): 6.3-6.6 steps per
    # engine call with it (7.6 in the decode calls; prompts run alone), 4.3 without.
    inflight_batching: bool = True
    max_step_wait_microseconds: int = 5000
    # Reuse the KV of prompt prefixes already in the pool (serving/engine/prefix_cache.py).
    prefix_cache: bool = True
    # Chunked prefill: prompt tokens per engine iteration, all prompts together (vLLM's name); the
    # decode steps of the other sequences run between the chunks. 0: every queued prompt whole.
    # Measured (gpt2 shape fp32, 2 cores under load, one prompt row after a past): 16 tokens 67 ms,
    # 32: 89, 64: 133, 128: 227, 256: 619, 512: 1249 ms. Served, 8 client-side streams, prompt
    # 128, 64 new tokens, 5 interleaved rounds (medians): ITL p99/p50 7.1 (0), 6.1 (128), 4.5 (64);
    # TTFT p90 5.2 s, 3.7 s, 3.6 s; aggregate 33.0, 40.1, 41.6 tok/s; TTFT at 1 stream 453, 392,
    # 469 ms (noise-level). 32 was worse than 64 on every row (2 rounds).
    # Re-measured with mixed calls and whole prompts on an idle engine (2026-12-02, quiet machine,
    # 8 streams, prompt 128, 128 new tokens, 3 runs each; medians): ITL p99/p50 1.97 (32), 2.4 (40),
    # 2.7 (48), 2.7 (64); steady TTFT p90 at 8 / p50 at 1: 2.3, 2.5, 2.5, 1.8; aggregate 8/1 3.7,
    # 3.6, 3.6, 3.9. 32 is the one budget that keeps a prefilling newcomer's call within 2x a
    # decode call, and a lone prompt no longer pays for it (it runs whole).
    max_num_batched_tokens: int = 32
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (physical cores)
    # ORT's spin-waiting workers (its default); see serving.engine.runtime.session_options for the
    # measurements behind it
    intra_op_spinning: bool = True
    generate_instances: int = 1

    def __post_init__(self) -> None:
        if self.max_sequences < 1:
            raise RepositoryError(f"max_sequences (max batch size) must be >= 1, got {self.max_sequences}")
        if self.max_sequence_idle_microseconds < 1:
            raise RepositoryError("max_sequence_idle_microseconds must be >= 1")
        if self.max_queue_delay_microseconds < 0:
            raise RepositoryError("max_queue_delay_microseconds must be >= 0")
        if self.max_step_wait_microseconds < 0:
            raise RepositoryError("max_step_wait_microseconds must be >= 0")
        if self.max_num_batched_tokens < 0:
            raise RepositoryError(f"max_num_batched_tokens must be >= 0 (0: no chunking), got "
                                  f"{self.max_num_batched_tokens}")


def io_section(kind: str, specs: Sequence[TensorSpec], sizes: dict[str, int]) -> str:
    """`input [...]` / `output [...]` of a config.pbtxt from the tensor table."""
    entries = []
    for spec in specs:
        dims = ", ".join(str(d) for d in spec.dims(sizes))
        extra = ""
        if kind == "input" and spec.optional:
            extra += " optional: true"
        if kind == "input" and spec.name == tensors.INPUT_IDS and spec in tensors.GPT_INPUTS:
            extra += " allow_ragged_batch: true"  # prompts and single tokens share a batch
        entries.append(f'  {{ name: "{spec.name}" data_type: {spec.config_data_type} dims: [ {dims} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def render_config(model: str, values: dict[str, Any], sizes: dict[str, int]) -> str:
    template = string.Template((TEMPLATES / model / "config.pbtxt").read_text())
    inputs, outputs = _IO[model]
    fill = {"inputs": io_section("input", inputs, sizes), "outputs": io_section("output", outputs, sizes)}
    fill.update({k: str(v) for k, v in values.items()})
    text = template.safe_substitute(fill)
    left = sorted(set(re.findall(r"\$\{(\w+)\}", text)))
    if left:
        raise RepositoryError(f"{model}/config.pbtxt has unfilled template values: {left}")
    return text


def parse_config(text: str):
    """Parse a config.pbtxt with Triton's own ModelConfig protobuf schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_repository(
    out_dir: Path,
    *,
    engine_file: Path,
    tokenizer_json: str,
    model_config: dict[str, Any],
    options: ServingOptions = ServingOptions(),
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Lay out gpt/, generate/ and tokenizer/ under out_dir (which must be empty or new).

    engine_file: the ONNX model (or TensorRT plan) copied into gpt/1/; model_config: the
    GPTConfig as a dict (n_layer, n_head, n_embd, n_positions, vocab_size, eos_token_id ...).
    extra_files: more files for gpt/1/ (e.g. external ONNX weights), by name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {tensors.VOCAB: int(model_config["vocab_size"])}
    model_config_json = json.dumps(model_config, sort_keys=True).replace('"', '\\"')
    values = {
        tensors.GPT_MODEL: dict(
            max_sequences=options.max_sequences,
            # STARTs beyond the pool reach the model and get "server busy" at once (UNAVAILABLE),
            # rather than waiting unboundedly in the sequence backlog; clients retry up to their
            # queue timeout. Beyond 4x the pool, Triton's backlog holds them.
            max_candidate_sequences=4 * options.max_sequences,
            max_sequence_idle_microseconds=options.max_sequence_idle_microseconds,
            max_queue_delay_microseconds=options.max_queue_delay_microseconds,
            transaction_policy="model_transaction_policy { decoupled: true }" if options.inflight_batching
            else "# model_transaction_policy { decoupled: true } for in-flight batching",
            max_step_wait_microseconds=options.max_step_wait_microseconds,
            prefix_cache=int(options.prefix_cache),
            max_num_batched_tokens=options.max_num_batched_tokens,
            intra_op_threads=options.intra_op_threads,
            intra_op_spinning=int(options.intra_op_spinning),
            engine_file=Path(engine_file).name,
            model_config_json=model_config_json,
        ),
        tensors.GENERATE_MODEL: dict(generate_instances=options.generate_instances),
        tensors.TOKENIZER_MODEL: {},
    }
    for model in MODELS:
        version = out_dir / model / "1"
        version.mkdir(parents=True, exist_ok=True)
        (out_dir / model / "config.pbtxt").write_text(render_config(model, values[model], sizes))
        shutil.copyfile(TEMPLATES / model / "1" / "model.py", version / "model.py")
    gpt_version = out_dir / tensors.GPT_MODEL / "1"
    shutil.copyfile(engine_file, gpt_version / Path(engine_file).name)
    for name, path in (extra_files or {}).items():
        shutil.copyfile(path, gpt_version / name)
    tok_version = out_dir / tensors.TOKENIZER_MODEL / "1"
    (tok_version / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    generation_config = {
        "eos_token_id": model_config.get("eos_token_id"),
        "n_positions": model_config["n_positions"],
        "vocab_size": model_config["vocab_size"],
        "max_sequences": options.max_sequences,
        "inflight_batching": options.inflight_batching,  # `gpt` is decoupled: step it over a stream
    }
    (tok_version / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    validate_repository(out_dir)
    logger.info("wrote Triton model repository %s", out_dir)
    return out_dir


def sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_manifest(repo: Path) -> list[str]:
    """Problems with the artifacts against manifest.json's hashes (empty: all match)."""
    repo = Path(repo)
    path = repo / MANIFEST
    if not path.is_file():
        raise RepositoryError(f"{path} is missing (export-model writes it)")
    manifest = json.loads(path.read_text())
    problems = []
    for rel, entry in manifest["artifacts"].items():
        file = repo / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(file) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def validate_repository(repo: Path) -> dict[str, Any]:
    """Check a repository: every model present, configs parse with ModelConfig, files exist."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist (run export-model first)")
    configs = {}
    for model in MODELS:
        path = repo / model / "config.pbtxt"
        if not path.is_file():
            raise RepositoryError(f"{path} is missing: {repo} is not a complete gptpipe repository")
        try:
            configs[model] = parse_config(path.read_text())
        except Exception as e:  # text_format.ParseError
            raise RepositoryError(f"{path} does not parse as a Triton ModelConfig: {e}") from e
        if not (repo / model / "1" / "model.py").is_file():
            raise RepositoryError(f"{repo / model / '1' / 'model.py'} is missing")
    params = {k: v.string_value for k, v in configs[tensors.GPT_MODEL].parameters.items()}
    engine = repo / tensors.GPT_MODEL / "1" / params["engine_file"]
    if not engine.is_file():
        raise RepositoryError(f"the gpt engine {engine} is missing")
    return configs
