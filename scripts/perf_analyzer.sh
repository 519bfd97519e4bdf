#!/usr/bin/env bash
# Make Triton's perf_analyzer available, and run it.
#
#   scripts/perf_analyzer.sh install            install if needed; print the binary's path
#   scripts/perf_analyzer.sh run ARGS...        run perf_analyzer ARGS... with the right env
#
# e.g. scripts/perf_analyzer.sh run -m echo -u 127.0.0.1:8001 -i grpc --concurrency-range 1
#
# A perf_analyzer on PATH is used as it is. Otherwise it goes to .cache/perf_analyzer/
# (PERF_ANALYZER_CACHE overrides), never into the project's venv:
# - Debian 12: the PyPI `perf-analyzer` wheels need glibc 2.38, so take the binary out of
#   the tritonclient 2.49.0 manylinux1 wheel (extracted only, never installed: the project
#   has its own tritonclient), with libb64-0d from apt and libcudart.so.12 from the
#   nvidia-cuda-runtime-cu12 wheel.
# - Debian 13 or newer: `pip install perf-analyzer` into a venv of its own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PERF_ANALYZER_CACHE:-$ROOT/.cache/perf_analyzer}"
TRITONCLIENT_VERSION=2.49.0
CUDART_VERSION=12.9.79
if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi

say() { echo "perf_analyzer.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

debian_major() {
    # "12.11" -> 12; testing/sid ("trixie/sid") are newer than any release we know of.
    [[ -r /etc/debian_version ]] || { echo 0; return; }
    local v; v="$(cut -d. -f1 /etc/debian_version)"
    if [[ "$v" =~ ^[0-9]+$ ]]; then echo "$v"; else echo 99; fi
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root for: $*"; fi
}

# Print one file of a wheel (zip) to stdout.
wheel_member() {
    "$PYTHON" - "$1" "$2" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as member:
    shutil.copyfileobj(member, sys.stdout.buffer)
PY
}

download_wheel() {  # download_wheel SPEC PLATFORM -> path of the .whl
    local spec="$1" platform="$2" dir="$CACHE/wheels"
    mkdir -p "$dir"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform "$platform" --python-version 3 --implementation py -d "$dir" "$spec" >&2
    local name="${spec%%==*}" version="${spec##*==}"
    ls "$dir"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true
}

install_from_tritonclient_wheel() {
    local bin="$CACHE/bin/perf_analyzer" lib="$CACHE/lib"
    if ! dpkg -s libb64-0d >/dev/null 2>&1; then
        say "installing libb64-0d (apt)"
        as_root apt-get update -qq >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >&2
    fi
    if [[ ! -x "$bin" ]]; then
        say "downloading tritonclient $TRITONCLIENT_VERSION (for its perf_analyzer binary)"
        local wheel; wheel="$(download_wheel "tritonclient==$TRITONCLIENT_VERSION" manylinux1_x86_64)"
        [[ -n "$wheel" ]] || die "tritonclient $TRITONCLIENT_VERSION wheel not found after download"
        mkdir -p "$CACHE/bin"
        wheel_member "$wheel" "tritonclient-$TRITONCLIENT_VERSION.data/data/bin/perf_analyzer" > "$bin.tmp"
        chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin"
    fi
    if [[ ! -e "$lib/libcudart.so.12" ]]; then
        say "downloading nvidia-cuda-runtime-cu12 $CUDART_VERSION (for libcudart.so.12)"
        local wheel; wheel="$(download_wheel "nvidia-cuda-runtime-cu12==$CUDART_VERSION" manylinux_2_17_x86_64)"
        [[ -n "$wheel" ]] || die "nvidia-cuda-runtime-cu12 wheel not found after download"
        mkdir -p "$lib"
        wheel_member "$wheel" nvidia/cuda_runtime/lib/libcudart.so.12 > "$lib/libcudart.so.12.tmp"
        mv "$lib/libcudart.so.12.tmp" "$lib/libcudart.so.12"
    fi
}

install_from_pypi() {
    local venv="$CACHE/venv"
    if [[ ! -x "$venv/bin/perf_analyzer" ]]; then
        say "installing perf-analyzer from PyPI into $venv"
        "$PYTHON" -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet perf-analyzer >&2
    fi
    [[ -x "$venv/bin/perf_analyzer" ]] || die "perf-analyzer installed no $venv/bin/perf_analyzer"
}

# Print the perf_analyzer to run, installing it first if there is none.
perf_analyzer_path() {
    if command -v perf_analyzer >/dev/null; then command -v perf_analyzer; return; fi
    [[ "$(uname -m)" == x86_64 ]] || die "no perf_analyzer on PATH, and this script only installs it on x86-64"
    local major; major="$(debian_major)"
    if (( major >= 13 )); then
        install_from_pypi
        echo "$CACHE/venv/bin/perf_analyzer"
    elif (( major == 12 )); then
        install_from_tritonclient_wheel
        echo "$CACHE/bin/perf_analyzer"
    else
        die "no perf_analyzer on PATH, and this script installs it only on Debian 12 or newer"
    fi
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        install)
            perf_analyzer_path
            ;;
        run)
            shift
            local pa; pa="$(perf_analyzer_path)"
            # Only the libcudart we extracted (if any); harmless for a perf_analyzer on PATH.
            export LD_LIBRARY_PATH="$CACHE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            exec "$pa" "$@"
            ;;
        *)
            echo "usage: $0 install | run <perf_analyzer args...>" >&2
            exit 2
            ;;
    esac
}

main "$@"
