"""`gptpipe`: serve, generate, benchmark and check model repositories.

One module per command (serving/commands/); this file only assembles them.
"""

from __future__ import annotations

import logging

import typer

from export.tensorrt.command import build_engine_command  # onnx + (optional) tensorrt; no torch
from serving.commands.bench import bench
from serving.commands.generate import generate
from serving.commands.openai import openai
from serving.commands.repo import repo_app
from serving.commands.serve import serve
from serving.commands.soak import soak

app = typer.Typer(
    name="gptpipe",
    help="Serve GPT-2 models exported by export-model on Triton Inference Server, and use them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve)
app.command("generate")(generate)
app.command("bench")(bench)
app.command("soak")(soak)
app.command("openai")(openai)
app.command("build-engine")(build_engine_command)
app.add_typer(repo_app, name="repo")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    app()
