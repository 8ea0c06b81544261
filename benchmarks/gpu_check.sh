#!/usr/bin/env bash
# One-call GPU check (under 8 minutes on one NVIDIA GPU). Installs the package if needed and
# prints one JSON line. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import dkdm_cli" 2>/dev/null || pip install --quiet .
timeout 450 python3 benchmarks/gpu_check.py
