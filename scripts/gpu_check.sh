#!/usr/bin/env bash
# The prepared GPU check (issue 16): `bash scripts/gpu_check.sh` or `make gpu-check`, from the repository root.
#
# One command, at most 8 minutes on one H200, no download: ViT-B/16 224 with random weights on synthetic uint8 data
# resident on the GPU, bf16, batch 64, through peftbench's training path. It prints a table and writes
# $GPU_CHECK_OUT/gpu_check.json and gpu_check.md (default outputs/gpu_check/):
#   - training img/s and peak memory (x LoRA) of full, linear, LoRA, SPT-LoRA, CDRA-SPT, adapter, VPT-deep,
#     Heart-LoRA, HiFi and TINA; evaluation img/s;
#   - LoRA with compile=true (compilation time and img/s);
#   - 2 and 4 LoRA runs at once on the GPU (combined img/s, against one run);
#   - the projected wall time of SPT Table 1's LoRA row from the measured rates.
# Details: scripts/gpu_check.py. Settings (environment):
#   GPU_CHECK_OUT=<dir>        where the JSON and Markdown go (default outputs/gpu_check)
#   GPU_CHECK_SMOKE=1          vit_micro on the CPU, tiny sizes, about a minute (also what runs without CUDA)
#   GPU_CHECK_BUDGET_S=420     the measuring budget; parts that would not fit are skipped and named
#   GPU_CHECK_TIMEOUT_S=470    hard limit of the whole command (JSON and Markdown are rewritten after every part)
#   PYTHON=python3             the interpreter
#   GPU_CHECK_WHEELS=.whl      the folder of wheels to install when hydra is missing
#
# What it needs: torch, timm, lightning, torchmetrics, safetensors, numpy, pyyaml (all on the GPU machine's image)
# plus hydra-core, omegaconf and antlr4-python3-runtime (not there). Bring those as wheels in .whl/ at the
# repository root; this script installs them into /tmp/peftbench-site (no index, no network) when hydra is missing.
# On a machine with internet, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3    # published as a source archive only
# (wandb is not needed: the check logs nothing.) Then run, with .whl carried along:
#   bash scripts/gpu_check.sh            # or: make gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    site=/tmp/peftbench-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: hydra-core / omegaconf are missing and $WHEELS/ holds no wheels: see the header of $0" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
exec timeout "${GPU_CHECK_TIMEOUT_S:-470}" "$PYTHON" scripts/gpu_check.py
