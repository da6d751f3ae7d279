"""Fuzz the live calibration service from its OpenAPI schema with schemathesis; expects 0 server errors.

Starts the real app under uvicorn on a free port (real Redis, a throw-away key prefix), seeds it with a few
samples so that /calibrate and /thresholds also reach their success paths, runs ``schemathesis run`` (all
phases, default checks; 413 and the semantic 422s configured as expected answers, as in tests/service/test_fuzz.py),
then counts 5xx responses from the service's own /metrics as an independent tally. Exit status 0 iff both
schemathesis passes and the service answered no 5xx.

    .venv/bin/python benchmarks/fuzz_service.py [--max-examples 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrator import summarize  # noqa: E402
from calibrator.series import connect, delete_prefix  # noqa: E402

REDIS_URL = os.environ.get("KVZAP_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY = "fuzz-admin-key"
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5XX"]

[checks.positive_data_acceptance]
expected-statuses = ["2XX", "3XX", "401", "403", "404", "409", "413", "422", "429", "5XX"]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prefix = f"kvzap-fuzz-{uuid.uuid4().hex[:8]}:"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "KVZAP_REDIS_URL": REDIS_URL, "KVZAP_REDIS_PREFIX": prefix, "KVZAP_ADMIN_API_KEYS": f'["{KEY}"]',
           "KVZAP_TENANT_API_KEYS": '{"fuzz-tenant-key": "acme"}', "KVZAP_KNOWN_MODELS": '["m"]',
           "KVZAP_MAX_BODY_BYTES": "1000000", "KVZAP_MAX_BATCH_SIZE": "100", "KVZAP_BOOTSTRAP_RESAMPLES": "100"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:app", "--port", str(port),
                               "--log-level", "warning"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    client = connect(REDIS_URL)
    try:
        _wait_healthy(url)
        rng = np.random.default_rng(0)
        seed = [summarize(rng.normal(-6, 2, size=(2, 2, 64)).astype(np.float32), 8, model="m", task="0")
                .model_dump(mode="json") for _ in range(30)]
        assert httpx.post(f"{url}/samples", json={"samples": seed}, headers={"X-API-Key": KEY}).status_code == 200
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
            config.write(CONFIG)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", config.name, "run",
                              f"{url}/openapi.json", "-H", f"X-API-Key: {KEY}", "--max-examples", str(args.max_examples),
                              "--seed", str(args.seed), "--no-color"], cwd=ROOT)
        elapsed = time.perf_counter() - started
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(15)
        delete_prefix(client, prefix)
    by_status: dict[str, float] = {}
    for status, count in re.findall(r'kvzap_http_requests_total\{[^}]*status="(\d+)"\} ([0-9.e+]+)', metrics):
        by_status[status] = by_status.get(status, 0) + float(count)
    server_errors = sum(v for s, v in by_status.items() if s.startswith("5"))
    print(f"\nschemathesis exit status {run.returncode} after {elapsed:.0f} s; the service answered "
          f"{sum(by_status.values()):.0f} requests: " + ", ".join(f"{s}: {v:.0f}" for s, v in sorted(by_status.items())))
    print(f"server errors (5xx): {server_errors:.0f}")
    return 0 if run.returncode == 0 and server_errors == 0 else 1


def _wait_healthy(url: str) -> None:
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("service did not become healthy")


if __name__ == "__main__":
    sys.exit(main())
