"""The (model, task, tenant) a sample or a threshold belongs to, and its Redis key names."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from calibrator.errors import StoreUnavailableError

_NO_TENANT = "*"  # never produced by quote(..., safe=""), so it cannot collide with a tenant name


@dataclass(frozen=True)
class SeriesKey:
    model: str
    task: str
    tenant: str | None = None

    def encode(self) -> str:
        tenant = _NO_TENANT if self.tenant is None else quote(self.tenant, safe="")
        return f"{quote(self.model, safe='')}:{quote(self.task, safe='')}:{tenant}"

    @classmethod
    def decode(cls, encoded: str | bytes) -> SeriesKey:
        text = encoded.decode() if isinstance(encoded, bytes) else encoded
        model, task, tenant = text.split(":")
        return cls(unquote(model), unquote(task), None if tenant == _NO_TENANT else unquote(tenant))

    def sort_key(self) -> tuple[str, str, str]:
        return self.model, self.task, self.tenant or ""

    def __str__(self) -> str:
        return f"{self.model}/{self.task}" + ("" if self.tenant is None else f" (tenant {self.tenant})")


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A binary-safe client that fails fast when Redis is down (no retries that would stall a caller)."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def unavailable(error: redis.RedisError) -> StoreUnavailableError:
    return StoreUnavailableError(f"Redis is unavailable ({type(error).__name__}: {error})")
