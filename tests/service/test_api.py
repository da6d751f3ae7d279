"""End-to-end HTTP behaviour of the service (TestClient + real Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from statistics import NormalDist

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from calibrator import sample_store, summarize
from calibrator.sample_store import SampleStore, StoreLimits
from service.api.routes import calibrate as calibrate_route
from service.app import create_app

ADMIN = {"X-API-Key": "test-admin-key"}
ACME = {"X-API-Key": "test-acme-key"}
BETA = {"X-API-Key": "test-beta-key"}


def test_ingest_calibrate_and_read_back(api, make_summaries):
    response = api.post("/samples", json={"samples": make_summaries(40)}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": 40, "series": ["m/t"]}
    response = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.75}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    report, record = body["report"], body["threshold"]
    assert abs(report["tau"] - (-6.0 + 2.0 * NormalDist().inv_cdf(0.75))) < 0.08
    assert abs(report["predicted_removed_fraction"] - 0.75) < 0.01
    assert report["ci_low"] <= report["predicted_removed_fraction"] <= report["ci_high"]
    assert report["p10"] <= report["predicted_removed_fraction"] <= report["p90"]
    assert report["n_requests"] == 40
    assert record["tau"] == report["tau"] and record["source"] == "calibrated" and record["target_ratio"] == 0.75
    got = api.get("/thresholds/m/t", headers=ADMIN)
    assert got.status_code == 200 and got.json()["tau"] == report["tau"]
    assert [r["tau"] for r in api.get("/thresholds", params={"model": "m"}, headers=ADMIN).json()] == [report["tau"]]


def test_model_ids_with_slashes_and_manual_thresholds(api, make_summaries):
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert api.post("/samples", json={"samples": make_summaries(2, model=model)}, headers=ADMIN).status_code == 200
    put = api.put(f"/thresholds/{model}/t", json={"tau": -5.5}, headers=ADMIN)
    assert put.status_code == 200, put.text
    assert put.json()["source"] == "manual"
    assert api.get(f"/thresholds/{model}/t", headers=ADMIN).json()["tau"] == -5.5
    assert api.put("/thresholds/configured-model/code", json={"tau": -2}, headers=ADMIN).status_code == 200


def test_tenant_keys_touch_only_their_tenant(api, make_summaries):
    assert api.post("/samples", json={"samples": make_summaries(25, tenant="beta")}, headers=ACME).status_code == 403
    ok = api.post("/samples", json={"samples": make_summaries(25)}, headers=ACME)  # no tenant: attributed to acme
    assert ok.status_code == 200 and ok.json()["series"] == ["m/t (tenant acme)"]
    assert api.post("/samples", json={"samples": make_summaries(25, tenant="beta", mu=-3)}, headers=BETA).status_code == 200

    other = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5, "tenant": "beta"}, headers=ACME)
    assert other.status_code == 403 and "tenant 'acme'" in other.json()["detail"]
    own = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ACME)
    assert own.status_code == 200 and own.json()["threshold"]["tenant"] == "acme"
    assert own.json()["report"]["n_requests"] == 25  # acme's requests only
    pooled = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert pooled.json()["report"]["n_requests"] == 50 and pooled.json()["threshold"]["tenant"] is None

    assert api.put("/thresholds/m/t", params={"tenant": "acme"}, json={"tau": -1}, headers=BETA).status_code == 403
    assert api.put("/thresholds/m/t", json={"tau": -4}, headers=BETA).json()["tenant"] == "beta"
    assert {r["tenant"] for r in api.get("/thresholds", headers=ACME).json()} == {"acme"}
    assert {r["tenant"] for r in api.get("/thresholds", headers=ADMIN).json()} == {None, "acme", "beta"}
    assert api.get("/thresholds/m/t", headers=BETA).json()["tau"] == -4  # its own entry, not the global one
    assert api.get("/thresholds/m/t", params={"tenant": "beta"}, headers=ACME).status_code == 403


def test_missing_or_invalid_keys_are_refused_with_a_reason(api, make_summaries):
    for headers, status, reason in [({}, 401, "X-API-Key"), ({"X-API-Key": "nope"}, 401, "invalid API key")]:
        for method, path, body in [("POST", "/samples", {"samples": make_summaries(1)}),
                                   ("POST", "/calibrate", {"model": "m", "task": "t", "target_ratio": 0.5}),
                                   ("PUT", "/thresholds/m/t", {"tau": 1.0}), ("GET", "/thresholds", None)]:
            response = api.request(method, path, json=body, headers=headers)
            assert response.status_code == status, (method, path, response.text)
            assert reason in response.json()["detail"]
            assert response.json()["error"] == "unauthorized"


def test_bad_input_gets_a_clear_4xx(api, make_summaries):
    api.post("/samples", json={"samples": make_summaries(5)}, headers=ADMIN)
    cases = [
        ("/calibrate", {"model": "m", "task": "t", "target_ratio": 1.0}, 422, "less than 1"),
        ("/calibrate", {"model": "m", "task": "t", "target_ratio": -0.1}, 422, "greater than or equal to 0"),
        ("/calibrate", {"model": "ghost", "task": "t", "target_ratio": 0.5}, 404, "unknown model 'ghost'"),
        ("/calibrate", {"model": "m", "task": "t", "target_ratio": 0.5}, 422, "5 sampled requests for m/t, at least 20"),
        ("/calibrate", {"model": "configured-model", "task": "t", "target_ratio": 0.5}, 422, "0 sampled requests"),
        ("/samples", {"samples": []}, 422, "at least 1 item"),
        ("/samples", {"samples": make_summaries(51)}, 413, "exceeds max_batch_size 50"),
        ("/samples", {"samples": [{**make_summaries(1)[0], "counts": [1]}]}, 422, "differ in length"),
    ]
    for path, body, status, message in cases:
        response = api.post(path, json=body, headers=ADMIN)
        assert response.status_code == status, (body, response.text)
        assert message in response.text, response.text
    empty = api.post("/samples", content=b"", headers={**ADMIN, "content-type": "application/json"})
    assert empty.status_code == 422
    huge = api.post("/samples", content=b"x" * 2_000_001, headers={**ADMIN, "content-type": "application/json"})
    assert huge.status_code == 413 and "exceeds the limit of 2000000 bytes" in huge.json()["detail"]
    assert api.put("/thresholds/ghost/t", json={"tau": 1}, headers=ADMIN).status_code == 404
    assert api.get("/thresholds/m/never", headers=ADMIN).status_code == 404


def test_unreachable_target_says_what_is_achievable(api, make_summaries):
    # 300 tokens with a 200-token window: at most a third of the entries can ever be removed.
    api.post("/samples", json={"samples": make_summaries(20, window=200)}, headers=ADMIN)
    response = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "target_unreachable" and abs(body["achievable_max"] - 1 / 3) < 1e-3
    assert "protected window alone keeps 0.667" in body["detail"]
    assert api.get("/thresholds/m/t", headers=ADMIN).status_code == 404  # nothing stored on failure


def test_redis_down_gives_503_and_the_app_keeps_serving(make_settings, closed_port_url, make_summaries):
    with TestClient(create_app(make_settings(redis_url=closed_port_url, redis_timeout_s=0.5))) as api:
        for method, path, body in [("POST", "/samples", {"samples": make_summaries(1)}),
                                   ("POST", "/calibrate", {"model": "configured-model", "task": "t", "target_ratio": 0.5}),
                                   ("GET", "/thresholds", None), ("PUT", "/thresholds/configured-model/t", {"tau": 1})]:
            response = api.request(method, path, json=body, headers=ADMIN)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"] == "store_unavailable" and "Redis is unavailable" in response.json()["detail"]
        health = api.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert api.get("/metrics").status_code == 200


def test_health_metrics_and_docs(api, make_summaries):
    assert api.get("/healthz").json() == {"status": "ok", "redis": "ok"}
    api.post("/samples", json={"samples": make_summaries(3)}, headers=ADMIN)
    api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    text = api.get("/metrics").text
    assert "kvzap_samples_ingested_total 3.0" in text
    assert 'kvzap_calibrations_total{outcome="too_few_samples"} 1.0' in text
    assert 'kvzap_http_requests_total{method="POST",route="/samples",status="200"} 1.0' in text
    assert 'kvzap_errors_total{code="422"} 1.0' in text
    assert "kvzap_http_request_duration_seconds_bucket" in text
    assert api.get("/docs").status_code == 200
    assert "/calibrate" in api.get("/openapi.json").json()["paths"]


def test_public_reads_setting(make_settings, make_summaries):
    with TestClient(create_app(make_settings(public_reads=True))) as api:
        assert api.get("/thresholds").status_code == 200
        assert api.post("/samples", json={"samples": make_summaries(1)}).status_code == 401


def test_non_finite_numbers_get_a_422_with_a_reason(api, make_summaries):
    # Python's JSON parser reads NaN, Infinity and 1e400 (= inf); echoing them back used to make the 422 a 500.
    summary = make_summaries(1)[0]
    for path, body, loc in [
        ("/calibrate", {"model": "m", "task": "t", "target_ratio": float("nan")}, ["body", "target_ratio"]),
        ("/calibrate", {"model": "m", "task": "t", "target_ratio": 0.5, "confidence": float("inf")}, ["body", "confidence"]),
        ("/samples", {"samples": [{**summary, "timestamp": float("nan")}]}, ["body", "samples", 0, "timestamp"]),
    ]:
        response = api.post(path, content=json.dumps(body), headers={**ADMIN, "content-type": "application/json"})
        assert response.status_code == 422, response.text
        error = response.json()
        assert error["error"] == "invalid_request" and loc in [e["loc"] for e in error["errors"]]
        assert ".".join(map(str, loc)) + ": " in error["detail"]
    overflow = b'{"model": "m", "task": "t", "target_ratio": 1e400}'
    response = api.post("/calibrate", content=overflow, headers={**ADMIN, "content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"] == "body.target_ratio: Input should be a finite number"


def test_a_target_between_score_clusters_is_refused_and_not_stored(api):
    def constant(score):  # every entry of the request at one score
        return summarize(np.full((2, 2, 40), score, dtype=np.float32), 0, model="m", task="t").model_dump(mode="json")

    assert api.post("/samples", json={"samples": [constant(0.0)] * 25}, headers=ADMIN).status_code == 200
    response = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "target_unreachable" and (body["closest_below"], body["closest_above"]) == (0.0, 1.0)
    assert api.get("/thresholds/m/t", headers=ADMIN).status_code == 404  # nothing stored on failure
    api.post("/samples", json={"samples": [constant(-10.0)] * 25}, headers=ADMIN)  # now 0, 0.5 and 1 are achievable
    assert api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.25}, headers=ADMIN).status_code == 422
    ok = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["report"]["predicted_removed_fraction"] == 0.5


def test_corrupt_records_under_the_prefix_are_skipped_not_a_500(api, make_summaries, redis_client, prefix):
    api.post("/samples", json={"samples": make_summaries(25)}, headers=ADMIN)
    assert api.put("/thresholds/m/t", json={"tau": -5.0}, headers=ADMIN).status_code == 200
    redis_client.hset(f"{prefix}thresholds", mapping={"m:other:*": b"not json", "foreign": b"[]"})
    redis_client.sadd(f"{prefix}series", b"foreign-member")
    listing = api.get("/thresholds", headers=ADMIN)
    assert listing.status_code == 200 and [(r["task"], r["tau"]) for r in listing.json()] == [("t", -5.0)]
    unreadable = api.get("/thresholds/m/other", headers=ADMIN)
    assert unreadable.status_code == 404 and "unreadable" in unreadable.json()["detail"]
    assert api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN).status_code == 200
    assert api.put("/thresholds/m/other", json={"tau": -4.0}, headers=ADMIN).status_code == 200  # replaces it
    assert api.get("/thresholds/m/other", headers=ADMIN).json()["tau"] == -4.0
    redis_client.rpush(f"{prefix}segs:m:t:*", b"junk")  # fit data: refused with the key named
    refused = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert refused.status_code == 503 and "segs:m:t:* holds b'junk'" in refused.json()["detail"]


def test_a_malformed_content_length_is_a_400(api):
    for declared in ("abc", "-1", "1e3", " "):
        response = api.post("/calibrate", content=b"{}", headers={**ADMIN, "content-type": "application/json",
                                                                 "content-length": declared})
        assert response.status_code == 400, (declared, response.text)
        assert response.json()["error"] == "bad_request" and "is not a non-negative integer" in response.json()["detail"]
    too_large = api.post("/calibrate", content=b"{}", headers={**ADMIN, "content-length": "2000001"})
    assert too_large.status_code == 413
    # Refused before routing, yet counted under its route (it was route="unmatched", with the 404s).
    metrics = api.get("/metrics").text
    assert 'kvzap_http_requests_total{method="POST",route="/calibrate",status="413"} 1.0' in metrics
    assert api.get("/no/such/path", headers=ADMIN).status_code == 404
    assert 'kvzap_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in api.get("/metrics").text


@pytest.mark.parametrize("method, path, allow", [("DELETE", "/thresholds/m/t", "GET, PUT"), ("GET", "/samples", "POST"),
                                                 ("GET", "/calibrate", "POST"), ("PATCH", "/thresholds", "GET")])
def test_a_405_says_which_methods_the_path_serves(api, method, path, allow):
    """Every 405 had an empty Allow header (FastAPI's included routers have no methods of their own; review)."""
    response = api.request(method, path, headers=ADMIN)
    assert response.status_code == 405 and response.headers["allow"] == allow


def test_unknown_http_methods_share_one_metrics_label(api):
    for method in ("M00001", "M00002", "BREW"):
        assert api.request(method, "/healthz").status_code == 405
    lines = [line for line in api.get("/metrics").text.splitlines() if line.startswith("kvzap_http_request")]
    assert any('method="OTHER"' in line and 'status="405"} 3.0' in line for line in lines), lines
    assert not any(name in line for line in lines for name in ("M00001", "M00002", "BREW"))


def test_a_tenant_never_learns_another_tenants_models(api, make_summaries):
    for model, key in (("beta-model", BETA), ("acme-model", ACME), ("admin-model", ADMIN)):
        assert api.post("/samples", json={"samples": make_summaries(2, model=model)}, headers=key).status_code == 200
    for response in (api.post("/calibrate", json={"model": "ghost", "task": "t", "target_ratio": 0.5}, headers=ACME),
                     api.put("/thresholds/ghost/t", json={"tau": 1.0}, headers=ACME)):
        assert response.status_code == 404, response.text
        assert response.json()["detail"].endswith("(known: ['acme-model', 'configured-model'])")
    beta_model = api.put("/thresholds/beta-model/t", json={"tau": 1.0}, headers=ACME)  # as unknown to acme as a ghost
    assert beta_model.status_code == 404 and "beta-model" not in beta_model.json()["detail"].split("known:")[1]
    assert api.put("/thresholds/acme-model/t", json={"tau": 1.0}, headers=ACME).status_code == 200
    admin = api.put("/thresholds/ghost/t", json={"tau": 1.0}, headers=ADMIN)
    assert admin.json()["detail"].endswith("(known: ['acme-model', 'admin-model', 'beta-model', 'configured-model'])")


def test_a_client_gone_mid_body_is_a_499_not_an_error(make_settings):
    """Driven through the ASGI interface by hand: a client that sends half a body, then disconnects."""
    app = create_app(make_settings())
    incoming = iter([{"type": "http.request", "body": b'{"samples":', "more_body": True}, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(incoming)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/samples", "raw_path": b"/samples", "root_path": "", "query_string": b"",
             "headers": [(b"x-api-key", b"test-admin-key"), (b"content-type", b"application/json"),
                         (b"content-length", b"1000")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    assert sent == []  # nobody to answer
    with TestClient(app) as api:
        text = api.get("/metrics").text
    assert 'kvzap_http_requests_total{method="POST",route="/samples",status="499"} 1.0' in text
    assert "kvzap_errors_total{" not in text and 'status="500"' not in text


def test_malformed_json_is_a_400_with_the_reason(api):
    for method, path in (("POST", "/calibrate"), ("POST", "/samples"), ("PUT", "/thresholds/m/t")):
        response = api.request(method, path, content=b'{"model": "m", ',
                               headers={**ADMIN, "content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        body = response.json()
        assert body["error"] == "bad_request" and body["detail"].startswith("body is not valid JSON: "), body
        assert set(body) == {"error", "detail"}


def test_the_service_publishes_its_retention_for_the_servers_samplers(make_settings, redis_client, prefix):
    settings = make_settings(max_requests_per_series=400, segment_size=100, raw_samples_per_series=0, retention_s=900)
    with TestClient(create_app(settings)):
        deadline = time.monotonic() + 5
        while not redis_client.exists(f"{prefix}limits"):
            assert time.monotonic() < deadline, "the limits were not published"
            time.sleep(0.05)
    published = {k.decode(): int(v) for k, v in redis_client.hgetall(f"{prefix}limits").items()}
    assert published == {"max_requests": 400, "segment_size": 100, "raw_max": 0, "retention_s": 900}
    sampler = SampleStore(redis_client, prefix)  # as a KVzap server's sampler builds it
    sampler._refresh_limits()
    assert sampler.limits == StoreLimits(max_requests=400, segment_size=100, raw_max=0, retention_s=900)


def test_a_threshold_set_while_calibrating_is_kept(api, make_summaries, monkeypatch):
    """A PUT that lands while a calibration fits is newer than the samples the fit read: the calibration writes
    nothing and answers 409 (it overwrote the manual τ). The patched fit injects that interleaving: it sends the
    PUT through the same client, then returns the real fit."""
    assert api.post("/samples", json={"samples": make_summaries(30)}, headers=ADMIN).status_code == 200
    real_fit = calibrate_route.fit_threshold

    def fit_while_a_put_lands(*args, **kwargs):
        report = real_fit(*args, **kwargs)
        assert api.put("/thresholds/m/t", json={"tau": -3.0}, headers=ADMIN).status_code == 200
        return report

    monkeypatch.setattr(calibrate_route, "fit_threshold", fit_while_a_put_lands)
    response = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == "threshold_changed" and "calibrate again" in body["detail"], body
    kept = api.get("/thresholds/m/t", headers=ADMIN).json()
    assert (kept["tau"], kept["source"]) == (-3.0, "manual")
    assert 'kvzap_calibrations_total{outcome="threshold_changed"} 1.0' in api.get("/metrics").text
    monkeypatch.undo()  # calibrating again replaces the manual τ, as any calibration after a PUT does
    again = api.post("/calibrate", json={"model": "m", "task": "t", "target_ratio": 0.5}, headers=ADMIN)
    assert again.status_code == 200, again.text
    assert api.get("/thresholds/m/t", headers=ADMIN).json()["source"] == "calibrated"


def test_a_batch_that_keeps_losing_the_race_is_busy_not_an_outage(api, make_summaries, monkeypatch, redis_client,
                                                                   prefix):
    """Failure injection: every attempt of the service's ingest meets a WATCH conflict (as writers of the series in
    other processes would cause; the backoff's pauses are skipped). Redis is up: the answer is 503 store_busy with
    a Retry-After, not the store_unavailable of an outage, and nothing is written."""
    def conflict(self, pipe, rows, marker):
        raise redis.WatchError("watched variable changed (injected)")

    monkeypatch.setattr(SampleStore, "_queue_batch", conflict)
    monkeypatch.setattr(sample_store, "_watch_backoff_s", lambda retry: 0.0)
    response = api.post("/samples", json={"samples": make_summaries(3)}, headers=ADMIN)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "store_busy" and response.headers["Retry-After"] == "1"
    assert api.get("/healthz").status_code == 200
    assert not list(redis_client.scan_iter(match=f"{prefix}seg*"))


def test_a_tenant_cannot_grow_the_series_index_without_bound(make_settings, make_summaries):
    """One tenant key made a new (model, task) series per summary: about 650 Redis keys each, unbounded, and every
    invented model then counted as known (review). Past KVZAP_MAX_SERIES_PER_TENANT a batch is refused whole; other
    tenants and the tenant's existing series are unaffected."""
    acme, beta = ACME, BETA
    with TestClient(create_app(make_settings(max_series_per_tenant=3))) as api:
        two = make_summaries(1, model="m1") + make_summaries(1, model="m2")
        assert api.post("/samples", json={"samples": two}, headers=acme).status_code == 200
        three_more = [make_summaries(1, model=f"junk-{i}")[0] for i in range(3)]
        refused = api.post("/samples", json={"samples": three_more}, headers=acme)
        assert refused.status_code == 422 and refused.json()["error"] == "series_limit", refused.text
        detail = refused.json()["detail"]
        assert "tenant 'acme' has 2 (model, task) series stored and this batch starts 3 more" in detail
        assert api.put("/thresholds/junk-0/t", json={"tau": -3}, headers=ADMIN).status_code == 404  # nothing stored
        assert api.post("/samples", json={"samples": make_summaries(5, model="m1")}, headers=acme).status_code == 200
        assert api.post("/samples", json={"samples": three_more[:1]}, headers=acme).status_code == 200  # the third
        assert api.post("/samples", json={"samples": three_more}, headers=beta).status_code == 200  # its own three


def test_a_tenant_key_naming_another_tenant_gets_a_403_on_the_list_too(api):
    """The list answered [] where GET /thresholds/m/t?tenant=beta answered 403 (review): one answer for one case."""
    listed = api.get("/thresholds", params={"tenant": "beta"}, headers=ACME)
    assert listed.status_code == 403 and "cannot touch tenant 'beta'" in listed.json()["detail"]
    assert api.get("/thresholds/m/t", params={"tenant": "beta"}, headers=ACME).status_code == 403
    assert api.get("/thresholds", params={"tenant": "acme"}, headers=ACME).status_code == 200
    assert api.get("/thresholds", params={"tenant": "beta"}, headers=ADMIN).status_code == 200
