#!/usr/bin/env bash
# Installs the peer engines (llama.cpp through llama-cpp-python, OpenVINO GenAI) that the
# benchmark compares gptpipe with, into their own cached venv (not the project's: they pull
# their own numpy/torch stack). Once per machine and peer: a stamp per peer, keyed on this
# script and the constraints file, skips a peer when nothing changed. Not part of
# `make install` / `make test`.
#   GPTPIPE_PEERS        which peers, comma-separated: openvino, llama.cpp (default both), e.g.
#                        GPTPIPE_PEERS=openvino bash scripts/install_peers.sh  (a few minutes:
#                        pip downloads only, no llama.cpp compile)
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
KEY="$(cat "$0" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
T0=$SECONDS

say() { printf '[install_peers %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
stamp() { echo "$VENV/.gptpipe-peer-$1"; }  # serving/bench/peers.py reads these names

WANT_OPENVINO=0
WANT_LLAMA=0
IFS=',' read -r -a ASKED <<<"${GPTPIPE_PEERS:-openvino,llama.cpp}"
for peer in "${ASKED[@]}"; do
    case "$peer" in
        openvino) WANT_OPENVINO=1 ;;
        llama.cpp) WANT_LLAMA=1 ;;
        "") ;;
        *) echo "install_peers: GPTPIPE_PEERS: unknown peer '$peer'; choose from openvino, llama.cpp" >&2; exit 2 ;;
    esac
done
if ((WANT_OPENVINO == 0 && WANT_LLAMA == 0)); then
    echo "install_peers: GPTPIPE_PEERS names no peer; choose from openvino, llama.cpp" >&2
    exit 2
fi
for peer in openvino llama.cpp; do
    var=WANT_OPENVINO; [[ $peer == llama.cpp ]] && var=WANT_LLAMA
    if ((${!var})) && [[ -f "$(stamp $peer)" && "$(cat "$(stamp $peer)")" == "$KEY" ]]; then
        say "$peer already installed in $VENV"
        printf -v "$var" 0
    fi
done
if ((WANT_OPENVINO == 0 && WANT_LLAMA == 0)); then
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --quiet -c "$CONSTRAINTS")

if ((WANT_OPENVINO)); then
    say "openvino 1/3: OpenVINO GenAI + optimum-intel (torch 2.13.0 CPU from disk)"
    "${PIP[@]}" torch==2.13.0 "optimum-intel[openvino]" openvino-genai openvino-tokenizers
    # optimum-intel pulls torchvision, whose PyPI build does not import beside the torch CPU build
    say "openvino 2/3: removing torchvision"
    "$VENV/bin/pip" uninstall --quiet -y torchvision || true
    say "openvino 3/3: checking imports"
    "$VENV/bin/python" - <<'PY'
import openvino, openvino_genai, openvino_tokenizers  # noqa: F401
import optimum.intel  # noqa: F401
print("openvino", openvino.__version__, "openvino_genai", openvino_genai.__version__)
PY
    echo "$KEY" >"$(stamp openvino)"
fi

if ((WANT_LLAMA)); then
    say "llama.cpp 1/3: gguf, safetensors, tokenizers (the GGUF converter's needs)"
    "${PIP[@]}" gguf safetensors tokenizers
    LOG="$VENV/llama-cpp-build.log"
    say "llama.cpp 2/3: llama-cpp-python (compiles llama.cpp with -DGGML_NATIVE=ON; log: $LOG)"
    if ! CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "$VENV/bin/pip" install -v -c "$CONSTRAINTS" llama-cpp-python >"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        say "llama-cpp-python build failed (full log: $LOG)"
        exit 1
    fi
    say "llama.cpp 3/3: checking imports"
    "$VENV/bin/python" - <<'PY'
import gguf, llama_cpp  # noqa: F401
print("llama_cpp", llama_cpp.__version__, "gguf", gguf.__version__ if hasattr(gguf, "__version__") else "?")
PY
    echo "$KEY" >"$(stamp llama.cpp)"
fi
say "done: $VENV"
