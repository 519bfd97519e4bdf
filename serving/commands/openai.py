"""`gptpipe openai`: the OpenAI-compatible frontend, alone, against a Triton that runs elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_PORT = 9000


def openai(
    url: Annotated[str, typer.Option("--url", help="Triton's gRPC address, HOST:PORT, or several replicas: "
                                     "a:8001,b:8001 or dns:///name:8001 (each sequence on one; moved if it "
                                     "fails).")] = "localhost:8001",
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 exposes it to the network.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="HTTP port.")] = DEFAULT_PORT,
    served_model_name: Annotated[str, typer.Option("--served-model-name", help="The model id clients ask for.")]
    = "gptpipe",
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="GPTPIPE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ (default: none).")]
    = None,
    chat_template: Annotated[Optional[Path], typer.Option(
        "--chat-template", exists=True, dir_okay=False, help="A Jinja chat template file (default: the "
        "repository's tokenizer/1/chat_template.jinja with --repository, else a plain 'Role: text' transcript).")]
    = None,
    repository: Annotated[Optional[Path], typer.Option(
        "--repository", exists=True, file_okay=False, help="The model repository, if it is on this machine "
        "(for its chat template).")] = None,
    loop: Annotated[str, typer.Option("--loop", help="Which generation loop to drive: client (steps `gpt` from "
                                      "here) or server (the `generate` model).")] = "client",
    queue_timeout: Annotated[float, typer.Option(
        "--queue-timeout", min=0, help="Seconds a request waits for a free KV slot before a 503.")] = 30.0,
) -> None:
    """Serve /v1/completions, /v1/chat/completions and /v1/models for a gptpipe Triton server.

    Example: gptpipe openai --url localhost:8001 --port 9000 --served-model-name demo
    """
    from serving.openai.app import FrontendConfig, serve

    if loop not in ("client", "server"):
        raise typer.BadParameter(f"must be 'client' or 'server', got {loop!r}", param_hint="--loop")
    config = FrontendConfig(url=url, served_model_name=served_model_name, api_key=api_key,
                            chat_template=chat_template, repository=repository, loop=loop,  # type: ignore[arg-type]
                            queue_timeout=queue_timeout)
    typer.echo(f"OpenAI-compatible API on http://{host}:{port}/v1 (model {served_model_name!r}) for Triton at {url}")
    serve(config, host=host, port=port)
