"""`export-model`: a checkpoint in, a validated Triton model repository out.

    export-model --model demo --precision int8 --output model_repository
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from export.onnx import DEFAULT_OPSET, KV_CACHES, PRECISIONS, ExportResult, ValidationError, export_onnx
from export.onnx.graph import kv_cache_dtype_problem
from serving.repository import MANIFEST, RepositoryError, ServingOptions, write_repository

logger = logging.getLogger(__name__)
console = Console(stderr=True)

DEFAULT_OUTPUT = Path("model_repository")
# files of the checked-in model_repository/ folder that are not part of an export; kept on replace
KEEP_FILES = ("README.md", ".gitignore")
EXPORT_MARKERS = (MANIFEST, "gpt", "generate", "tokenizer")
PPL_TEXT_CHARS = 20_000  # of the demo's held-out text, for the perplexity check


class ExportFailed(Exception):
    """A user-facing failure: printed as one clear message, exit code 1."""


@dataclass
class Stages:
    """Runs named stages under a spinner and records their timings (rich)."""

    timings: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        with console.status(f"[bold]{name}[/bold] ..."):
            result = fn()
        self.timings[name] = time.perf_counter() - t0
        console.print(f"[green]✓[/green] {name} [dim]({self.timings[name]:.1f} s)[/dim]")
        return result


def check_output(output: Path, *, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportFailed(f"--output {output} is a file; give a folder for the model repository")
    if has_export(output) and not force:
        raise ExportFailed(f"--output {output} already holds an export; pass --force to replace it")


def has_export(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).exists() for m in EXPORT_MARKERS)


def replace_atomically(staging: Path, output: Path) -> None:
    """Swap a fully written staging folder in for `output` (renames on one filesystem), keeping
    the checked-in files of the old folder. An interruption before this leaves `output` as it
    was; a stale staging folder is removed by the next export."""
    for name in KEEP_FILES:
        if (output / name).is_file() and not (staging / name).exists():
            shutil.copy2(output / name, staging / name)
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        output.rename(old)
    staging.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(output: Path) -> None:
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def heldout_tokens(tokenizer) -> list[int]:
    """The demo corpus's held-out text in this model's tokens: the perplexity check's text."""
    from export.demo import heldout_text

    return tokenizer.encode(heldout_text()[:PPL_TEXT_CHARS])


