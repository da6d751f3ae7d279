#!/usr/bin/env bash
# The README's main job: set up the environment, then score and prune one real ~1k-token prompt on the
# embedded SmolLM2-135M-Instruct and print the removed fraction.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bash scripts/ensure-redis.sh
exec "${KVZAP_VENV:-.venv}/bin/kvzap-sglang" prune --model smollm2-135m "$@"
