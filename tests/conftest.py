"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest

# Tests run on 2-core machines next to other processes: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2_path():
    """Local bf16 safetensors folder of the embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from kvzap_sglang.models import resolve_model_path

    return resolve_model_path("smollm2-135m")
