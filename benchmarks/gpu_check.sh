#!/usr/bin/env bash
# One-call GPU check (under 8 minutes on one NVIDIA GPU), or with --smoke the same script on the
# CPU at tiny sizes (CI runs it). Installs the package if needed; prints one JSON line.
#   bash benchmarks/gpu_check.sh [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import dkdm_cli" 2>/dev/null || pip install --quiet .
limit=450
[ "${1:-}" = "--smoke" ] && limit=300
exec timeout "$limit" python3 benchmarks/gpu_check.py "$@"
