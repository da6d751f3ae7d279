"""Current τ per (model, task[, tenant]) in one Redis hash, shared by the service (writes) and the plugin's
``ThresholdWatcher`` (reads). A tenant's entry overrides the (model, task) entry for that tenant."""

from __future__ import annotations

import logging
import time
from typing import Literal

import redis
from pydantic import BaseModel, Field, ValidationError

from calibrator.errors import (
    StoreOutcomeUnknownError,
    ThresholdChangedError,
    ThresholdNotFoundError,
    ThresholdUnreadableError,
)
from calibrator.series import SeriesKey, unavailable

log = logging.getLogger(__name__)

# Bounds of a stored τ (a log-score): what the service accepts in a PUT, and what a server applies from the store.
# Far outside any surrogate's scores (which keep everything or nothing there), yet finite in float32.
TAU_LIMIT = 1000.0


class ThresholdRecord(BaseModel):
    model: str
    task: str
    tenant: str | None = None
    # Strict: the record is read by serving schedulers from a store anyone with Redis access can write; ``true`` or
    # ``"-3"`` are not a τ, and 1e300 killed the scheduler that applied it.
    tau: float = Field(ge=-TAU_LIMIT, le=TAU_LIMIT, allow_inf_nan=False, strict=True)
    source: Literal["calibrated", "manual"]
    target_ratio: float | None = None
    predicted_removed_fraction: float | None = None
    n_requests: int | None = None
    updated_at: float = Field(default_factory=time.time)
    updated_by: str | None = None

    @property
    def series(self) -> SeriesKey:
        return SeriesKey(self.model, self.task, self.tenant)


_warned: dict[str, bytes] = {}  # field -> the unreadable entry last logged for it (one warning per bad value)


def parse_record(raw: bytes, field: str) -> ThresholdRecord | None:
    """The record in ``raw``, or None (logged once per field and value) when it is not one: foreign or corrupt data
    under the prefix is treated as absent — left in place, skipped by listings, replaced by the next PUT or
    calibration. Servers poll it every few seconds: logging each poll flooded their logs."""
    try:
        record = ThresholdRecord.model_validate_json(raw)
    except ValidationError as error:
        if _warned.get(field) != raw:
            _warned[field] = raw
            reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors())
            log.warning("ignoring the unreadable threshold record %r: %s", field, reasons)
        return None
    _warned.pop(field, None)
    if "updated_at" not in record.model_fields_set:
        # A record written without one (by hand): the default would be the time it is read, so each poll saw a new
        # record and servers applied and logged it again every poll.
        record = record.model_copy(update={"updated_at": 0.0})
    return record


# Writes a record only if its entry is still what the caller read (one atomic step). KEYS[1] = the thresholds hash;
# ARGV = the series' field, the entry as read ('' = none), the new record.
_PUT_IF_UNCHANGED = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


def _never_sent(error: redis.RedisError) -> bool:
    """redis-py (no retries: ``series.connect``) failed before the command reached the socket: connecting ("Error
    111 connecting to ...", "Timeout connecting to server") or writing ("Error 32 while writing to socket")."""
    text = str(error).lower()
    connection_failure = isinstance(error, (redis.ConnectionError, redis.TimeoutError))
    return connection_failure and ("connecting to" in text or "writing to socket" in text)


class ThresholdStore:
    def __init__(self, client: redis.Redis, prefix: str = "kvzap:") -> None:
        self.client = client
        self.hash_key = f"{prefix}thresholds"
        self._put_if_unchanged = client.register_script(_PUT_IF_UNCHANGED)

    def put(self, record: ThresholdRecord) -> None:
        value = record.model_dump_json()
        try:
            self.client.hset(self.hash_key, record.series.encode(), value)
        except redis.RedisError as error:
            self._raise_unless_stored(error, record, value)

    def entry(self, series: SeriesKey) -> bytes:
        """The series' entry as stored, raw (b'' when there is none): what ``put_if_unchanged`` compares."""
        try:
            return self.client.hget(self.hash_key, series.encode()) or b""
        except redis.RedisError as error:
            raise unavailable(error) from error

    def put_if_unchanged(self, record: ThresholdRecord, seen: bytes) -> None:
        """Store ``record`` if its series' entry is still ``seen`` (from ``entry``); ThresholdChangedError, nothing
        written, if it was set since (a calibration must not overwrite a newer PUT with a τ from older samples)."""
        value = record.model_dump_json()
        try:
            stored = self._put_if_unchanged(keys=[self.hash_key], args=[record.series.encode(), seen, value])
        except redis.RedisError as error:
            stored = self._raise_unless_stored(error, record, value)
        if not stored:
            raise ThresholdChangedError(f"the threshold of {record.series} was set while calibrating (the newer "
                                        "value is kept, nothing was written); calibrate again to replace it")

    def _raise_unless_stored(self, error: redis.RedisError, record: ThresholdRecord, value: str) -> bool:
        """After a write failed: True when reading the entry back shows it landed (only its reply was lost);
        otherwise StoreUnavailableError when the command never went out (connecting or writing to the socket
        failed), else StoreOutcomeUnknownError. Servers poll this hash, so a τ reported as not written but stored
        would still be applied by every server."""
        if not _never_sent(error):
            try:
                if self.client.hget(self.hash_key, record.series.encode()) == value.encode():
                    return True
            except redis.RedisError:
                pass
            raise StoreOutcomeUnknownError(
                f"Redis failed after the threshold of {record.series} was sent ({type(error).__name__}: {error}); it "
                "may have been stored: read it back (GET) before sending it again"
            ) from error
        raise unavailable(error) from error

    def get(self, series: SeriesKey) -> ThresholdRecord:
        """The record stored for exactly this series; ThresholdNotFoundError if none."""
        try:
            raw = self.client.hget(self.hash_key, series.encode())
        except redis.RedisError as error:
            raise unavailable(error) from error
        if raw is None:
            raise ThresholdNotFoundError(f"no threshold stored for {series}")
        record = parse_record(raw, series.encode())
        if record is None:
            raise ThresholdUnreadableError(f"the threshold stored for {series} is unreadable (foreign or corrupt data, "
                                           "or a τ out of bounds); store a new one to replace it")
        return record

    def resolve(self, model: str, task: str, tenant: str | None = None) -> ThresholdRecord:
        """The tenant's own τ when there is one, else the (model, task) τ."""
        candidates = [SeriesKey(model, task, tenant)] + ([SeriesKey(model, task)] if tenant is not None else [])
        try:
            raws = self.client.hmget(self.hash_key, [c.encode() for c in candidates])
        except redis.RedisError as error:
            raise unavailable(error) from error
        unreadable = []
        for candidate, raw in zip(candidates, raws):
            record = None if raw is None else parse_record(raw, candidate.encode())
            if record is not None:
                return record
            if raw is not None:
                unreadable.append(str(candidate))
        if unreadable:
            raise ThresholdUnreadableError(f"the threshold stored for {' and '.join(unreadable)} is unreadable "
                                           "(foreign or corrupt data, or a τ out of bounds); store a new one")
        raise ThresholdNotFoundError(f"no threshold stored for {candidates[0]} or its (model, task)")

    def list(self, model: str | None = None, task: str | None = None) -> list[ThresholdRecord]:
        try:
            entries = self.client.hgetall(self.hash_key)
        except redis.RedisError as error:
            raise unavailable(error) from error
        records = [r for field, raw in entries.items() if (r := parse_record(raw, field.decode(errors="replace")))]
        keep = [r for r in records if (model is None or r.model == model) and (task is None or r.task == task)]
        return sorted(keep, key=lambda r: r.series.sort_key())
