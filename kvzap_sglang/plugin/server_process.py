"""Launching ``sglang.launch_server``, waiting for it and reading its answers, shared by the tests, benchmarks and
scripts.

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


# The figures callers read from a KVzap state (plugin/runtime.py and plugin/tenants.py ``snapshot``), with their JSON
# types; ``None`` in a type tuple means null is sent. Optional fields may be absent, never of another type.
_NUMBER = (int, float)
STATE_FIELDS = {"threshold": _NUMBER, "window": (int,), "surrogate": (str,), "cells_total": (int,),
                "cells_in_use": (int,), "removed_fraction": _NUMBER, "requests_finished": (int,)}  # fmt: skip
OPTIONAL_STATE_FIELDS = {"cells_cached": (int,), "tenants_hidden": (str,)}
TENANT_FIELDS = {"threshold": _NUMBER, "window": (int,), "cells_held": (int,), "budget_cells": (int, None),
                 "queued_requests": (int,), "removed_fraction": _NUMBER}  # fmt: skip
OPTIONAL_TENANT_FIELDS = {"threshold_base": _NUMBER, "refused_requests": (int,)}


class NotKVzapReplyError(LookupError):
    """``/server_info`` answered, but not with what a KVzap server sends (another server, or a broken proxy)."""


def kvzap_state(url: str, timeout_s: float = 60.0, api_key: str | None = None) -> dict:
    """A running server's KVzap figures (``/server_info`` → ``internal_states[0]["kvzap"]``). With
    ``--kvzap-tenants``, the per-tenant figures (``"tenants"``) are sent only when ``api_key`` is the admin key;
    otherwise ``"tenants_hidden"`` says so.

    Raises ``requests.RequestException`` when the server cannot be read, ``LookupError`` when it does not run KVzap
    (:class:`NotKVzapReplyError` when its reply does not have the shape and types a KVzap server sends).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{url.rstrip('/')}/server_info", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    body = response.json()
    if not isinstance(body, dict):
        raise NotKVzapReplyError(_not_kvzap(url, f"a JSON {type(body).__name__} instead of an object"))
    states = body.get("internal_states") or [{}]
    if not isinstance(states, list) or not isinstance(states[0], dict):
        raise NotKVzapReplyError(_not_kvzap(url, f"internal_states is {states!r:.80}, not a list of objects"))
    if "kvzap" not in states[0]:
        raise LookupError(f"{url} does not run KVzap (no kvzap state in /server_info)")
    state = states[0]["kvzap"]
    _check_record(url, "kvzap state", state, STATE_FIELDS, OPTIONAL_STATE_FIELDS)
    tenants = state.get("tenants")
    if tenants is not None and not isinstance(tenants, dict):
        raise NotKVzapReplyError(_not_kvzap(url, "kvzap tenants is not an object"))
    for name, tenant in (tenants or {}).items():
        _check_record(url, f"kvzap tenant {name!r}", tenant, TENANT_FIELDS, OPTIONAL_TENANT_FIELDS)
    return state


def _not_kvzap(url: str, problem: str) -> str:
    return f"{url}/server_info replied with something a KVzap server does not send: {problem}"


def _check_record(url: str, what: str, record, required: dict, optional: dict) -> None:
    if not isinstance(record, dict):
        raise NotKVzapReplyError(_not_kvzap(url, f"{what} is {type(record).__name__}, not an object"))
    for name, types in {**required, **optional}.items():
        if name not in record:
            if name in required:
                raise NotKVzapReplyError(_not_kvzap(url, f"{what} has no {name!r}"))
            continue
        if not _has_type(record[name], types):
            raise NotKVzapReplyError(_not_kvzap(url, f"{what} {name!r} is {record[name]!r:.40}"))


def _has_type(value, types: tuple) -> bool:
    if value is None:
        return None in types
    # JSON true/false are Python bools, which isinstance counts as ints.
    return not isinstance(value, bool) and isinstance(value, tuple(t for t in types if t is not None))


def wait_until_idle(url: str, timeout_s: float = 120.0) -> dict:
    """The server's KVzap state once no request holds cells (every cell in use belongs to the prefix cache), or the
    last state read after ``timeout_s`` (the caller's assertions then say what is still held)."""
    deadline = time.monotonic() + timeout_s
    while (state := kvzap_state(url))["cells_in_use"] != state["cells_cached"] and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def stream_chunks(url: str, path: str, body: dict, timeout_s: float = 300.0) -> list[dict]:
    """POST ``body`` with ``"stream": true`` to ``{url}{path}``; the JSON chunks of its server-sent events up to
    ``[DONE]``. Raises ``requests.HTTPError`` for a status other than 200."""
    import json

    chunks = []
    with requests.post(f"{url}{path}", json={**body, "stream": True}, stream=True, timeout=timeout_s) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launched_server_with_log(model_path: str | Path, flags: list[str], timeout_s: float = 600.0,
                             keep_log: bool = False, env: dict[str, str] | None = None):  # fmt: skip
    """``python -m sglang.launch_server --model-path MODEL FLAGS --port P`` as a child process (log in a temp file,
    never a pipe: an unread pipe blocks the server); yields ``(base URL, log path)``; always terminated (SIGTERM,
    then kill). The log is deleted afterwards unless ``keep_log``. ``env`` adds variables to the child's
    environment only."""
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), *flags, "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", prefix="sglang-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "SGLANG_USE_CPU_ENGINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
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
def launched_server(model_path: str | Path, flags: list[str], timeout_s: float = 600.0, keep_log: bool = False,
                    env: dict[str, str] | None = None):  # fmt: skip
    """``launched_server_with_log`` yielding the base URL only."""
    with launched_server_with_log(model_path, flags, timeout_s, keep_log, env) as (url, _log_path):
        yield url
