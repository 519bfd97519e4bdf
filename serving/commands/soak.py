"""`gptpipe soak`: the soak + fault suite against a `gptpipe serve` of a repository (serving/bench/soak.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def soak(
    repository: Path = typer.Option(Path("model_repository"), "--repository", help="Model repository to serve."),
    out: Path = typer.Option(Path("soak-out"), "--out", help="Folder for soak.json, soak.png and serve.log."),
    streams: int = typer.Option(16, "--streams", min=1, max=256, help="Concurrent streams."),
    duration: float = typer.Option(600.0, "--duration", min=5.0, max=86400.0, help="Seconds of load."),
    faults: bool = typer.Option(False, "--faults", help="Also kill the gpt stub and tritonserver once each."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, max=4096, help="Longest generation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the request mix."),
) -> None:
    """Run N mixed streams (client-side and server-side gRPC, HTTP SSE, OpenAI) for --duration seconds
    with 10% cancelled and 5% of the clients SIGKILLed; exit 1 unless every check passes."""
    from serving.bench.soak import Soak, SoakOptions

    report = Soak(SoakOptions(repository=repository, out=out, streams=streams, duration_s=duration,
                              faults=faults, max_new_tokens=max_new_tokens, seed=seed)).run()
    summary = {k: v for k, v in report.items() if k not in ("requests", "options")}
    typer.echo(json.dumps(summary, indent=2, default=str)[:20000])
    typer.echo(f"verdict: {report['verdict']}  (report: {out / 'soak.json'}, plot: {out / 'soak.png'})")
    if report["verdict"] != "pass":
        raise typer.Exit(1)
