"""The main job, end to end: export the demo model, start the real local Triton server,
generate text through it (client-side loop, streamed; then the server-side `generate` model;
then one chat completion from the `openai` package through the OpenAI-compatible frontend),
and stop the server. `make demo` runs this.

    .venv/bin/python scripts/demo.py [--precision fp32|fp16|int8] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from serving import Client
from serving.server import TritonServer, free_ports, has_nvidia_gpu

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default=None, help="default: fp16 with a GPU, else fp32")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--prompt", default="The return statement")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    precision = args.precision or ("fp16" if has_nvidia_gpu() else "fp32")

    print(f"==> 1/3 export-model --model demo --precision {precision} --output {args.repository}", flush=True)
    export = [str(Path(sys.executable).parent / "export-model"), "--model", "demo", "--precision", precision,
              "--output", str(args.repository), "--force"]
    if subprocess.run(export).returncode != 0:
        print("export-model failed", file=sys.stderr)
        return 1

    http, grpc, metrics = free_ports(3)
    print(f"==> 2/3 starting tritonserver on 127.0.0.1 (gRPC {grpc}, HTTP {http})", flush=True)
    t0 = time.perf_counter()
    with TritonServer(args.repository, http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
        print(f"    ready in {time.perf_counter() - t0:.1f} s: "
              f"{', '.join(m['name'] for m in server.model_index())}", flush=True)
        print("==> 3/3 client.generate() through Triton", flush=True)
        with Client(server.grpc_url) as client:
            print(f"\n[client-side loop, streamed, greedy]\n{args.prompt}", end="", flush=True)
            stream = client.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=0, stream=True)
            for delta in stream:
                print(delta, end="", flush=True)
            result = client.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=0, mode="server")
            print(f"\n\n[server-side `generate` model, greedy]\n{args.prompt}{result.text}")
            t = result.timings
            itl = sorted(t.itl_s)[len(t.itl_s) // 2] if t.itl_s else float("nan")
            print(f"\n{len(result.token_ids)} tokens, finish_reason={result.finish_reason}, "
                  f"time to first token {t.ttft_s * 1e3:.1f} ms, median inter-token {itl * 1e3:.2f} ms")
        openai_chat(server, args.repository, args.max_new_tokens)
    print("server stopped.")
    return 0


def openai_chat(server: TritonServer, repository: Path, max_tokens: int) -> None:
    """One chat completion with the official `openai` package, through the frontend."""
    import openai

    from serving.openai.app import FrontendConfig
    from serving.openai.background import BackgroundFrontend, served_model_name

    (port,) = free_ports(1)
    config = FrontendConfig(url=server.grpc_url, served_model_name=served_model_name(repository), repository=repository)
    with BackgroundFrontend(config, port=port) as frontend:
        messages = [{"role": "user", "content": "Write a for loop."}]
        print(f"\n[OpenAI frontend {frontend.url}, chat.completions.create, greedy]\n{messages[0]['content']}")
        with openai.OpenAI(base_url=frontend.url, api_key="none") as client:
            out = client.chat.completions.create(model=config.served_model_name, messages=messages,
                                                 max_tokens=max_tokens, temperature=0)
        print(f"assistant: {out.choices[0].message.content}")
        print(f"finish_reason={out.choices[0].finish_reason}, usage: {out.usage.prompt_tokens} prompt + "
              f"{out.usage.completion_tokens} completion tokens")


if __name__ == "__main__":
    sys.exit(main())
