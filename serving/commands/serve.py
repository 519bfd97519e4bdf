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
    check_ports_free,
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
OpenAIPortOption = Annotated[
    int, typer.Option("--openai-port", min=1, max=65535, help="Port of the OpenAI-compatible API (/v1/...).")
]
NoOpenAIOption = Annotated[
    bool, typer.Option("--no-openai", help="Do not start the OpenAI-compatible API beside Triton.")
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
    openai_port: OpenAIPortOption = 9000,
    no_openai: NoOpenAIOption = False,
) -> None:
    """Serve a model repository with Triton until Ctrl-C (or SIGTERM).

    Locally this runs the tritonserver binary of the nvidia-pytriton wheel (python
    backend); with --docker it runs the project's Triton image on all GPUs.

    Example: gptpipe serve --repository model_repository --http-port 8000

    Example: gptpipe serve --docker --dry-run

    The OpenAI-compatible API (gptpipe openai) starts with it on --openai-port once Triton is
    ready, unless --no-openai; it stops with the server.
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
        openai = None if no_openai else (host, openai_port)
        if openai is not None:
            if openai_port in ports.values():
                raise typer.BadParameter(f"{openai_port} is also one of Triton's ports; give it its own",
                                         param_hint="--openai-port")
            try:
                check_ports_free(host, {"openai": openai_port})
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--openai-port") from e
        _serve_local(TritonServer(repository, host=host, **ports), openai=openai)


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


def _start_openai(server: TritonServer, host: str, port: int):
    from serving.openai.app import FrontendConfig
    from serving.openai.background import BackgroundFrontend, served_model_name

    config = FrontendConfig(url=server.grpc_url, served_model_name=served_model_name(server.repository),
                            repository=server.repository)
    return BackgroundFrontend(config, host=host, port=port).start()


def _serve_local(server: TritonServer, *, openai: tuple[str, int] | None = None) -> None:
    # SIGTERM (systemd, docker stop, kill) takes the same clean path as Ctrl-C.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    frontend = None
    try:
        server.start()
        seconds = server.wait_ready(READY_TIMEOUT_S)
        if openai is not None:
            frontend = _start_openai(server, *openai)
        _print_endpoints(server, seconds, frontend)
        while server.is_running():
            time.sleep(0.5)
        typer.echo(f"Error: tritonserver exited on its own; last log lines:\n{server.log_tail()}", err=True)
        raise typer.Exit(1)
    except (TritonServerError, ValueError, RuntimeError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    except KeyboardInterrupt:
        typer.echo("Stopping tritonserver ...")
    finally:
        if frontend is not None:
            frontend.stop()
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    typer.echo("Stopped.")


def _print_endpoints(server: TritonServer, seconds: float, frontend=None) -> None:
    typer.echo(f"Triton Inference Server ready in {seconds:.1f} s (log: {server.log_path})")
    typer.echo(f"  HTTP     http://{server.http_url}")
    typer.echo(f"  gRPC     {server.grpc_url}")
    typer.echo(f"  metrics  {server.metrics_url}")
    if frontend is not None:
        typer.echo(f"  OpenAI   {frontend.url}  (model {frontend.config.served_model_name!r})")
    typer.echo("Models:")
    for model in server.model_index():
        typer.echo(f"  {model['name']}  version {model.get('version', '?')}  {model.get('state', '?')}")
    typer.echo("Press Ctrl-C to stop.")
