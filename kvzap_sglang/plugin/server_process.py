"""Launching ``sglang.launch_server`` and waiting for it, shared by the tests, benchmarks and scripts.

Imports nothing from SGLang: it only watches a child process and polls its ``/health`` endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
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


def kvzap_state(url: str, timeout_s: float = 60.0) -> dict:
    """A running server's KVzap figures (``/server_info`` → ``internal_states[0]["kvzap"]``).

    Raises ``requests.RequestException`` when the server cannot be read, ``LookupError`` when it does not run KVzap.
    """
    response = requests.get(f"{url.rstrip('/')}/server_info", timeout=timeout_s)
    response.raise_for_status()
    states = response.json().get("internal_states") or [{}]
    if "kvzap" not in states[0]:
        raise LookupError(f"{url} does not run KVzap (no kvzap state in /server_info)")
    return states[0]["kvzap"]


def wait_until_idle(url: str, timeout_s: float = 120.0) -> dict:
    """The server's KVzap state once no request holds cells (every cell in use belongs to the prefix cache), or the
    last state read after ``timeout_s`` (the caller's assertions then say what is still held)."""
    deadline = time.monotonic() + timeout_s
    while (state := kvzap_state(url))["cells_in_use"] != state["cells_cached"] and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launched_server_with_log(model_path: str | Path, flags: list[str], timeout_s: float = 600.0,
                             keep_log: bool = False):  # fmt: skip
    """``python -m sglang.launch_server --model-path MODEL FLAGS --port P`` as a child process (log in a temp file,
    never a pipe: an unread pipe blocks the server); yields ``(base URL, log path)``; always terminated (SIGTERM,
    then kill). The log is deleted afterwards unless ``keep_log``."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), *flags, "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, log.name, timeout_s)
        yield url, Path(log.name)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if not keep_log:
            os.unlink(log.name)


@contextmanager
def launched_server(model_path: str | Path, flags: list[str], timeout_s: float = 600.0, keep_log: bool = False):
    """``launched_server_with_log`` yielding the base URL only."""
    with launched_server_with_log(model_path, flags, timeout_s, keep_log) as (url, _log_path):
        yield url
