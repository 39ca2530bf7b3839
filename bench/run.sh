#!/usr/bin/env bash
# Runs the weights benchmark in its own virtual environment, so the peer packages
# (ray-zerocopy, zerocopy) never enter the project's environment.
# Usage: bash bench/run.sh [bench_weights.py options]   (needs the project installed: see README)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$here/.venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$here/.venv"
  "$here/.venv/bin/pip" install -q ray-zerocopy==0.2.0 zerocopy==0.1.0 matplotlib
fi
exec "$here/.venv/bin/python" "$here/bench_weights.py" "$@"
