#!/usr/bin/env bash
# The README's test command: set up the environment, make sure Redis is up, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bash scripts/ensure-redis.sh
exec "${KVZAP_VENV:-.venv}/bin/python" -m pytest "$@"
