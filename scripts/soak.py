#!/usr/bin/env python3
"""The soak + fault suite as a script: the same as `gptpipe soak` (serving/commands/soak.py)."""

import typer

from serving.commands.soak import soak

if __name__ == "__main__":
    typer.run(soak)
