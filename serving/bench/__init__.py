"""LLM latency benchmark (`gptpipe bench`): time to first token, inter-token latency, tokens/s, requests/s.

Served paths go through the real Triton server with `serving.client` (`client` mode: the
client-side loop over the stateful `gpt` model; `server` mode: the streaming `generate`
model). The in-process ONNX Runtime loop (`serving.engine.runtime` + `serving.engine.kv_cache`) and the
memory-bandwidth limit are here too; the PyTorch baselines live in `export.baselines`,
imported only when asked for, because `serving` never imports torch.

The modules, lowest first (each imports only those above it; this file imports none):

- `stats`: RequestTiming (one request's time stamps), LevelStats, percentiles, random prompts,
  greedy agreement — what `export.baselines` imports, and nothing of the bench above it;
- `progress`: the Progress protocol (the CLI draws it with rich) and `timed`;
- `probes`: the memory-bandwidth limit, RSS sampling of the server and its stubs, machine info;
- `metrics`: the server's batching, scraped from its Prometheus endpoint around a level;
- `report`: bench.json, bench.md and the PNG plots;
- `ort_loop`: the in-process ONNX Runtime baseline and the int8 greedy agreement;
- `served`: the served generator over `serving.client`, the served model's repository, a local
  tritonserver's lifecycle;
- `levels`: closed-loop concurrency levels, the 8-vs-1 pairs, ITL against context;
- `baselines`: the baselines of a run (bandwidth, ORT, and lazily the PyTorch ones);
- `run`: one run against one server (`BenchOptions`, `run_bench`);
- `procs`, `perf_analyzer`, `numbered_tokenizer`, `exports`: the suite's child processes,
  perf_analyzer, the tokenizer of random-weight exports, export-model runs;
- `peers`, `peer_bench`: the peer engines' workers (OpenVINO GenAI, llama.cpp, in their own venv) and
  their paired timing in a run (`--peers`), the peer rows of `ratios`;
- `targets`: the targets suite (`run_targets`, `TARGETS`, `judge`).
"""
