#!/usr/bin/env bash
# Run the targets suite of `gptpipe bench` end to end (exports, servers, baselines; ~10-15 min
# on 2 cores) and print the ratios against their targets.
#
#   scripts/bench_targets.sh [OUT_DIR]        default OUT_DIR: bench-out/targets
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/bench-out/targets}"
cd "$ROOT"
"$ROOT/.venv/bin/gptpipe" bench --suite targets --out "$OUT"
"$ROOT/.venv/bin/python" - "$OUT/bench.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for key, r in report["ratios"].items():
    value = "-" if r["value"] is None else f"{r['value']:.3f}"
    print(f"{key:28s} {value:>9s}  target {r['target']:8s} {'PASS' if r['pass'] else 'FAIL'}")
PY
