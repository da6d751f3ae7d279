"""Schemathesis fuzzing of the OpenAPI schema against the live app (real Redis): no 5xx, responses conform.

A short run (few examples per operation) to stay well under a minute; benchmarks/fuzz_service.py runs longer.
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from calibrator.series import connect, delete_prefix
from service.app import create_app
from service.core.config import Settings

PREFIX = f"kvzap-test-fuzz-{uuid.uuid4().hex[:8]}:"
ADMIN_KEY = "fuzz-admin-key"
app = create_app(Settings(redis_prefix=PREFIX, admin_api_keys=[ADMIN_KEY], tenant_api_keys={"fuzz-tenant-key": "acme"},
                          known_models=["m"], bootstrap_resamples=50, max_body_bytes=200_000, max_batch_size=20))
# 413 is the documented answer to an oversized body, which is how most over-long arrays are refused.
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5XX"]
# Schema-valid is not always valid: a summary's counts must add up to layers × kv_heads × (tokens − window), a fit
# needs enough samples and a reachable target. Those are refused with 422 and a reason, which is correct.
# The byte budget (413) is also tighter than the schema's array bounds.
ACCEPTANCES = ["2XX", "3XX", "401", "403", "404", "409", "413", "422", "429", "5XX"]
CONFIG = schemathesis.Config.from_dict({"checks": {
    "negative_data_rejection": {"expected-statuses": REJECTIONS},
    "positive_data_acceptance": {"expected-statuses": ACCEPTANCES},
}})
schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _clean_redis():
    yield
    client = connect("redis://127.0.0.1:6379/0")
    delete_prefix(client, PREFIX)


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_conforming_responses(case):
    case.call_and_validate(headers={"X-API-Key": ADMIN_KEY})
