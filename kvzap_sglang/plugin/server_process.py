"""Waiting for a launched ``sglang.launch_server`` process, shared by the tests, benchmarks and scripts.

Imports nothing from SGLang: it only watches a child process and polls its ``/health`` endpoint.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import requests


def wait_until_healthy(proc: subprocess.Popen, url: str, log_path: str | Path, timeout_s: float) -> None:
    """Block until ``{url}/health`` answers 200.

    Raises ``RuntimeError`` with the log's tail if the process exits first, ``TimeoutError`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log_path).read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not healthy after {timeout_s} s (log {log_path})")
        time.sleep(1.0)
