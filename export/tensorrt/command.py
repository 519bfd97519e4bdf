"""`gptpipe build-engine`: the typer command (the profile flags, the CPU checks, the build, its
summary table). serving/cli.py registers it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from export.tensorrt.build import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPT_LEVEL,
    PRECISIONS,
    EngineBuildError,
    EngineSummary,
    build_engine,
)
from export.tensorrt.coverage import check_onnx_for_tensorrt, graph_facts
from serving.engine.gpu_libs import TensorRTUnavailableError
from serving.engine.profiles import AxisRange, Profile, default_profiles


# ---------------------------------------------------------------------------- profile flags


SHAPE_AXES = ("batch", "seq", "past")


def parse_shape_spec(text: Optional[str], *, flag: str) -> dict[str, int]:
    """`batch=1,seq=1,past=0` -> {"batch": 1, "seq": 1, "past": 0}; any subset of the axes."""
    if not text:
        return {}
    out: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in SHAPE_AXES:
            raise ValueError(f"{flag}: {part.strip()!r} is not AXIS=N with AXIS one of {', '.join(SHAPE_AXES)}")
        if key in out:
            raise ValueError(f"{flag}: {key} given twice")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{flag}: {key}={value!r} is not an integer") from None
        if out[key] < 0:
            raise ValueError(f"{flag}: {key}={out[key]} must be >= 0")
    return out


def profiles_from_flags(*, n_positions: int, max_batch: int, min_shapes: Optional[str] = None,
                        opt_shapes: Optional[str] = None, max_shapes: Optional[str] = None) -> tuple[Profile, ...]:
    """No flags: the two default profiles (decode, prefill). Any flag: ONE profile, the given
    values over these defaults — min batch 1, seq 1, past 0; opt batch max_batch, seq 1, past
    n_positions // 2; max batch max_batch, seq n_positions, past n_positions - 1."""
    lo = parse_shape_spec(min_shapes, flag="--min-shapes")
    opt = parse_shape_spec(opt_shapes, flag="--opt-shapes")
    hi = parse_shape_spec(max_shapes, flag="--max-shapes")
    if not (lo or opt or hi):
        return default_profiles(n_positions=n_positions, max_batch=max_batch)
    lo = {"batch": 1, "seq": 1, "past": 0, **lo}
    opt = {"batch": max_batch, "seq": 1, "past": n_positions // 2, **opt}
    hi = {"batch": max_batch, "seq": n_positions, "past": n_positions - 1, **hi}
    ranges = {}
    for axis in SHAPE_AXES:
        try:
            ranges[axis] = AxisRange(lo[axis], opt[axis], hi[axis])
        except ValueError:
            raise ValueError(f"{axis}: --min-shapes/--opt-shapes/--max-shapes give {lo[axis]} / {opt[axis]} / "
                             f"{hi[axis]}; need min <= opt <= max") from None
    return (Profile("custom", **ranges),)



# ---------------------------------------------------------------------------- the command


def _console():
    from rich.console import Console

    return Console()


def print_summary(summary: EngineSummary) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"TensorRT engine {Path(summary.path).name}", show_header=False)
    table.add_row("size", f"{summary.bytes / 2**20:.1f} MiB")
    table.add_row("TensorRT / GPU", f"{summary.tensorrt_version} / {summary.device}")
    table.add_row("precision", f"{summary.precision} (opt level {summary.opt_level}"
                  f"{', version-compatible' if summary.version_compatible else ''})")
    table.add_row("layers", f"{summary.layers}: " + ", ".join(f"{k} {v}" for k, v in summary.layer_precisions.items()))
    for p in summary.profiles:
        table.add_row(f"profile {p.name}", f"batch {p.batch.min}/{p.batch.opt}/{p.batch.max}  "
                      f"seq {p.seq.min}/{p.seq.opt}/{p.seq.max}  past {p.past.min}/{p.past.opt}/{p.past.max}")
    table.add_row("build", f"{summary.build_seconds:.0f} s" + (f", timing cache {summary.timing_cache}"
                                                                if summary.timing_cache else ""))
    console.print(table)


