"""`gptpipe serve`: run Triton Inference Server on a model repository."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import threading
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
from serving.server.supervisor import EXIT_TIMEOUT_S, Supervisor, SupervisorError, SupervisorOptions

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

OpenAIPortOption = Annotated[
    int, typer.Option("--openai-port", min=1, max=65535, help="Port of the OpenAI-compatible API (/v1/...).")
]
NoOpenAIOption = Annotated[
    bool, typer.Option("--no-openai", help="Do not start the OpenAI-compatible API beside Triton.")
]
RestartOption = Annotated[
    str, typer.Option("--restart", help="on-failure: restart tritonserver when it or a model dies or stops "
                      "answering (probed every few seconds); never: exit instead.")
]
DrainTimeoutOption = Annotated[
    float, typer.Option("--drain-timeout", min=0, help="On Ctrl-C/SIGTERM, seconds running generations get to "
                        "finish before they are ended with 'server shutting down'.")
]
AdminKeyOption = Annotated[
    str | None, typer.Option("--admin-key", envvar="GPTPIPE_ADMIN_KEY", show_envvar=True,
                             help="Key for Triton's admin APIs (repository, config, shared memory, statistics, "
                             "trace, logging): header admin-key. Default: a new random key, written to "
                             "a 0600 file whose path is printed.")
]
ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="GPTPIPE_API_KEY", show_envvar=True,
                             help="Require this key (header api-key) for inference too. Default: none.")
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
    restart: RestartOption = "on-failure",
    drain_timeout: DrainTimeoutOption = 30.0,
    admin_key: AdminKeyOption = None,
    api_key: ApiKeyOption = None,
    openai_port: OpenAIPortOption = 9000,
    no_openai: NoOpenAIOption = False,
) -> None:
    """Serve a model repository with Triton until Ctrl-C (or SIGTERM).

    Locally this runs the tritonserver binary of the nvidia-pytriton wheel (python
    backend); with --docker it runs the project's Triton image on all GPUs.

    Example: gptpipe serve --repository model_repository --http-port 8000

    Example: gptpipe serve --docker --dry-run

    Example: gptpipe serve --restart never --drain-timeout 5

    The OpenAI-compatible API (gptpipe openai) starts with it on --openai-port once Triton is
    ready, unless --no-openai; it stops with the server, after the drain.
    """
    if restart not in ("on-failure", "never"):
        raise typer.BadParameter(f"{restart!r} is not 'on-failure' or 'never'", param_hint="--restart")
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
        if openai is not None and api_key is not None:
            # Triton then wants the key on every inference; the frontend's client does not send it yet
            raise typer.BadParameter("--api-key restricts Triton's inference APIs, and the OpenAI frontend "
                                     "cannot pass that key on yet: add --no-openai (or run `gptpipe openai` "
                                     "with its own --api-key against a Triton without one)", param_hint="--api-key")
        if openai is not None:
            if openai_port in ports.values():
                raise typer.BadParameter(f"{openai_port} is also one of Triton's ports; give it its own",
                                         param_hint="--openai-port")
            try:
                check_ports_free(host, {"openai": openai_port})
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--openai-port") from e
        key_file = None
        if admin_key is None:
            admin_key, key_file = _new_admin_key()
        try:
            server = TritonServer(repository, host=host, admin_key=admin_key, api_key=api_key,
                                  extra_args=(f"--exit-timeout-secs={EXIT_TIMEOUT_S}",), **ports)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--admin-key/--api-key") from e
        options = SupervisorOptions(restart=restart, drain_timeout_s=drain_timeout, ready_timeout_s=READY_TIMEOUT_S)
        try:
            supervisor = Supervisor(server, options, on_state=lambda state, why: typer.echo(f"[{state.value}] {why}"))
            _serve_local(supervisor, key_file, openai=openai)
        finally:
            if key_file is not None:
                key_file.unlink(missing_ok=True)


def _serve_docker(command: list[str], *, dry_run: bool) -> None:
    if dry_run:
        typer.echo(shlex.join(command))
        return
    if shutil.which("docker") is None:
        typer.echo("Error: docker is not on PATH; serve locally without --docker", err=True)
        raise typer.Exit(1)
    # `docker run` forwards Ctrl-C/SIGTERM to tritonserver in the container (sig-proxy).
    raise typer.Exit(subprocess.call(command))


def _new_admin_key() -> tuple[str, Path]:
    """A random admin key, in a file only this user can read (the key itself is not printed)."""
    key = secrets.token_urlsafe(24)
    fd = os.open(Path.home() / f".gptpipe-admin-key-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, Path.home() / f".gptpipe-admin-key-{os.getpid()}"


def _start_openai(server: TritonServer, host: str, port: int):
    from serving.openai.app import FrontendConfig
    from serving.openai.background import BackgroundFrontend, served_model_name

    config = FrontendConfig(url=server.grpc_url, served_model_name=served_model_name(server.repository),
                            repository=server.repository)
    return BackgroundFrontend(config, host=host, port=port).start()


def _serve_local(supervisor: Supervisor, key_file: Path | None, *, openai: tuple[str, int] | None = None) -> None:
    # SIGTERM (systemd, docker stop, kill) takes the same drain as Ctrl-C.
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    server = supervisor.server
    frontend = None
    try:
        seconds = supervisor.start()
        if openai is not None:
            frontend = _start_openai(server, *openai)
        _print_endpoints(server, seconds, key_file, frontend)
        supervisor.run(stop)
        typer.echo(f"Draining (up to {supervisor.options.drain_timeout_s:g} s) and stopping tritonserver ...")
        if not supervisor.drain():
            typer.echo(f"Note: tritonserver did not exit by itself (code {server.exit_code}; an idle client's gRPC "
                       "stream keeps it from unloading `gpt`): stopped after its exit timeout, nothing left behind.")
    except SupervisorError as e:
        typer.echo(f"Error: {e}; last log lines:\n{server.log_tail()}", err=True)
        raise typer.Exit(1) from e
    except (TritonServerError, ValueError) as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from e
    finally:
        if frontend is not None:
            frontend.stop()
        server.stop()
        supervisor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo("Stopped.")


def _print_endpoints(server: TritonServer, seconds: float, key_file: Path | None, frontend=None) -> None:
    typer.echo(f"Triton Inference Server ready in {seconds:.1f} s (log: {server.log_path})")
    if key_file is not None:
        typer.echo(f"  admin key (header admin-key, or GPTPIPE_ADMIN_KEY for gptpipe clients): {key_file}")
    typer.echo(f"  HTTP     http://{server.http_url}")
    typer.echo(f"  gRPC     {server.grpc_url}")
    typer.echo(f"  metrics  {server.metrics_url}")
    if frontend is not None:
        typer.echo(f"  OpenAI   {frontend.url}  (model {frontend.config.served_model_name!r})")
    typer.echo("Models:")
    for model in server.model_index():
        typer.echo(f"  {model['name']}  version {model.get('version', '?')}  {model.get('state', '?')}")
    typer.echo("Press Ctrl-C to stop.")
