"""Where a figure was measured: date, machine, load, library versions and the commit of the code that ran.

Written into a benchmark's JSON and header so that a result file says by itself which code and host it describes;
the commit is that of the checkout ``kvzap_sglang`` was imported from (a ``PYTHONPATH`` naming an older checkout
times that checkout, and says so).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def _cpuinfo_values(key: str) -> list[str]:
    """The value of every ``key`` line of /proc/cpuinfo (one per logical CPU; empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    return [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith(key)]


def cpu_names() -> list[str]:
    """One ``model name`` per logical CPU from /proc/cpuinfo (empty where there is none)."""
    return _cpuinfo_values("model name")


# Vector extensions that decide bf16 speed on a CPU: two hosts both called "AMD EPYC (2 cores)" here ran a 512-token
# SmolLM2 bf16 prefill in 0.8 s and in 15 s, so a figure names the widest of these its host has.
VECTOR_EXTENSIONS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def vector_extensions() -> list[str]:
    """The ``VECTOR_EXTENSIONS`` in /proc/cpuinfo's flags (empty where there is none)."""
    flags = set(next(iter(_cpuinfo_values("flags")), "").split())
    return [name for name in VECTOR_EXTENSIONS if name in flags]


def cpu_description() -> str:
    names = cpu_names()
    widest = vector_extensions()[:1]
    cores = f"{len(names) or '?'} cores" + (f", {widest[0]}" if widest else "")
    return f"{names[0] if names else (platform.processor() or 'unknown CPU')} ({cores})"


def code_commit() -> str:
    """Short commit of the checkout kvzap_sglang runs from, '+ uncommitted changes' when its tracked files differ."""
    import kvzap_sglang

    root = Path(kvzap_sglang.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({root} is not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_description(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch": _version("torch"),
        "sglang": _version("sglang"),
        "code": code_commit(),
    }


def header(info: dict) -> str:
    return (f"measured {info['date']} on {info['machine']}, load {info['load_average_1m']}, torch {info['torch']}, "
            f"sglang {info['sglang']}, code {info['code']}")  # fmt: skip
