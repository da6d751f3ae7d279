"""All service settings in one place, from the environment (prefix ``KVZAP_``) and optionally an env file named
by ``KVZAP_ENV_FILE`` (see configs/service.example.env). No secret has a default: with no keys configured every
write is refused."""

from __future__ import annotations

import os
import re

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from calibrator.sample_store import StoreLimits
from calibrator.summary import LABEL_PATTERN, MODEL_PATTERN


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVZAP_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("kvzap:", min_length=1, max_length=64)
    redis_timeout_s: float = Field(2.0, gt=0, le=60)

    # API keys: admins touch everything; a tenant key (key → tenant) touches only its tenant's entries.
    admin_api_keys: list[SecretStr] = []
    tenant_api_keys: dict[str, str] = {}
    public_reads: bool = False  # when False, GET /thresholds needs a key too

    known_models: list[str] = []  # accepted by /calibrate and PUT before any sample arrived

    # Bounds on what a client can make the service hold or compute.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(1000, ge=1, le=10_000)
    max_requests_per_series: int = Field(200_000, ge=1)
    segment_size: int = Field(10_000, ge=1)
    raw_samples_per_series: int = Field(10_000, ge=0)
    retention_s: int = Field(7 * 24 * 3600, ge=1)

    # Fit defaults (a request may override min_samples).
    default_min_samples: int = Field(20, ge=1)
    bootstrap_resamples: int = Field(1000, ge=10, le=100_000)
    tolerance: float = Field(0.01, ge=0, lt=1)

    @field_validator("tenant_api_keys")
    @classmethod
    def _tenant_names(cls, value: dict[str, str]) -> dict[str, str]:
        for tenant in value.values():
            if not re.fullmatch(LABEL_PATTERN, tenant):
                raise ValueError(f"tenant name {tenant!r} must match {LABEL_PATTERN}")
        return value

    @field_validator("known_models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        for model in value:
            if not re.fullmatch(MODEL_PATTERN, model):
                raise ValueError(f"model id {model!r} must match {MODEL_PATTERN}")
        return value

    def store_limits(self) -> StoreLimits:
        return StoreLimits(
            max_requests=self.max_requests_per_series,
            segment_size=self.segment_size,
            raw_max=self.raw_samples_per_series,
            retention_s=self.retention_s,
        )


def load_settings() -> Settings:
    return Settings(_env_file=os.environ.get("KVZAP_ENV_FILE"))
