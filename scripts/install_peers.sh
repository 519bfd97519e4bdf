#!/usr/bin/env bash
# Installs the peer engines (llama.cpp through llama-cpp-python, OpenVINO GenAI) that the
# benchmark compares gptpipe with, into their own cached venv (not the project's: they pull
# their own numpy/torch stack). Once per machine: a stamp keyed on this script and the
# constraints file skips it when nothing changed. Not part of `make install` / `make test`.
#   GPTPIPE_PEERS_VENV   where the venv goes (default ~/.cache/gptpipe/peers-venv)
#   PYTHON               the interpreter to build it from (default python3)
# llama-cpp-python compiles llama.cpp from source: ~11 minutes on 2 idle cores, 44 minutes on
# 2 loaded ones (2026-12-01). On a CPU with AMX the build includes llama.cpp's AMX backend, whose
# q8_0/q4_0 path segfaults here; scripts/peers/worker.py loads without it (see LlamaCpp there).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${GPTPIPE_PEERS_VENV:-$HOME/.cache/gptpipe/peers-venv}"
PY="${PYTHON:-python3}"
CONSTRAINTS="$HERE/peers-constraints.txt"
STAMP="$VENV/.gptpipe-peers-installed"
KEY="$(cat "$0" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
T0=$SECONDS

say() { printf '[install_peers %4ds] %s\n' "$((SECONDS - T0))" "$*"; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    say "peer venv already installed: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --quiet -c "$CONSTRAINTS")

say "1/4 OpenVINO GenAI + optimum-intel (torch 2.13.0 CPU from disk)"
"${PIP[@]}" torch==2.13.0 "optimum-intel[openvino]" openvino-genai openvino-tokenizers
# optimum-intel pulls torchvision, whose PyPI build does not import beside the torch CPU build
say "2/4 removing torchvision"
"$VENV/bin/pip" uninstall --quiet -y torchvision || true

say "3/4 gguf"
"${PIP[@]}" gguf

LOG="$VENV/llama-cpp-build.log"
say "4/4 llama-cpp-python (compiles llama.cpp with -DGGML_NATIVE=ON; log: $LOG)"
if ! CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV/bin/pip" install -v -c "$CONSTRAINTS" llama-cpp-python >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    say "llama-cpp-python build failed (full log: $LOG)"
    exit 1
fi

say "checking imports"
"$VENV/bin/python" - <<'PY'
import gguf, llama_cpp, openvino, openvino_genai, openvino_tokenizers  # noqa: F401
import optimum.intel  # noqa: F401
print("llama_cpp", llama_cpp.__version__, "openvino", openvino.__version__,
      "openvino_genai", openvino_genai.__version__)
PY
echo "$KEY" >"$STAMP"
say "done: $VENV"
