"""`gptpipe bench`: TTFT, ITL, tokens/s and requests/s of a gptpipe server, with baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

UrlOption = Annotated[Optional[str], typer.Option(
    "--url", help="gRPC host:port of a running server; default: start a local server on --repository.")]
RepositoryOption = Annotated[Path, typer.Option(
    "--repository", help="The model repository (served locally without --url; read for the baselines).")]
ModeOption = Annotated[str, typer.Option(
    "--mode", help="client: the client-side loop over the gpt model; server: the streaming generate model; "
    "engine: the gpt engine's own loop (gptpipe_generate) over a gRPC stream, no generate model.")]
ConcurrencyOption = Annotated[str, typer.Option(
    "--concurrency", help="Comma-separated concurrent streams per level, e.g. 1,2,4,8.")]
PromptTokensOption = Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length (random token ids).")]
OutputTokensOption = Annotated[int, typer.Option("--output-tokens", min=2, help="New tokens per request (eos ignored).")]
RequestsOption = Annotated[Optional[int], typer.Option(
    "--requests", min=1, help="Requests per level (default: max(4, 3 x concurrency): each stream's first "
    "request, all sent together, and two more in the steady state).")]
BaselinesOption = Annotated[bool, typer.Option(
    "--baselines/--no-baselines", help="Also run transformers, the PyTorch loop, in-process ORT and the bandwidth limit.")]
CheckpointOption = Annotated[Optional[str], typer.Option(
    "--checkpoint", help="Weights for the PyTorch baselines (default: the repository manifest's source).")]
OutOption = Annotated[Path, typer.Option("--out", help="Folder for bench.json, bench.md and the plots.")]
EndpointOption = Annotated[str, typer.Option(
    "--endpoint", help="grpc: the direct client; openai: the OpenAI frontend paired with the direct client "
    "(openai_vs_grpc_c<N> ratios; aiperf beside it when .venv-aiperf exists).")]
ScenarioOption = Annotated[str, typer.Option(
    "--scenario", help="levels: closed-loop concurrency levels; prefix: requests sharing a system prompt of "
                       "--prompt-tokens tokens (+16 new each), TTFT with the prefix cache vs without (paired)")]
PeersOption = Annotated[Optional[str], typer.Option(
    "--peers", help="Peer engines to pair with served requests on the same weights: openvino, llama.cpp "
                    "(comma-separated; installed once by scripts/install_peers.sh, skipped with the reason if not).")]
SuiteOption = Annotated[Optional[str], typer.Option(
    "--suite", help="targets: export gpt2-random (fp32, int8) and demo, serve, bench, check the targets.")]


def parse_concurrency(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint="--concurrency") from None
    if not levels or any(c < 1 for c in levels):
        raise typer.BadParameter(f"{text!r}: every level must be an integer >= 1", param_hint="--concurrency")
    if len(set(levels)) != len(levels):
        raise typer.BadParameter(f"{text!r} repeats a level", param_hint="--concurrency")
    return tuple(sorted(levels))


def parse_peer_names(text: Optional[str]) -> tuple[str, ...]:
    from serving.bench.peer_bench import parse_peers

    if text is None:
        return ()
    try:
        return parse_peers(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--peers") from None


class _RichProgress:
    """serving.bench.progress.Progress drawn with rich: one bar per task, finished bars stay."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._task: Optional[int] = None

    def start(self, description: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[self._task].total)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)


