#!/usr/bin/env bash
# The README's main job: set up the environment, make sure Redis answers, then run the end-to-end demo on the
# embedded SmolLM2-135M-Instruct (scripts/demo_e2e.py): calibration service + SGLang server with KVzap, a batch of
# mixed requests, POST /calibrate for a target removed fraction, the τ applied live, held-out requests, and a table
# of target vs achieved removed fraction and KV memory held. Options go to demo_e2e.py (e.g. --target 0.67).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bash scripts/ensure-redis.sh
exec "${KVZAP_VENV:-.venv}/bin/python" scripts/demo_e2e.py "$@"
