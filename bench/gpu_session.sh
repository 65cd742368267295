#!/usr/bin/env bash
# The real-shape pre-read figures (issue 13 item 5) in ONE call of a lent GPU machine
# (H100/H200, the `device` tool), in about 5 minutes and at most about 8:
#
#   1. installs the wheels carried in .whl/ (if any) into /tmp/site, nothing else: the
#      machine reaches no package registry (bench/README.md, "GPU session", says which
#      wheels to carry and how to fetch them);
#   2. checks, and prints, what bench/gpu_preread.py needs: python3 with a CUDA torch that
#      sees the GPU, transformers >= 5.24 (the worker extra), the node's own imports
#      (pydantic, pydantic-settings, pydicom, ...), and whether vllm imports; anything
#      missing is named and the script stops with exit 3 before spending GPU time;
#   3. runs bench/gpu_preread.py at the MedGemma 4B shape (random weights, bf16) at batch
#      1, 8 and 32, transformers and, where vllm imports, vLLM; then --followup-cache;
#   4. writes everything under $OUT (what the device tool brings back; at most 8 files):
#      environment.txt, nvidia-smi.txt, gpu_preread.json/.log, gpu_followup.json/.log.
#
# Run from the repository root (the device tool runs commands there):
#   bash bench/gpu_session.sh            # OUT defaults to bench/out/gpu_session here
# Environment: OUT (output folder), PYTHON (default python3), PREREAD_TIMEOUT (s, 330),
# FOLLOWUP_TIMEOUT (s, 150).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/out/gpu_session}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

section() { printf '\n==== %s (%s) ====\n' "$*" "$(date -u +%H:%M:%S)"; }

section "carried wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
    ls .whl
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "installing the carried wheels failed; going on with what the machine has"
    fi
else
    echo "none (.whl/ is empty or missing)"
fi

section "what the benchmark needs"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia-smi.txt"
head -n 15 "$OUT/nvidia-smi.txt"
"$PY" - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import importlib
import importlib.metadata as md
import platform
import sys

missing = []
print("python", platform.python_version(), sys.executable)
try:
    import torch

    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuda available", cuda)
    if cuda:
        print("device", torch.cuda.get_device_name(), "|", torch.cuda.mem_get_info()[1] / 2**30, "GiB")
    else:
        missing.append("a CUDA torch that sees the GPU (torch.cuda.is_available() is False)")
except ImportError as exc:
    missing.append(f"torch ({exc})")

# the worker extra (pyproject.toml) and what bench/gpu_preread.py imports through the node
for module, dist in [
    ("transformers", "transformers"), ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"), ("huggingface_hub", "huggingface-hub"),
    ("numpy", "numpy"), ("PIL", "pillow"), ("pydantic", "pydantic"),
    ("pydantic_settings", "pydantic-settings"), ("dotenv", "python-dotenv"),
    ("pydicom", "pydicom"), ("regex", "regex"),
]:
    try:
        importlib.import_module(module)
        print(f"{dist:18} {md.version(dist)}")
    except Exception as exc:  # ImportError, or a version check failing at import
        missing.append(f"{dist} ({type(exc).__name__}: {exc})"[:300])
try:
    version = tuple(int(part) for part in md.version("transformers").split(".")[:2])
    if version < (5, 24):
        missing.append(f"transformers >= 5.24 (the worker extra); found {md.version('transformers')}")
except md.PackageNotFoundError:
    pass
try:
    importlib.import_module("workers.engines.medgemma")
    importlib.import_module("bench.tiny_gemma")
    print("workers.engines.medgemma and bench.tiny_gemma import")
except Exception as exc:
    missing.append(f"the engine's imports ({type(exc).__name__}: {exc})"[:300])
try:
    import vllm

    print("vllm", vllm.__version__, "(measured beside transformers)")
except Exception as exc:
    print(f"vllm: not importable ({type(exc).__name__}); vLLM will NOT be measured")

if missing:
    print("\nMISSING:")
    for item in missing:
        print("  -", item)
    print("Carry wheels for these in .whl/ (bench/README.md, 'GPU session') and run again.")
    sys.exit(3)
print("\nready")
PY
check=${PIPESTATUS[0]}
if [[ $check -ne 0 ]]; then
    echo "stopping before the benchmark: the check above failed (exit $check)"
    exit 3
fi

section "pre-read, MedGemma 4B shape, batch 1 8 32"
timeout "${PREREAD_TIMEOUT:-330}" "$PY" bench/gpu_preread.py --batch 1 8 32 \
    --out "$OUT/gpu_preread.json" 2>&1 | tee "$OUT/gpu_preread.log"
preread=${PIPESTATUS[0]}

section "follow-up prefix cache, MedGemma 4B shape"
timeout "${FOLLOWUP_TIMEOUT:-150}" "$PY" bench/gpu_preread.py --followup-cache \
    --out "$OUT/gpu_followup.json" 2>&1 | tee "$OUT/gpu_followup.log"
followup=${PIPESTATUS[0]}

section "done"
echo "gpu_preread exit $preread, followup exit $followup (124: stopped by its timeout)"
ls -la "$OUT"
[[ $preread -eq 0 && $followup -eq 0 ]]