def summary_table(result: ExportResult, stages: Stages, output: Path) -> Table:
    table = Table(title=f"export-model: {output}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    c = result.config
    table.add_row("model", f"{c['n_layer']} layers, {c['n_head']} heads, n_embd {c['n_embd']}, "
                           f"vocab {c['vocab_size']}, context {c['n_positions']}")
    table.add_row("graph", f"{result.precision}, opset {result.opset}, {result.kv_cache} KV cache"
                           f"{'' if result.kv_cache_dtype == 'auto' else ' (' + result.kv_cache_dtype + ')'}, "
                           f"{result.bytes / 2**20:.1f} MiB")
    fused = result.fusions.get("fused") or {}
    if fused:
        table.add_row("fusions", ", ".join(f"{k}: {v}" for k, v in fused.items() if v) or "none")
    v = result.validation
    if v is not None:
        o = v.overall
        agree = "n/a" if o.agreement is None else f"{o.agreement:.1%} of {o.decisive}"
        table.add_row("validation", f"max |Δlogits| {o.max_abs_logits:.2e}, rel {o.rel_logits:.2e}, "
                                    f"greedy agreement {agree} ({o.positions} positions)")
        if v.perplexity is not None:
            p = v.perplexity
            table.add_row("perplexity", f"{p.ppl_onnx:.3f} vs PyTorch {p.ppl_torch:.3f} "
                                        f"(Δ {p.rel_change:.3%}, {p.tokens} tokens)")
    table.add_row("timings", ", ".join(f"{k} {s:.1f} s" for k, s in stages.timings.items()))
    return table


def export_model(
    model: Annotated[str, typer.Option("--model", "-m", help="demo, <preset>-random, a Hugging Face "
                                       "GPT-2 folder or hub id, or a nanoGPT ckpt.pt")] = "demo",
    precision: Annotated[str, typer.Option("--precision", "-p", help=f"one of {', '.join(PRECISIONS)}")] = "fp16",
    output: Annotated[Path, typer.Option("--output", "-o", help="the Triton model repository to write")] = DEFAULT_OUTPUT,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="sequences served at once "
                                                "(KV-pool slots; Triton's max_batch_size)")] = 8,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset")] = DEFAULT_OPSET,
    force: Annotated[bool, typer.Option("--force", help="replace an existing export")] = False,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="tokenizer.json or a folder "
                                                      "with one (for checkpoints without one)")] = None,
    kv_cache: Annotated[str, typer.Option("--kv-cache", help="static: in-place cache for ONNX Runtime "
                                          "(fast); dynamic: portable graph (TensorRT)")] = "static",
    kv_cache_dtype: Annotated[str, typer.Option(
        "--kv-cache-dtype", help="auto: the precision's float type; int8: int8 keys and values with "
                                 "per-channel scales (int8/int4 precisions; a quarter of the KV memory, "
                                 "faster decode at many streams, slower prefill)")] = "auto",
    idle_timeout_s: Annotated[float, typer.Option("--idle-timeout", help="seconds before an idle "
                                                  "sequence's KV slot is freed")] = 60.0,
    inflight_batching: Annotated[bool, typer.Option(
        "--inflight-batching/--no-inflight-batching",
        help="in-flight batching: `gpt` is a decoupled model that steps concurrent sequences together "
             "(clients step it over gRPC streams); off: plain request/response `gpt` (HTTP client loops)")] = True,
    max_step_wait_us: Annotated[int, typer.Option(
        "--max-step-wait-us", help="in-flight batching: how long (µs) an engine call may wait for the "
                                   "sequences of the previous call to send their next step")] = 5000,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache",
        help="reuse the KV of prompt prefixes already in the pool (blocks of 16 tokens)")] = True,
    max_num_batched_tokens: Annotated[int, typer.Option(
        "--max-num-batched-tokens", help="chunked prefill: prompt tokens per engine call (decode steps "
                                         "of other sequences run between chunks); 0: whole prompts")] = 32,
    intra_op_spinning: Annotated[bool, typer.Option(
        "--intra-op-spinning/--no-intra-op-spinning",
        help="ONNX Runtime's spin-waiting intra-op threads in the served engine, inside each step (they "
             "stop when it returns): faster steps; off: the workers sleep between an op's tasks too")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log at INFO level")] = False,
) -> None:
    """Export a GPT-2 checkpoint to ONNX with a KV cache, validate it against PyTorch, and write
    a complete Triton model repository (gpt, generate, tokenizer) with a manifest.

    Example: export-model --model demo --precision int8 --output model_repository
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # the exporter's own chatter (torchvision ops it skips, deprecations)
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        _export(model=model, precision=precision, output=output, max_batch_size=max_batch_size,
                opset=opset, force=force, tokenizer=tokenizer, kv_cache=kv_cache,
                kv_cache_dtype=kv_cache_dtype, idle_timeout_s=idle_timeout_s,
                inflight_batching=inflight_batching,
                max_step_wait_us=max_step_wait_us, prefix_cache=prefix_cache,
                max_num_batched_tokens=max_num_batched_tokens, intra_op_spinning=intra_op_spinning)
    except (ExportFailed, ValidationError, RepositoryError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(1) from None


def _export(*, model: str, precision: str, output: Path, max_batch_size: int, opset: int, force: bool,
            tokenizer: Optional[Path], kv_cache: str, idle_timeout_s: float, kv_cache_dtype: str = "auto",
            inflight_batching: bool = True,
            max_step_wait_us: int = 5000, prefix_cache: bool = True,
            max_num_batched_tokens: int = 32, intra_op_spinning: bool = True) -> None:
    # reject bad flags before any slow work
    if precision not in PRECISIONS:
        raise ExportFailed(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if kv_cache not in KV_CACHES:
        raise ExportFailed(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    problem = kv_cache_dtype_problem(kv_cache_dtype, kv_cache=kv_cache, precision=precision)
    if problem:
        raise ExportFailed(f"--kv-cache-dtype {problem}")
    if max_batch_size < 1:
        raise ExportFailed(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if not idle_timeout_s > 0:
        raise ExportFailed(f"--idle-timeout must be > 0 seconds, got {idle_timeout_s}")
    if max_step_wait_us < 0:
        raise ExportFailed(f"--max-step-wait-us must be >= 0, got {max_step_wait_us}")
    if max_num_batched_tokens < 0:
        raise ExportFailed(f"--max-num-batched-tokens must be >= 0 (0: no chunking), got {max_num_batched_tokens}")
    from export.onnx import check_opset

    try:
        check_opset(opset)
    except ValueError as e:
        raise ExportFailed(f"--opset: {e}") from None
    output = output.resolve()
    check_output(output, force=force)
    options = ServingOptions(max_sequences=max_batch_size,
                             max_sequence_idle_microseconds=int(idle_timeout_s * 1e6),
                             inflight_batching=inflight_batching, max_step_wait_microseconds=max_step_wait_us,
                             prefix_cache=prefix_cache, max_num_batched_tokens=max_num_batched_tokens,
                             intra_op_spinning=intra_op_spinning)
    from serving.server import has_nvidia_gpu

    if precision == "fp16" and not has_nvidia_gpu():
        console.print("[yellow]note:[/yellow] no GPU here: fp16 runs on the CPU through casts; "
                      "fp32 or int8 is the fast choice on this machine. Going on with fp16.")

    from export.load import CheckpointError
    from export.sources import load_model

    stages = Stages()
    try:
        gpt, tok = stages.run(f"load {model}", lambda: load_model(model, tokenizer=tokenizer))
    except CheckpointError as e:
        raise ExportFailed(f"--model {model}: {e}") from None
    if tok is None:
        raise ExportFailed(f"--model {model} has no tokenizer; pass --tokenizer PATH (tokenizer.json, "
                           "or a folder with tokenizer.json or vocab.json + merges.txt)")
    console.print(f"  {gpt.num_parameters():,} parameters, vocab {gpt.config.vocab_size}, "
                  f"context {gpt.config.n_positions}")

    _clean_stale(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build = staging / "build"
        text = heldout_tokens(tok)
        kv_label = "" if kv_cache_dtype == "auto" else f" ({kv_cache_dtype})"
        result = stages.run(
            f"export ONNX ({kv_cache} KV cache{kv_label}, {precision}, fusions)",
            lambda: export_onnx(gpt, build / "model.onnx", kv_cache=kv_cache, precision=precision,
                                opset=opset, validate=False, text_tokens=text, kv_cache_dtype=kv_cache_dtype))
        from export.onnx import validate_onnx

        report = stages.run("validate against PyTorch (prefill+decode, empty past, batched lengths, perplexity)",
                            lambda: validate_onnx(result.path, gpt, precision=precision, text_tokens=text))
        import dataclasses

        result = dataclasses.replace(result, validation=report)
        extra = {p.name: p for p in result.paths if p != result.path}

        def write() -> None:
            write_repository(staging, engine_file=result.path, tokenizer_json=tok.to_str(),
                             model_config=result.config, options=options, extra_files=extra)
            copy_chat_template(staging, model=model, tokenizer=tokenizer)
            shutil.rmtree(build)
            from export.manifest import tensor_table, write_manifest

            write_manifest(staging, source=model, precision=precision, opset=opset, kv_cache=kv_cache,
                           kv_cache_dtype=kv_cache_dtype,
                           model_config=result.config, serving=options,
                           tensors={"inputs": tensor_table(result.inputs), "outputs": tensor_table(result.outputs)},
                           fusions=result.fusions, validation=report.to_dict(),
                           timings={k: round(v, 2) for k, v in stages.timings.items()})
            replace_atomically(staging, output)

        stages.run(f"write repository {output}", write)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(summary_table(result, stages, output))


def copy_chat_template(repository: Path, *, model: str, tokenizer: Optional[Path]) -> Optional[Path]:
    """The checkpoint's chat template (its chat_template.jinja, or tokenizer_config.json's
    chat_template) into tokenizer/1/, where the OpenAI frontend finds it; None if it has none."""
    from serving.openai.chat_template import CHAT_TEMPLATE_FILE, checkpoint_chat_template

    folders = [Path(p) for p in (tokenizer, model) if p is not None]
    for folder in (f if f.is_dir() else f.parent for f in folders if f.exists()):
        template = checkpoint_chat_template(folder)
        if template is not None:
            target = Path(repository) / "tokenizer" / "1" / CHAT_TEMPLATE_FILE
            target.write_text(template, encoding="utf-8")
            return target
    return None


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(export_model)

if __name__ == "__main__":
    app()
