#!/usr/bin/env bash
# Benchmark the OpenAI frontend with NVIDIA's aiperf (streaming chat), in a venv of its own:
# aiperf pins psutil~=7.0 and rich~=14, which clash with the project's pins, so it never goes
# into the project's venv. Not part of `make test`.
#
#   scripts/aiperf.sh [--url http://127.0.0.1:9000] [--model demo] [--tokenizer DIR]
#                     [--concurrency "1 8"] [--requests 32] [--input-tokens 32] [--output-tokens 64]
#
# Start the server first (`gptpipe serve --repository model_repository`). --tokenizer is a
# folder with tokenizer.json that aiperf's transformers can load: by default the repository's
# tokenizer/1/. Results: one artifact folder per concurrency under $OUT (default aiperf-results/).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${AIPERF_VENV:-$ROOT/.venv-aiperf}"
AIPERF_VERSION="${AIPERF_VERSION:-0.13.0}"
URL="http://127.0.0.1:9000"
MODEL="demo"
TOKENIZER="$ROOT/model_repository/tokenizer/1"
CONCURRENCY="1 8"
REQUESTS=32
INPUT_TOKENS=32
OUTPUT_TOKENS=64
OUT="${OUT:-$ROOT/aiperf-results}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --url) URL="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --tokenizer) TOKENIZER="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --input-tokens) INPUT_TOKENS="$2"; shift 2 ;;
    --output-tokens) OUTPUT_TOKENS="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ ! -x "$VENV/bin/aiperf" ]]; then
  echo "==> creating $VENV with aiperf==$AIPERF_VERSION (once)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "aiperf==$AIPERF_VERSION"
fi
if [[ ! -f "$TOKENIZER/tokenizer.json" ]]; then
  echo "no tokenizer.json in $TOKENIZER: pass --tokenizer DIR" >&2
  exit 2
fi
# aiperf loads the tokenizer with transformers: give it a folder it recognises
TOK_DIR="$(mktemp -d)"
trap 'rm -rf "$TOK_DIR"' EXIT
cp "$TOKENIZER/tokenizer.json" "$TOK_DIR/"
echo '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}' > "$TOK_DIR/tokenizer_config.json"

curl -fsS "$URL/health" > /dev/null || { echo "the frontend at $URL is not ready (GET /health)" >&2; exit 1; }
for c in $CONCURRENCY; do
  echo "==> aiperf profile: chat, streaming, concurrency $c"
  "$VENV/bin/aiperf" profile --model "$MODEL" --url "$URL" --endpoint-type chat --streaming \
    --concurrency "$c" --request-count "$REQUESTS" --tokenizer "$TOK_DIR" \
    --isl "$INPUT_TOKENS" --isl-stddev 0 --osl "$OUTPUT_TOKENS" --osl-stddev 0 \
    --extra-inputs ignore_eos:true --extra-inputs "max_tokens:$OUTPUT_TOKENS" --use-server-token-count \
    --artifact-dir "$OUT/concurrency-$c"
done
echo "results under $OUT"
