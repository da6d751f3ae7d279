"""All service settings in one place, from the environment (prefix ``KVZAP_``) and optionally an env file named
by ``KVZAP_ENV_FILE`` (see configs/service.example.env). No secret has a default: with no keys configured every
write is refused."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from calibrator.sample_store import MAX_RETENTION_S, MIN_SEGMENTS_PER_BOUND, StoreLimits
from calibrator.summary import LABEL_PATTERN, MODEL_PATTERN


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting's error must not print the API keys (or a URL's password) to the log.
    model_config = SettingsConfigDict(env_prefix="KVZAP_", extra="ignore", hide_input_in_errors=True)

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
    # Each series costs Redis hundreds of keys and every /calibrate and PUT reads the series index: a tenant key
    # naming a new model or task per summary must not grow it without bound.
    max_series_per_tenant: int = Field(100, ge=1, le=100_000)
    max_requests_per_series: int = Field(200_000, ge=MIN_SEGMENTS_PER_BOUND)
    segment_size: int = Field(10_000, ge=1)
    raw_samples_per_series: int = Field(10_000, ge=0)
    retention_s: int = Field(7 * 24 * 3600, ge=1)

    # Fit defaults (a request may override min_samples, asking for fewer or more).
    default_min_samples: int = Field(20, ge=1)
    bootstrap_resamples: int = Field(1000, ge=10, le=100_000)
    tolerance: float = Field(0.01, ge=0, lt=1)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        """Checked here, not at the first connect: a typo must stop the start-up with the setting's name."""
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"KVZAP_REDIS_URL must be a redis://, rediss:// or unix:// URL, got scheme {scheme!r}")
        try:
            parse_url(value)  # redis-py's own parser: what it refuses (a non-numeric port, …) is refused now
        except ValueError as error:
            raise ValueError(f"KVZAP_REDIS_URL is not a valid Redis URL: {error}") from None
        return value

    @field_validator("admin_api_keys")
    @classmethod
    def _admin_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for number, key in enumerate(value):
            _check_key(key.get_secret_value(), f"admin key #{number + 1}")
        return value

    @field_validator("tenant_api_keys")
    @classmethod
    def _tenant_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key, tenant in value.items():
            if not re.fullmatch(LABEL_PATTERN, tenant):
                raise ValueError(f"tenant name {tenant!r} must match {LABEL_PATTERN}")
            _check_key(key, f"the key of tenant {tenant!r}")
        return value

    @model_validator(mode="after")
    def _one_role_per_key(self) -> Settings:
        """A key in both lists would act as admin (deps._identify): the tenant restriction meant for it would
        silently not apply."""
        admins = {key.get_secret_value() for key in self.admin_api_keys}
        both = sorted(tenant for key, tenant in self.tenant_api_keys.items() if key in admins)
        if both:
            raise ValueError(f"the key of tenant(s) {both} is also listed in KVZAP_ADMIN_API_KEYS; give every key "
                             "one role (admin or one tenant)")
        return self

    @field_validator("retention_s")
    @classmethod
    def _retention_in_range(cls, value: int) -> int:
        """StoreLimits refuses a longer one too; here the start-up stops naming the setting."""
        if value > MAX_RETENTION_S:
            raise ValueError(f"KVZAP_RETENTION_S ({value}) is longer than the longest accepted, {MAX_RETENTION_S} "
                             "(10 years); set that to keep samples for as long as possible")
        return value

    @model_validator(mode="after")
    def _segments_fit_the_bound(self) -> Settings:
        """Retention drops whole segments: a bound of fewer than MIN_SEGMENTS_PER_BOUND segments would let a series
        fall far below it (to one request with one segment per bound). SampleStore refuses such limits too; here the
        start-up stops naming the settings."""
        if self.segment_size * MIN_SEGMENTS_PER_BOUND > self.max_requests_per_series:
            raise ValueError(
                f"KVZAP_SEGMENT_SIZE ({self.segment_size}) is more than 1/{MIN_SEGMENTS_PER_BOUND} of "
                f"KVZAP_MAX_REQUESTS_PER_SERIES ({self.max_requests_per_series}); lower KVZAP_SEGMENT_SIZE to at most "
                f"{self.max_requests_per_series // MIN_SEGMENTS_PER_BOUND} or raise KVZAP_MAX_REQUESTS_PER_SERIES"
            )
        return self

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


def _check_key(key: str, what: str) -> None:
    """Never prints the key. Header values arrive stripped and an empty one means "no key", so such a key could
    never authenticate anyone: a configuration mistake, refused."""
    if not key or key != key.strip():
        raise ValueError(f"{what} is empty or starts or ends with whitespace")


def load_settings() -> Settings:
    """Settings from the environment and, when KVZAP_ENV_FILE is set (non-empty), that file, which must exist:
    pydantic-settings skips a missing env file silently, so a typo in its path would drop every setting in it."""
    env_file = os.environ.get("KVZAP_ENV_FILE") or None
    if env_file is not None and not Path(env_file).is_file():
        raise FileNotFoundError(f"KVZAP_ENV_FILE={env_file!r}: no such file (unset KVZAP_ENV_FILE to use none)")
    return Settings(_env_file=env_file)