def bench(
    url: UrlOption = None,
    repository: RepositoryOption = Path("model_repository"),
    mode: ModeOption = "client",
    concurrency: ConcurrencyOption = "1,2,4,8",
    prompt_tokens: PromptTokensOption = 128,
    output_tokens: OutputTokensOption = 128,
    requests: RequestsOption = None,
    baselines: BaselinesOption = True,
    checkpoint: CheckpointOption = None,
    out: OutOption = Path("bench-out"),
    suite: SuiteOption = None,
    endpoint: EndpointOption = "grpc",
    scenario: ScenarioOption = "levels",
    peers: PeersOption = None,
) -> None:
    """Benchmark a gptpipe server: per concurrency level, time to first token (p50/p90/p99),
    inter-token latency (p50/p99), tokens/s per stream and in aggregate, requests/s; plus
    baselines on the same weights and thread count. Writes bench.json, bench.md and PNG plots.

    Example: gptpipe bench --repository model_repository --concurrency 1,4 --out bench-out

    Example: gptpipe bench --url localhost:8001 --mode server --no-baselines

    Example: gptpipe bench --scenario prefix --prompt-tokens 512 --output-tokens 8 --out bench-prefix

    Example: gptpipe bench --suite targets --out bench-out

    Example: gptpipe bench --endpoint openai --concurrency 1,8 --prompt-tokens 32 --output-tokens 64

    Example: gptpipe bench --repository gpt2-fp32 --peers openvino,llama.cpp --concurrency 1,8 --no-baselines
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from serving.bench.report import finite_or_none, render_markdown, write_report
    from serving.bench.run import BenchOptions, run_bench
    from serving.bench.served import MODES
    from serving.bench.targets import run_targets
    from serving.server import TritonServerError

    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r}: choose one of {', '.join(MODES)}", param_hint="--mode")
    levels = parse_concurrency(concurrency)
    peer_names = parse_peer_names(peers)
    if peer_names and endpoint != "grpc":
        raise typer.BadParameter("the peers are paired with the gRPC paths; drop --endpoint openai", param_hint="--peers")
    if peer_names and scenario != "levels":
        raise typer.BadParameter("the peers run beside the levels scenario", param_hint="--peers")
    if endpoint not in ("grpc", "openai"):
        raise typer.BadParameter(f"{endpoint!r}: choose grpc or openai", param_hint="--endpoint")
    if endpoint == "openai" and scenario != "levels":
        raise typer.BadParameter("--endpoint openai runs concurrency levels only", param_hint="--scenario")
    if endpoint == "openai" and suite is not None:
        raise typer.BadParameter("--suite targets measures the gRPC paths; drop --endpoint openai",
                                 param_hint="--endpoint")
    if scenario not in ("levels", "prefix"):
        raise typer.BadParameter(f"{scenario!r}: choose levels or prefix", param_hint="--scenario")
    if suite is not None:
        if scenario != "levels":
            raise typer.BadParameter("--suite targets runs every scenario itself", param_hint="--scenario")
        if suite != "targets":
            raise typer.BadParameter(f"{suite!r}: the only suite is 'targets'", param_hint="--suite")
        if url is not None:
            raise typer.BadParameter("--suite targets starts its own servers; it takes no --url", param_hint="--url")
        if checkpoint is not None:
            raise typer.BadParameter("--suite targets exports its own models; it takes no --checkpoint",
                                     param_hint="--checkpoint")
        if not baselines:
            raise typer.BadParameter("--suite targets needs the baselines (three targets are ratios to them)",
                                     param_hint="--no-baselines")
        if 1 not in levels or 8 not in levels:
            raise typer.BadParameter("--suite targets needs levels 1 and 8 (the 8-vs-1 target)",
                                     param_hint="--concurrency")
    elif url is None and not (repository / "gpt" / "config.pbtxt").is_file():
        raise typer.BadParameter(f"{repository} is not a model repository (no gpt/config.pbtxt); run "
                                 "export-model first, or give --url", param_hint="--repository")
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            progress = _RichProgress(bar)
            if endpoint == "openai":
                from serving.bench.openai_endpoint import run_openai_bench

                options = BenchOptions(url=url, repository=repository, concurrency=levels, prompt_tokens=prompt_tokens,
                                       output_tokens=output_tokens, baselines=False)
                report = run_openai_bench(options, out_dir=out, progress=progress)
            elif suite == "targets":
                report = run_targets(out, concurrency=levels, requests=requests, mode=mode, progress=progress,
                                     prompt_tokens=prompt_tokens, output_tokens=output_tokens, peers=peer_names)
            else:
                options = BenchOptions(url=url, repository=repository, mode=mode, concurrency=levels,
                                       prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                                       requests=requests, baselines=baselines, checkpoint=checkpoint,
                                       scenario=scenario, peers=peer_names)
                report = run_bench(options, progress=progress)
        paths = write_report(report, out)
    except ValueError as e:  # bad options found once the model is known (context length, slots)
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    except TritonServerError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    console.print(render_markdown(finite_or_none(report)), markup=False, highlight=False)
    typer.echo("Wrote " + ", ".join(str(p) for p in paths.values()))
    for key, entry in (report.get("peers") or {}).items():
        if "skipped" in entry:
            typer.echo(f"peer {key} skipped: {entry['skipped']}", err=True)
    ratios = report.get("ratios") or {}
    skipped = [k for k, r in ratios.items() if r["pass"] is None]
    if skipped:
        typer.echo(f"Not measured: {', '.join(skipped)} (the reasons are in bench.json's ratios)", err=True)
    failed = [k for k, r in ratios.items() if r["pass"] is False]
    if failed:
        typer.echo(f"Targets missed: {', '.join(failed)}", err=True)
