"""docker-compose.yml and the example settings file are consistent with the code (docker cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_healthchecks_profiles_and_volumes():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"redis", "calibrator", "sglang"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert "redis-data:/data" in services["redis"]["volumes"] and "redis-data" in compose["volumes"]
    calibrator = services["calibrator"]
    assert "uvicorn service.app:app" in " ".join(calibrator["command"])
    assert "/healthz" in " ".join(calibrator["healthcheck"]["test"])
    assert calibrator["environment"]["KVZAP_REDIS_URL"] == "redis://redis:6379/0"
    assert calibrator["depends_on"]["redis"]["condition"] == "service_healthy"
    sglang = services["sglang"]
    assert sglang["profiles"] == ["gpu"] and "profiles" not in calibrator and "profiles" not in services["redis"]
    assert sglang["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--kvzap-threshold" in " ".join(sglang["command"])


def test_no_secret_is_written_in_the_compose_file():
    env = _compose()["services"]["calibrator"]["environment"]
    assert env["KVZAP_ADMIN_API_KEYS"].startswith("${KVZAP_ADMIN_API_KEYS:?")


def test_example_env_names_only_real_settings_and_parses():
    text = (ROOT / "configs" / "service.example.env").read_text()
    names = re.findall(r"^KVZAP_([A-Z0-9_]+)=", text, flags=re.M)
    fields = {name.upper() for name in Settings.model_fields}
    assert set(names) <= fields, set(names) - fields
    assert fields <= set(names), f"undocumented settings: {fields - set(names)}"
    settings = Settings(_env_file=ROOT / "configs" / "service.example.env")
    assert settings.tenant_api_keys == {"change-me-tenant-key": "acme"} and settings.known_models == ["smollm2-135m"]
