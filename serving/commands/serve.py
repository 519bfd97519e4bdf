"""`gptpipe serve`: run Triton Inference Server on a model repository."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from serving.server import (
    DOCKER_IMAGE,
    TENSORRT_DOCKER_IMAGE,
    TritonServer,
    TritonServerError,
    check_repository,
    docker_command,
    docker_image_for,
)

RepositoryOption = Annotated[
    Path, typer.Option("--repository", help="Triton model repository (a folder of <model>/config.pbtxt).")
]
HostOption = Annotated[
    str, typer.Option("--host", help="Address to listen on; 0.0.0.0 exposes the server to the network.")
]
HttpPortOption = Annotated[int, typer.Option("--http-port", min=1, max=65535, help="HTTP/REST port.")]
GrpcPortOption = Annotated[int, typer.Option("--grpc-port", min=1, max=65535, help="gRPC port.")]
MetricsPortOption = Annotated[
    int, typer.Option("--metrics-port", min=1, max=65535, help="Prometheus metrics port.")
]
DockerOption = Annotated[
    bool,
    typer.Option("--docker", help=f"Run the {DOCKER_IMAGE} image (GPU, all backends) instead of the local binary; "
                 f"{TENSORRT_DOCKER_IMAGE} when gpt/1/ holds a TensorRT .plan."),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="With --docker: print the docker command, run nothing.")
]

# A large repository (GPT-2 sessions, TensorRT engines) takes a while to load.
READY_TIMEOUT_S = 600.0


def serve(
    repository: RepositoryOption = Path("model_repository"),
    host: HostOption = "127.0.0.1",
    http_port: HttpPortOption = 8000,
    grpc_port: GrpcPortOption = 8001,
    metrics_port: MetricsPortOption = 8002,
    docker: DockerOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Serve a model repository with Triton until Ctrl-C (or SIGTERM).

    Locally this runs the tritonserver binary of the nvidia-pytriton wheel (python
    backend); with --docker it runs the project's Triton image on all GPUs.

    Example: gptpipe serve --repository model_repository --http-port 8000

    Example: gptpipe serve --docker --dry-run
    """
    if dry_run and not docker:
        raise typer.BadParameter(
            "--dry-run only applies with --docker (it prints the docker command)", param_hint="--dry-run"
        )
    try:
        check_repository(repository)
    except ValueError as e:
        raise typer.BadParameter(str(e).removeprefix("repository: "), param_hint="--repository") from e

    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    if docker:
        image = docker_image_for(repository)
        _serve_docker(docker_command(repository, image=image, host=host, **ports), dry_run=dry_run)
    else:
        _serve_local(TritonServer(repository, host=host, **ports))


def _serve_docker(command: list[str], *, dry_run: bool) -> None:
    if dry_run:
        typer.echo(shlex.join(command))
        return
    if shutil.which("docker") is None:
        typer.echo("Error: docker is not on PATH; serve locally without --docker", err=True)
        raise typer.Exit(1)
    # `docker run` forwards Ctrl-C/SIGTERM to tritonserver in the container (sig-proxy).
    raise typer.Exit(subprocess.call(command))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve_local(server: TritonServer) -> None:
    # SIGTERM (systemd, docker stop, kill) takes the same clean path as Ctrl-C.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        server.start()
        seconds = server.wait_ready(READY_TIMEOUT_S)
        _print_endpoints(server, seconds)
        while server.is_running():
            time.sleep(0.5)
        typer.echo(f"Error: tritonserver exited on its own; last log lines:\n{server.log_tail()}", err=True)
        raise typer.Exit(1)
    except (TritonServerError, ValueError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    except KeyboardInterrupt:
        typer.echo("Stopping tritonserver ...")
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    typer.echo("Stopped.")


def _print_endpoints(server: TritonServer, seconds: float) -> None:
    typer.echo(f"Triton Inference Server ready in {seconds:.1f} s (log: {server.log_path})")
    typer.echo(f"  HTTP     http://{server.http_url}")
    typer.echo(f"  gRPC     {server.grpc_url}")
    typer.echo(f"  metrics  {server.metrics_url}")
    typer.echo("Models:")
    for model in server.model_index():
        typer.echo(f"  {model['name']}  version {model.get('version', '?')}  {model.get('state', '?')}")
    typer.echo("Press Ctrl-C to stop.")