OnnxArg = Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                          help="The dynamic-cache ONNX (export-model ... --kv-cache dynamic).")]
OutOption = Annotated[Optional[Path], typer.Option("--out", "-o", help="Engine file (.plan); default: next to the ONNX.")]
PrecisionOption = Annotated[str, typer.Option("--precision", help=f"One of {', '.join(PRECISIONS)} "
                                              "(fp8/int8 need a Q/DQ-quantized ONNX).")]
MinShapesOption = Annotated[Optional[str], typer.Option("--min-shapes", help="One custom profile: minima, e.g. batch=1,seq=1,past=0.")]
OptShapesOption = Annotated[Optional[str], typer.Option("--opt-shapes", help="One custom profile: the shapes TensorRT tunes for.")]
MaxShapesOption = Annotated[Optional[str], typer.Option("--max-shapes", help="One custom profile: maxima, e.g. batch=16,seq=1024,past=1023.")]
MaxBatchOption = Annotated[int, typer.Option("--max-batch", min=1, help="Largest batch of the default profiles "
                                             "(>= the repository's max sequences).")]
OptLevelOption = Annotated[int, typer.Option("--opt-level", min=0, max=5, help="Builder optimisation level 0-5 "
                                             "(higher: slower build, maybe a faster engine).")]
VersionCompatibleOption = Annotated[bool, typer.Option("--version-compatible", help="An engine later TensorRT versions "
                                                       "can run (lean runtime inside; python-backend flavour).")]
TimingCacheOption = Annotated[Optional[Path], typer.Option("--timing-cache", help="Timing cache file: read if present, "
                                                           "written after the build.")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar during the build.")]
CheckOnlyOption = Annotated[bool, typer.Option("--check-only", help="Only the CPU checks (ops, dtypes, profiles): "
                                               "no GPU or TensorRT needed.")]


def build_engine_command(
    onnx_path: OnnxArg,
    out: OutOption = None,
    precision: PrecisionOption = "fp16",
    min_shapes: MinShapesOption = None,
    opt_shapes: OptShapesOption = None,
    max_shapes: MaxShapesOption = None,
    max_batch: MaxBatchOption = DEFAULT_MAX_BATCH,
    opt_level: OptLevelOption = DEFAULT_OPT_LEVEL,
    version_compatible: VersionCompatibleOption = False,
    timing_cache: TimingCacheOption = None,
    progress: ProgressOption = True,
    check_only: CheckOnlyOption = False,
) -> None:
    """Build a TensorRT engine from a dynamic-cache ONNX export (needs a GPU; --check-only runs the CPU checks).

    Example: gptpipe build-engine out/gpt_dynamic.onnx --out out/gpt.plan --precision fp16 --max-batch 16

    Example: gptpipe build-engine out/gpt_dynamic.onnx --check-only
    """
    try:
        facts = graph_facts(onnx_path)
        profiles = profiles_from_flags(n_positions=facts.n_positions, max_batch=max_batch, min_shapes=min_shapes,
                                       opt_shapes=opt_shapes, max_shapes=max_shapes)
        report = check_onnx_for_tensorrt(onnx_path)
        report.raise_if_problems()
        if precision not in PRECISIONS:
            raise typer.BadParameter(f"must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                                     param_hint="--precision")
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, typer.BadParameter):
            raise
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"{onnx_path.name}: {sum(report.op_counts.values())} nodes of {len(report.op_counts)} op types, all "
               f"supported by TensorRT {report.tensorrt_version}'s ONNX parser")
    for p in profiles:
        typer.echo(f"  profile {p.name}: batch {p.batch.min}/{p.batch.opt}/{p.batch.max}, seq "
                   f"{p.seq.min}/{p.seq.opt}/{p.seq.max}, past {p.past.min}/{p.past.opt}/{p.past.max}")
    if check_only:
        return
    out = out or onnx_path.with_suffix(".plan")
    try:
        summary = build_engine(onnx_path, out, precision=precision, profiles=profiles, opt_level=opt_level,
                               version_compatible=version_compatible, timing_cache=timing_cache,
                               progress=progress, max_batch=max_batch)
    except TensorRTUnavailableError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from e
    except (ValueError, EngineBuildError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    print_summary(summary)

