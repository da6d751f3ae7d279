"""Start-up settings fail fast, naming the setting, and never print a key (the settings are built for real)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.config import Settings, load_settings


def test_a_missing_env_file_stops_the_start(monkeypatch, tmp_path):
    monkeypatch.setenv("KVZAP_ENV_FILE", str(tmp_path / "service.env"))
    with pytest.raises(FileNotFoundError, match="KVZAP_ENV_FILE=.*service.env': no such file"):
        load_settings()
    (tmp_path / "service.env").write_text('KVZAP_KNOWN_MODELS=["from-file"]\n')
    assert load_settings().known_models == ["from-file"]
    monkeypatch.setenv("KVZAP_ENV_FILE", "")  # empty = unset
    assert load_settings().known_models == []


@pytest.mark.parametrize("url, reason", [
    ("http://x", "KVZAP_REDIS_URL must be a redis://, rediss:// or unix:// URL, got scheme 'http'"),
    ("127.0.0.1:6379", "KVZAP_REDIS_URL must be"),
    ("redis://host:abc/0", "KVZAP_REDIS_URL is not a valid Redis URL: Port could not be cast"),
])
def test_a_bad_redis_url_names_the_setting(monkeypatch, url, reason):
    monkeypatch.setenv("KVZAP_REDIS_URL", url)
    with pytest.raises(ValidationError, match=reason):
        load_settings()


def test_every_redis_scheme_is_accepted():
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@host:6380/1", "unix:///run/redis.sock?db=2"):
        assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize("values, reason", [
    ({"admin_api_keys": [""]}, "admin key #1 is empty"),
    ({"admin_api_keys": ["fine-key", " padded-secret"]}, "admin key #2 is empty or starts or ends with whitespace"),
    ({"tenant_api_keys": {"": "acme"}}, "the key of tenant 'acme' is empty"),
    ({"admin_api_keys": ["shared-secret"], "tenant_api_keys": {"shared-secret": "acme", "own-secret": "beta"}},
     r"the key of tenant\(s\) \['acme'\] is also listed in KVZAP_ADMIN_API_KEYS"),
])
def test_unusable_or_ambiguous_keys_are_refused_without_printing_them(values, reason):
    with pytest.raises(ValidationError, match=reason) as caught:
        Settings(**values)
    assert "secret" not in str(caught.value)


def test_keys_from_the_environment_are_checked_too(monkeypatch):
    monkeypatch.setenv("KVZAP_ADMIN_API_KEYS", '["shared-secret"]')
    monkeypatch.setenv("KVZAP_TENANT_API_KEYS", '{"shared-secret": "acme"}')
    with pytest.raises(ValidationError, match="also listed in KVZAP_ADMIN_API_KEYS") as caught:
        load_settings()
    assert "shared-secret" not in str(caught.value)


def test_a_segment_over_a_quarter_of_the_series_bound_stops_the_start():
    """Retention drops whole segments: a series would hold up to segment_size requests, whatever the bound, and with
    one segment per bound it fell to a single request at each drop."""
    with pytest.raises(ValidationError, match=r"KVZAP_SEGMENT_SIZE \(10000\) is more than 1/4 of "
                                              r"KVZAP_MAX_REQUESTS_PER_SERIES \(100\); lower KVZAP_SEGMENT_SIZE to "
                                              r"at most 25"):
        Settings(max_requests_per_series=100)
    with pytest.raises(ValidationError, match=r"KVZAP_SEGMENT_SIZE \(100\) is more than 1/4 of "):
        Settings(max_requests_per_series=100, segment_size=100)
    limits = Settings(max_requests_per_series=100, segment_size=25, retention_s=80).store_limits()
    assert (limits.max_requests, limits.segment_size, limits.max_age_ms) == (100, 25, 90_000)


def test_a_retention_over_ten_years_stops_the_start(monkeypatch):
    """A huge KVZAP_RETENTION_S ("keep for ever") reached back before 1970: every POST /samples stored its batch and
    answered 503 store_outcome_unknown (a retry stored it twice)."""
    monkeypatch.setenv("KVZAP_RETENTION_S", "9999999999")
    with pytest.raises(ValidationError, match=r"KVZAP_RETENTION_S \(9999999999\) is longer than the longest "
                                              r"accepted, 315360000 \(10 years\)"):
        load_settings()
    monkeypatch.setenv("KVZAP_RETENTION_S", "315360000")
    assert load_settings().store_limits().retention_s == 315_360_000


@pytest.mark.parametrize("env, reason", [
    ({"KVZAP_REDIS_URL": "http://x"}, "KVZAP_REDIS_URL: Value error, KVZAP_REDIS_URL must be a redis://"),
    ({"KVZAP_ADMIN_API_KEYS": "not-json"}, 'error parsing value for field "admin_api_keys"'),
    ({"KVZAP_ENV_FILE": "/nonexistent/service.env"}, "KVZAP_ENV_FILE='/nonexistent/service.env': no such file"),
])
def test_the_served_app_stops_on_a_bad_setting_with_one_line(env, reason):
    """What ``uvicorn service.app:app`` imports: it printed uvicorn's 50-line import traceback first."""
    root = Path(__file__).resolve().parents[2]
    started = subprocess.run([sys.executable, "-c", "import service.app"], cwd=root, capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120)  # fmt: skip
    lines = started.stderr.strip().splitlines()
    assert started.returncode == 1 and len(lines) == 1, started.stderr
    assert lines[0].startswith("kvzap calibration service: bad settings: ") and reason in lines[0], lines[0]
