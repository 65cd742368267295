#!/usr/bin/env bash
# The README's first command: set up a virtual environment, install the node, and run the
# end-to-end demo on embedded defaults (one process, SQLite, no Redis, the demo engine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ ! -x .venv/bin/python ]]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/medgemma-node demo "$@"
