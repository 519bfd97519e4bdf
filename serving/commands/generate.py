"""`gptpipe generate`: generate text from a running gptpipe Triton server."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from serving.generation import GptpipeError

UrlOption = Annotated[Optional[str], typer.Option(
    "--url", help="Server address host:port (default localhost:8001 for grpc, localhost:8000 for http), or "
    "several replicas: a:8001,b:8001 or dns:///name:8001 (each sequence on one; moved if it fails).")]
ProtocolOption = Annotated[str, typer.Option("--protocol", help="grpc or http.")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", help="New tokens at most (>= 1).")]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 = greedy.")]
TopKOption = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling, in (0, 1] (1 = off).")]
RepetitionPenaltyOption = Annotated[float, typer.Option("--repetition-penalty", help="> 0 (1 = off).")]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Sampler seed in [0, 2**63): same seed, same text.")]
StopOption = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable); cut from the text.")]
ModeOption = Annotated[str, typer.Option(
    "--mode", help="client: the loop runs here (steps of the gpt model); server: the generate model runs it.")]
StreamOption = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="Print text as it is generated (default: on, off with --json).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result (text, ids, finish reason, timings) as JSON.")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds one step may take before giving up.")]


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    url: UrlOption = None,
    protocol: ProtocolOption = "grpc",
    max_new_tokens: MaxNewTokensOption = 64,
    temperature: TemperatureOption = 1.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: SeedOption = None,
    stop: StopOption = None,
    mode: ModeOption = "client",
    stream: StreamOption = None,
    json_output: JsonOption = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Generate text from PROMPT with a running gptpipe server (see `gptpipe serve`).

    Example: gptpipe generate "Once upon a time" --max-new-tokens 32 --temperature 0

    Example: gptpipe generate "Hello" --mode server --seed 7 --json
    """
    from serving.client import Client  # after argument parsing: --help stays fast

    if stream and json_output:
        raise typer.BadParameter("--stream and --json do not go together: --json prints one JSON "
                                 "object at the end", param_hint="--stream")
    stream = not json_output if stream is None else stream
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed, mode=mode)
    try:
        with Client(url, protocol=protocol, timeout_s=timeout) as client:  # type: ignore[arg-type]
            if stream:
                with client.generate(prompt, stream=True, **kwargs) as deltas:
                    for delta in deltas:
                        sys.stdout.write(delta)
                        sys.stdout.flush()
                sys.stdout.write("\n")
                result = deltas.result
                if result is not None:
                    typer.echo(f"[{len(result.token_ids)} tokens, finish: {result.finish_reason}, "
                               f"TTFT {result.timings.ttft_s * 1e3:.1f} ms]", err=True)
            else:
                result = client.generate(prompt, return_logprobs=json_output, **kwargs)
                if json_output:
                    typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
                else:
                    typer.echo(result.text)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None
    except GptpipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
