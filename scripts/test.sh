#!/usr/bin/env bash
# The project's test command: lint, type-check and run the test suite against
# real peers (Redis, PostgreSQL, Orthanc, dcmtk, dicom3tools).
#
# Idempotent: creates .venv only when missing and reinstalls nothing that is
# already satisfied, so it runs the same on a developer machine where the
# services already run and in CI (where .ci/run installs and starts them first).
#
# Environment (each may be overridden before calling):
#   MEDGEMMA_TEST_REDIS_URL     Redis DB the tests may flush  (redis://127.0.0.1:6379/15)
#   MEDGEMMA_TEST_POSTGRES_URL  admin URL used to create throwaway databases
#                               (postgresql+psycopg://postgres@127.0.0.1:5432/postgres)
#   PYTHON                      interpreter used to create .venv (python3)
#   PYTEST_ARGS                 extra pytest arguments, e.g. "-k peers -x"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
ARTIFACTS="$ROOT/.ci/artifacts"

: "${MEDGEMMA_TEST_REDIS_URL:=redis://127.0.0.1:6379/15}"
: "${MEDGEMMA_TEST_POSTGRES_URL:=postgresql+psycopg://postgres@127.0.0.1:5432/postgres}"
export MEDGEMMA_TEST_REDIS_URL MEDGEMMA_TEST_POSTGRES_URL
export PYTHONDONTWRITEBYTECODE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

section() { printf '\n==== %s ====\n' "$*"; }
elapsed() { printf '(%ss)\n' "$(( SECONDS - $1 ))"; }

section "environment"
echo "repository:                 $ROOT"
echo "MEDGEMMA_TEST_REDIS_URL:    $MEDGEMMA_TEST_REDIS_URL"
echo "MEDGEMMA_TEST_POSTGRES_URL: $MEDGEMMA_TEST_POSTGRES_URL"

section "virtual environment"
t0=$SECONDS
if [[ ! -x "$PY" ]]; then
    echo "creating $VENV with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$VENV"
else
    echo "using existing $VENV"
fi
# torch first, pinned: pip takes this CPU build from local disk. Were a plain
# `torch` requirement resolved before it, pip would download a multi-GB CUDA build.
"$PY" -m pip install --quiet 'torch==2.13.0'
"$PY" -m pip install --quiet -e '.[worker,dev]'
"$PY" -c 'import torch, node; print("torch", torch.__version__, "| medgemma-node importable")'
elapsed "$t0"

# A quick look at the peers so a missing service reads as one clear line here,
# not as a wall of fixture errors below (the fixtures also fail loudly).
section "peers"
"$PY" - <<'PY' || echo "WARNING: some peers are not reachable; run 'bash .ci/run' (as root) to install and start them"
import os, shutil, sys

ok = True
try:
    import redis
    redis.Redis.from_url(os.environ["MEDGEMMA_TEST_REDIS_URL"], socket_connect_timeout=2).ping()
    print("redis:      ok")
except Exception as exc:
    ok = False
    print(f"redis:      DOWN ({exc})")
try:
    import psycopg
    from sqlalchemy.engine import make_url
    url = make_url(os.environ["MEDGEMMA_TEST_POSTGRES_URL"]).set(drivername="postgresql")
    psycopg.connect(url.render_as_string(hide_password=False), connect_timeout=3).close()
    print("postgresql: ok")
except Exception as exc:
    ok = False
    print(f"postgresql: DOWN ({exc})")
for tool in ("/usr/bin/storescu", "/usr/bin/dciodvfy", "/usr/sbin/Orthanc"):
    present = os.access(tool, os.X_OK)
    ok = ok and present
    print(f"{os.path.basename(tool) + ':':<11} {'ok' if present else 'MISSING'} ({tool})")
sys.exit(0 if ok else 1)
PY

failed=()

section "ruff"
t0=$SECONDS
if "$VENV/bin/ruff" check node workers sr_templates tests bench && "$VENV/bin/ruff" format --check node workers sr_templates tests bench; then :; else failed+=(ruff); fi
elapsed "$t0"

section "mypy"
t0=$SECONDS
if "$VENV/bin/mypy"; then :; else failed+=(mypy); fi
elapsed "$t0"

section "pytest"
t0=$SECONDS
mkdir -p "$ARTIFACTS"
set +e
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
"$PY" -m pytest -q -rfE --junitxml="$ARTIFACTS/junit.xml" ${PYTEST_ARGS:-}
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "ERROR: pytest collected no tests (exit 5); tests/ must hold the test suite"
    failed+=("pytest (no tests collected)")
elif [[ $rc -ne 0 ]]; then
    failed+=("pytest (exit $rc)")
fi
elapsed "$t0"

section "summary"
if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all checks passed: ruff, mypy, pytest"
