"""Real Redis at 127.0.0.1:6379 (scripts/ensure-redis.sh), isolated by a per-test key prefix and cleaned up."""

from __future__ import annotations

import socket
import uuid

import pytest

from calibrator.series import connect

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_client():
    client = connect(REDIS_URL)
    client.ping()  # fails loudly if Redis is not up: run scripts/ensure-redis.sh
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client):
    name = f"kvzap-test-{uuid.uuid4().hex[:10]}:"
    yield name
    keys = list(redis_client.scan_iter(f"{name}*", count=1000))
    for i in range(0, len(keys), 1000):
        redis_client.delete(*keys[i : i + 1000])


@pytest.fixture
def closed_port_url():
    """A Redis URL nothing listens on: a real connection failure, no mock."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"
