"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager

import pytest

# Tests run on 2-core machines next to other processes: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REDIS_URL = "redis://127.0.0.1:6379/0"  # the real Redis; scripts/test.sh (scripts/ensure-redis.sh) makes it answer


@pytest.fixture(scope="session")
def smollm2_path():
    """Local bf16 safetensors folder of the embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from kvzap_sglang.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    """SmolLM2's tokenizer, from the local model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)


@contextmanager
def _isolated_key_prefix():
    """A fresh Redis key prefix; every key under it is deleted afterwards."""
    from calibrator.series import connect, delete_prefix

    client = connect(REDIS_URL)
    client.ping()  # fails loudly if Redis is not up: run scripts/ensure-redis.sh
    name = f"kvzap-test-{uuid.uuid4().hex[:10]}:"
    try:
        yield name
    finally:
        delete_prefix(client, name)
        client.close()


@pytest.fixture
def prefix():
    """A Redis key prefix of this test's own, cleaned up after it."""
    with _isolated_key_prefix() as name:
        yield name


@pytest.fixture(scope="module")
def module_prefix():
    """A Redis key prefix shared by one module's tests (e.g. with one server), cleaned up after the module."""
    with _isolated_key_prefix() as name:
        yield name


@pytest.fixture
def redis_client():
    from calibrator.series import connect

    client = connect(REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def closed_port_url():
    """A Redis URL nothing listens on: a real connection failure, no mock."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"
