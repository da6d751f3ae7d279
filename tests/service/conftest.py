"""The service against the real Redis at 127.0.0.1:6379, isolated by a per-test key prefix cleaned up after
(``prefix``, tests/conftest.py).

Keys configured here: admin ``test-admin-key``; tenants ``test-acme-key`` → acme, ``test-beta-key`` → beta.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from calibrator import summarize
from service.app import create_app
from service.core.config import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"  # as tests/conftest.py (a conftest cannot be imported)


@pytest.fixture
def make_settings(prefix):
    def build(**overrides) -> Settings:
        values = dict(
            redis_url=REDIS_URL,
            redis_prefix=prefix,
            admin_api_keys=["test-admin-key"],
            tenant_api_keys={"test-acme-key": "acme", "test-beta-key": "beta"},
            known_models=["configured-model"],
            bootstrap_resamples=200,
            max_batch_size=50,
            max_body_bytes=2_000_000,
        )
        return Settings(**{**values, **overrides})

    return build


@pytest.fixture
def api(make_settings):
    with TestClient(create_app(make_settings())) as client:
        yield client


@pytest.fixture
def make_summaries():
    def build(n, *, model="m", task="t", tenant=None, mu=-6.0, tokens=300, window=0, seed=0):
        """``n`` requests with Normal(mu, 2) scores, as JSON-ready dicts."""
        rng = np.random.default_rng(seed)
        return [
            summarize(rng.normal(mu, 2.0, size=(3, 2, tokens)).astype(np.float32), window, model=model, task=task,
                      tenant=tenant).model_dump(mode="json")
            for _ in range(n)
        ]

    return build
