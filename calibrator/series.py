"""The (model, task, tenant) a sample or a threshold belongs to, and its Redis key names."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from calibrator.errors import StoreUnavailableError

log = logging.getLogger(__name__)

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
        """Inverse of ``encode``; ValueError (naming the input) for anything ``encode`` cannot have produced."""
        try:
            text = encoded.decode() if isinstance(encoded, bytes) else encoded
            model, task, tenant = text.split(":")
        except ValueError:  # UnicodeDecodeError is one too
            raise ValueError(f"{encoded!r} is not an encoded series key (model:task:tenant)") from None
        if not model or not task or not tenant:
            raise ValueError(f"{encoded!r} is not an encoded series key (model:task:tenant)")
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


def delete_prefix(client: redis.Redis, prefix: str, batch: int = 1000) -> int:
    """Delete every key that starts with ``prefix``; returns how many were deleted.

    The prefix is matched literally: SCAN's glob characters in it are escaped, so ``a[1]:`` never reaches ``a1:x``.
    An empty prefix is refused: it would match the whole database."""
    if not prefix:
        raise ValueError("refusing to delete every key: the prefix is empty")
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    keys = list(client.scan_iter(match=pattern, count=batch))
    for start in range(0, len(keys), batch):
        client.unlink(*keys[start : start + batch])
    return len(keys)


def decode_members(members: Iterable[bytes], where: str) -> list[SeriesKey]:
    """The series keys among ``members``; foreign or corrupt ones are logged and skipped, not deleted: one bad
    member must not take every listing and fit down, and what is not ours is not ours to remove."""
    series = []
    for member in members:
        try:
            series.append(SeriesKey.decode(member))
        except ValueError as error:
            log.warning("skipping a member of %s: %s", where, error)
    return series


def unavailable(error: redis.RedisError) -> StoreUnavailableError:
    return StoreUnavailableError(f"Redis is unavailable ({type(error).__name__}: {error})")
