"""`gptpipe repo`: inspect and check a model repository written by export-model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from serving.repository import RepositoryError, validate_repository, verify_manifest

repo_app = typer.Typer(help="Inspect and check a Triton model repository.", no_args_is_help=True)

RepositoryArg = Annotated[Path, typer.Argument(help="The model repository folder.")]


@repo_app.command("check")
def check(repository: RepositoryArg = Path("model_repository")) -> None:
    """Check that every config.pbtxt parses with Triton's ModelConfig and every artifact
    matches the manifest's sha256.

    Example: gptpipe repo check model_repository
    """
    try:
        configs = validate_repository(repository)
        problems = verify_manifest(repository)
    except (RepositoryError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for name, config in configs.items():
        typer.echo(f"{name}: {config.backend} backend, {len(config.input)} inputs, "
                   f"{len(config.output)} outputs")
    if problems:
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{repository}: all artifacts match the manifest")


@repo_app.command("show")
def show(repository: RepositoryArg = Path("model_repository")) -> None:
    """Print the export's manifest: model, precision, validation, tensor table.

    Example: gptpipe repo show model_repository
    """
    path = Path(repository) / "manifest.json"
    if not path.is_file():
        typer.echo(f"error: {path} not found (run export-model first)", err=True)
        raise typer.Exit(2)
    manifest = json.loads(path.read_text())
    manifest.pop("artifacts", None)
    typer.echo(json.dumps(manifest, indent=2))
