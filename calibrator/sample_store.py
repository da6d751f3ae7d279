"""Sampled traffic in Redis, laid out so that a fit reads O(edges + N) bytes, not O(N × edges).

Per series (model, task, tenant), under a configurable key prefix ``P`` and ``S = SeriesKey.encode()``:

* ``P:raw:S`` — capped stream (XADD MAXLEN ~) of the raw summaries as JSON, for audit and re-aggregation;
* ``P:segs:S`` — list of live segment ids, oldest first; ``P:meta:S`` — hash with the next segment id and, per
  segment ``G``, ``n:G`` (requests in it) and ``expires:G`` (when its keys expire, Redis time in ms);
* per segment ``G`` (at most ``segment_size`` requests), the pre-aggregated fit data:
  ``P:seg:S:G:sum`` — hash: ``n`` requests, ``removable`` and, for every edge ``k``, field ``k`` =
  Σ over requests of the quantised removed fraction at ``EDGES[k]``;
  ``P:seg:S:G:col:k`` — string: the quantised removed fraction at ``EDGES[k]`` of each request (uint16, in order);
  ``P:seg:S:G:totals`` — string: entries per request (float64).

A fit reads the sums (mean curve → τ), then one column per segment (bootstrap, p10/p90). Per-request fractions
are quantised to 1/65535 (error <= 7.7e-6, far below the bin resolution). Retention, by count: while a series
holds more than ``max_requests`` its oldest whole segment is dropped; as a bound spans at least
``MIN_SEGMENTS_PER_BOUND`` (4) segments, a series then still holds more than ``max_requests - segment_size``
(>= 3/4 of the bound) of its newest requests, and never more than ``max_requests``. By age (``retention_s`` at most
``MAX_RETENTION_S``, 10 years): a segment takes new requests for ``retention_s / 8`` after it opened (then the next
one opens) and its keys expire together at a fixed time, so a sample is kept at least ``retention_s`` and at most
``StoreLimits.max_age_ms`` (1.125 × ``retention_s``) — however slowly its series is written (the keys' TTL was
refreshed by every append, so a series written now and then kept its samples for ever). A segment's expiry is fixed
when it opens; when the retention shrinks, the next write brings every segment's expiry down to at most
``max_age_ms`` from then, and a segment takes requests only while its expiry keeps them between ``retention_s`` and
``max_age_ms``. The raw stream is trimmed to ``retention_s`` by entry id on each write and read no further back.
Each ingest is one MULTI/EXEC guarded by WATCH: a batch is stored completely or not at all (EXEC is atomic
when the connection drops; Redis has no rollback for commands failing inside EXEC, so key types are checked
under WATCH first). The same EXEC writes ``P:batch:ID``, a marker of the batch (TTL ``BATCH_MARKER_TTL_S``): a
retry finds it when an earlier attempt's EXEC ran although its reply was lost, and stores nothing again. Within a
process, ingests of one series take turns (a lock per series stripe), so they never conflict under WATCH; writers in
different processes that do retry after a jittered, exponentially growing pause (``_watch_backoff_s``), and one that
still conflicts after ``_MAX_WATCH_RETRIES`` attempts raises ``StoreBusyError``, not an outage.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import numpy as np
import redis

from calibrator.bins import NUM_EDGES
from calibrator.curves import InMemoryCurves
from calibrator.errors import StoreBusyError, StoreOutcomeUnknownError, StoreUnavailableError
from calibrator.series import SeriesKey, decode_members, unavailable
from calibrator.summary import ScoreSummary

log = logging.getLogger(__name__)

QUANTUM = 65535  # uint16 full scale for a fraction in [0, 1]
# How often a store without limits of its own (a server's sampler) reads the limits the service published.
LIMITS_REFRESH_S = 30.0
_MAX_WATCH_RETRIES = 20
# Pause before retrying after a WATCH conflict (with another process): uniform in [0, min(CAP, BASE * 2**retry)].
# Retried back to back, writers of one series kept colliding and ran out of attempts; the pauses of one ingest last
# 0.72 s at most in all.
_WATCH_BACKOFF_BASE_S = 0.001
_WATCH_BACKOFF_CAP_S = 0.05
# Threads of one process that race under WATCH mostly burn the GIL the winner needs (an attempt is ~10 ms of Python
# for 641 edges): 8 threads writing one series ran out of attempts even with the pause, and took 4x as long. They
# take turns instead, on one of this many locks per store (bounded, whatever the number of series).
_LOCK_STRIPES = 64
# A marker only has to outlive the retries of its own ingest (each a few round trips, bounded by the socket timeout).
BATCH_MARKER_TTL_S = 600
# A segment takes new requests for retention_s / AGE_SLICES: samples outlive retention_s by at most that much.
AGE_SLICES = 8
# Count retention drops the oldest whole segment: a bound of at least this many segments keeps a series at more than
# max_requests - segment_size >= 3/4 of its bound (with one segment per bound it fell back to a single request).
MIN_SEGMENTS_PER_BOUND = 4
# Longest retention accepted (10 years): a larger one meant "keep for ever" and reached back before 1970, where the
# raw stream's trim by entry id (a Redis time in ms) failed inside EXEC after the rest of the batch was applied.
MAX_RETENTION_S = 10 * 365 * 24 * 3600

# Removes the index members whose series has no segment list, in one atomic step: an ingest that revives a series
# (its MULTI writes the list and SADDs the member) cannot land between the check and the SREM.
# KEYS[1] = the index, KEYS[i + 1] = the segment list of ARGV[i] (a member).
_REMOVE_DEAD_SERIES = """
local removed = 0
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], member)
  end
end
return removed
"""


def _watch_backoff_s(retry: int) -> float:
    """The pause before the ``retry``-th retry (from 0) of a conflicting ingest, jittered so writers spread out."""
    return random.uniform(0, min(_WATCH_BACKOFF_CAP_S, _WATCH_BACKOFF_BASE_S * 2**retry))


@dataclass(frozen=True)
class StoreLimits:
    max_requests: int = 200_000  # per series; enforced by dropping whole segments
    segment_size: int = 10_000
    raw_max: int = 10_000  # raw stream length per series (approximate, as XADD MAXLEN ~); 0 = keep none
    retention_s: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if min(self.max_requests, self.segment_size, self.retention_s) < 1 or self.raw_max < 0:
            raise ValueError(f"store limits must be positive (raw_max >= 0), got {self}")
        if self.segment_size * MIN_SEGMENTS_PER_BOUND > self.max_requests:
            raise ValueError(
                f"segment_size {self.segment_size} is more than 1/{MIN_SEGMENTS_PER_BOUND} of max_requests "
                f"{self.max_requests}: retention drops whole segments, so a series could fall far below its bound"
            )
        if self.retention_s > MAX_RETENTION_S:
            raise ValueError(f"retention_s {self.retention_s} is longer than the longest accepted, {MAX_RETENTION_S} "
                             "(10 years)")

    @property
    def open_for_ms(self) -> int:
        """How long a segment takes new requests after it opened."""
        return max(1, self.retention_s * 1000 // AGE_SLICES)

    @property
    def max_age_ms(self) -> int:
        """The longest a sample is kept: its segment opened at most ``open_for_ms`` before it was written."""
        return self.retention_s * 1000 + self.open_for_ms


@dataclass
class _Segment:
    """A listed segment as an ingest sees it: ``expires`` is None for one stored before segments recorded it."""

    sid: int
    n: int
    expires: int | None  # when its keys expire (Redis ms)

    def alive(self, now_ms: int) -> bool:
        if self.expires is None:
            return self.n > 0  # its keys expire by their own TTL (an expired sum reads 0)
        return now_ms < self.expires

    def open(self, now_ms: int, limits: StoreLimits) -> bool:
        """Takes new requests: not full, and a request written now would be kept between retention_s and max_age
        (with unchanged limits: for open_for_ms after the segment opened)."""
        if self.expires is None or self.n >= limits.segment_size:
            return False
        return limits.retention_s * 1000 <= self.expires - now_ms <= limits.max_age_ms


@dataclass
class _Keys:
    prefix: str

    def series_set(self) -> str:
        return f"{self.prefix}series"

    def raw(self, s: SeriesKey) -> str:
        return f"{self.prefix}raw:{s.encode()}"

    def segs(self, s: SeriesKey) -> str:
        return f"{self.prefix}segs:{s.encode()}"

    def meta(self, s: SeriesKey) -> str:
        return f"{self.prefix}meta:{s.encode()}"

    def limits(self) -> str:
        return f"{self.prefix}limits"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}"

    def seg(self, s: SeriesKey, sid: int) -> str:
        return f"{self.prefix}seg:{s.encode()}:{sid}"

    def seg_keys(self, s: SeriesKey, sid: int) -> list[str]:
        base = self.seg(s, sid)
        return [f"{base}:sum", f"{base}:totals", *(f"{base}:col:{k}" for k in range(NUM_EDGES))]


@dataclass(frozen=True)
class _Rows:
    """Quantised fit data of a group of summaries: ``quantised`` [B, NUM_EDGES] uint16, ``totals`` [B] float64,
    ``removable`` [B] uint16."""

    quantised: np.ndarray
    totals: np.ndarray
    removable: np.ndarray
    raw_json: list[bytes]

    @classmethod
    def of(cls, summaries: Sequence[ScoreSummary]) -> _Rows:
        dense = InMemoryCurves.from_summaries(summaries)
        return cls(
            quantised=np.rint(dense.curves * QUANTUM).astype(np.uint16),
            totals=dense.totals.astype(np.float64),
            removable=np.rint(dense.removable * QUANTUM).astype(np.uint16),
            raw_json=[s.model_dump_json(exclude_defaults=False).encode() for s in summaries],
        )


@dataclass
class StoredCurves:
    """``RequestCurves`` over a snapshot of stored segments (see the module docstring)."""

    client: redis.Redis
    segments: list[tuple[str, int]]  # (segment key base, requests in it at snapshot time)
    sums: np.ndarray  # [NUM_EDGES] int64, Σ quantised fractions over all snapshot requests
    removable_sum: int
    _totals: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_requests(self) -> int:
        return sum(n for _, n in self.segments)

    def mean_curve(self) -> np.ndarray:
        return self.sums / (QUANTUM * max(self.num_requests, 1))

    def mean_removable(self) -> float:
        return self.removable_sum / (QUANTUM * max(self.num_requests, 1))

    def ratios_at(self, edge: int) -> np.ndarray:
        raw = self._read([f"{base}:col:{edge}" for base, _ in self.segments], np.uint16)
        return raw.astype(np.float64) / QUANTUM

    def total_entries(self) -> np.ndarray:
        if self._totals is None:
            self._totals = self._read([f"{base}:totals" for base, _ in self.segments], np.float64)
        return self._totals

    def _read(self, keys: list[str], dtype: type) -> np.ndarray:
        try:
            blobs = self.client.pipeline(transaction=False)
            for key in keys:
                blobs.get(key)
            values = blobs.execute()
        except redis.RedisError as error:
            raise unavailable(error) from error
        parts = []
        for blob, (base, n) in zip(values, self.segments):
            column = np.frombuffer(blob or b"", dtype=dtype)[:n]  # later appends are past n: ignored
            if len(column) < n:
                raise StoreUnavailableError(f"segment {base} was dropped during the read; retry the request")
            parts.append(column)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _redis_now_ms(client) -> int:
    """Redis's clock in ms (a client, or a pipeline watching): keys expire by it, whichever process writes."""
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def _stored_int(value: bytes | None, key: str) -> int:
    """An integer read back from ``key`` (absent = 0). Anything else is foreign or corrupt data under the prefix:
    refused with the key named, as ``SampleStore._check_types`` does; skipping it would silently bias a fit."""
    try:
        return int(value or 0)
    except ValueError:
        raise StoreUnavailableError(
            f"key {key} holds {value!r} where an integer is expected (foreign or corrupt data); nothing was written"
        ) from None


class SampleStore:
    """Ingest summaries and serve fit data, in Redis under ``prefix``.

    ``limits``: the retention this store applies (the service's settings). Without them the store follows the limits
    the service published under ``P:limits`` (``publish_limits``; re-read every ``LIMITS_REFRESH_S``), and the
    defaults until there are any: a KVzap server's sampler stores its summaries under the service's retention.
    """

    def __init__(self, client: redis.Redis, prefix: str = "kvzap:", limits: StoreLimits | None = None) -> None:
        self.limits = limits or StoreLimits()
        self.follows_published_limits = limits is None
        self._limits_read_at: float | None = None
        self.client = client
        self.keys = _Keys(prefix)
        self._remove_dead_series = client.register_script(_REMOVE_DEAD_SERIES)
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def _turn_of(self, series: Iterable[SeriesKey]) -> ExitStack:
        """Holds the locks of these series' stripes, taken in one order (no deadlock between batches)."""
        held = ExitStack()
        for stripe in sorted({hash(s) % _LOCK_STRIPES for s in series}):
            held.enter_context(self._stripes[stripe])
        return held

    def publish_limits(self) -> None:
        """Write this store's limits where the stores without their own read them. Raises StoreUnavailableError."""
        try:
            self.client.hset(self.keys.limits(), mapping=asdict(self.limits))
        except redis.RedisError as error:
            raise unavailable(error) from error

    def _refresh_limits(self) -> None:
        """Follow the published limits (a store made without limits); Redis errors propagate to the caller."""
        now = time.monotonic()
        if not self.follows_published_limits or (
            self._limits_read_at is not None and now - self._limits_read_at < LIMITS_REFRESH_S
        ):
            return
        key = self.keys.limits()
        published = self.client.hgetall(key)
        self._limits_read_at = now
        if not published:
            return
        try:
            self.limits = StoreLimits(**{name.decode(): int(value) for name, value in published.items()})
        except (TypeError, ValueError, UnicodeDecodeError) as error:  # foreign or corrupt: keep the last good ones
            log.warning("ignoring the unreadable store limits under %s: %s", key, error)

    # ---- writes -------------------------------------------------------------------------------------------
    def ingest(self, summaries: Iterable[ScoreSummary]) -> int:
        """Store a batch atomically, once; returns how many summaries were stored. Raises StoreUnavailableError
        (nothing was written) or StoreOutcomeUnknownError (an EXEC went out and its outcome could not be learnt)."""
        groups: dict[SeriesKey, list[ScoreSummary]] = defaultdict(list)
        for summary in summaries:
            groups[SeriesKey(summary.model, summary.task, summary.tenant)].append(summary)
        rows = {series: _Rows.of(items) for series, items in groups.items()}
        stored = sum(len(items) for items in groups.values())
        marker = self.keys.batch(uuid.uuid4().hex)
        exec_unanswered = False  # an EXEC went out and neither its reply nor the marker told whether it ran
        try:
            self._refresh_limits()
            with self._turn_of(rows), self.client.pipeline(transaction=True) as pipe:
                for attempt in range(_MAX_WATCH_RETRIES):
                    if attempt:
                        time.sleep(_watch_backoff_s(attempt - 1))
                    try:
                        pipe.watch(marker)  # an EXEC of an earlier attempt landing from now on aborts this one
                        if pipe.exists(marker):
                            return stored  # an earlier attempt's EXEC ran; its reply was lost
                        exec_unanswered = False
                        self._queue_batch(pipe, rows, marker)
                        exec_unanswered = True
                        pipe.execute()
                        return stored
                    except redis.WatchError:
                        # A conflict, or (redis-py reports both alike) a connection dropped while watching, maybe
                        # after Redis ran the EXEC: the next attempt reads the marker first.
                        continue
            if self.client.exists(marker):  # the last attempt's reply may have been the one lost
                return stored
            raise StoreBusyError(f"other writers of the same series conflicted with all {_MAX_WATCH_RETRIES} attempts "
                                 "to store this batch; nothing was written, retry it later")
        except redis.RedisError as error:
            if exec_unanswered:
                raise StoreOutcomeUnknownError(
                    f"Redis became unavailable after the batch was sent ({type(error).__name__}: {error}); it may "
                    "have been stored, and sending it again may store it twice"
                ) from error
            raise unavailable(error) from error

    def _queue_batch(self, pipe: redis.client.Pipeline, rows: dict[SeriesKey, _Rows], marker: str) -> None:
        """Reads what the writes depend on under WATCH, then queues the batch and its marker in MULTI."""
        now_ms = _redis_now_ms(pipe)
        plans = {}
        for series in rows:  # immediate-mode reads under WATCH
            pipe.watch(self.keys.segs(series), self.keys.meta(series), self.keys.raw(series))
            self._check_types(pipe, series)
            plans[series] = self._read_segments(pipe, series)
        pipe.multi()
        for series, data in rows.items():
            self._write_series(pipe, series, data, now_ms, *plans[series])
        pipe.set(marker, 1, ex=BATCH_MARKER_TTL_S)

    def _read_segments(self, pipe: redis.client.Pipeline, series: SeriesKey) -> tuple[list[_Segment], int]:
        """The series' listed segments, oldest first, and the next segment id (under WATCH)."""
        segs, meta = self.keys.segs(series), self.keys.meta(series)
        fields = pipe.hgetall(meta)
        segments = []
        for raw_id in pipe.lrange(segs, 0, -1):
            sid = _stored_int(raw_id, segs)
            n, expires = fields.get(f"n:{sid}".encode()), fields.get(f"expires:{sid}".encode())
            if expires is None:  # stored before segments recorded their expiry: read its size; it takes no requests
                seg_sum = f"{self.keys.seg(series, sid)}:sum"
                pipe.watch(seg_sum)
                segments.append(_Segment(sid, _stored_int(pipe.hget(seg_sum, "n"), seg_sum), None))
            else:
                segments.append(_Segment(sid, _stored_int(n, meta), _stored_int(expires, meta)))
        return segments, _stored_int(fields.get(b"next_sid"), meta)

    def _check_types(self, pipe: redis.client.Pipeline, series: SeriesKey) -> None:
        """Redis has no rollback: a command failing inside EXEC (WRONGTYPE) would leave the others applied, so
        foreign data under our keys is refused before MULTI."""
        for key, expected in ((self.keys.raw(series), b"stream"), (self.keys.segs(series), b"list"),
                              (self.keys.meta(series), b"hash")):
            found = pipe.type(key)
            if found not in (b"none", expected):
                raise StoreUnavailableError(
                    f"key {key} holds a {found.decode()}, expected a {expected.decode()}; nothing was written"
                )

    def _write_series(
        self, pipe: redis.client.Pipeline, series: SeriesKey, data: _Rows, now_ms: int, listed: list[_Segment],
        next_sid: int,
    ) -> None:
        limits = self.limits
        segs, meta = self.keys.segs(series), self.keys.meta(series)
        live = []
        for seg in listed:
            if seg.alive(now_ms):
                live.append(seg)
            else:  # expired (its keys are gone): off the list
                self._drop(pipe, series, seg.sid)
        for seg in live:  # written under longer limits: kept no longer than a sample written now
            if seg.expires is not None and seg.expires > now_ms + limits.max_age_ms:
                seg.expires = now_ms + limits.max_age_ms
                for key in self.keys.seg_keys(series, seg.sid):
                    pipe.pexpireat(key, seg.expires)
                pipe.hset(meta, f"expires:{seg.sid}", seg.expires)
        start = 0
        while start < len(data.totals):
            if not live or not live[-1].open(now_ms, limits):
                live.append(_Segment(next_sid, 0, now_ms + limits.max_age_ms))
                pipe.unlink(*self.keys.seg_keys(series, next_sid))  # never append to keys an expired index left
                pipe.rpush(segs, next_sid)
                pipe.hset(meta, f"expires:{next_sid}", live[-1].expires)
                next_sid += 1
            seg = live[-1]
            stop = min(len(data.totals), start + limits.segment_size - seg.n)
            self._append(pipe, self.keys.seg(series, seg.sid), data, slice(start, stop), seg.expires)
            pipe.hincrby(meta, f"n:{seg.sid}", stop - start)
            seg.n += stop - start
            start = stop
        while sum(seg.n for seg in live) > limits.max_requests:  # retention by count: drop the oldest whole segment
            self._drop(pipe, series, live.pop(0).sid)
        pipe.hset(meta, "next_sid", next_sid)
        # The index outlives every segment it lists (those written under longer limits too).
        index_expires = max([now_ms + limits.max_age_ms] + [seg.expires for seg in live if seg.expires is not None])
        for key in (segs, meta):
            pipe.pexpireat(key, index_expires)
        if limits.raw_max > 0:
            raw = self.keys.raw(series)
            for entry in data.raw_json:
                pipe.xadd(raw, {"s": entry}, maxlen=limits.raw_max, approximate=True)
            # Ids are Redis ms times; a negative MINID would fail inside EXEC, after the rest was applied.
            pipe.xtrim(raw, minid=max(0, now_ms - limits.retention_s * 1000), approximate=False)
            pipe.pexpire(raw, limits.max_age_ms)
        pipe.sadd(self.keys.series_set(), series.encode())

    def _drop(self, pipe: redis.client.Pipeline, series: SeriesKey, sid: int) -> None:
        pipe.lrem(self.keys.segs(series), 1, sid)
        pipe.hdel(self.keys.meta(series), f"n:{sid}", f"expires:{sid}")
        pipe.unlink(*self.keys.seg_keys(series, sid))

    def _append(self, pipe: redis.client.Pipeline, base: str, data: _Rows, rows: slice, expire_at_ms: int) -> None:
        columns = np.ascontiguousarray(data.quantised[rows].T)  # [NUM_EDGES, rows]
        sums = columns.sum(axis=1, dtype=np.int64)
        for k in range(NUM_EDGES):
            key = f"{base}:col:{k}"
            pipe.append(key, columns[k].tobytes())
            pipe.pexpireat(key, expire_at_ms)
        for k in range(NUM_EDGES):
            pipe.hincrby(f"{base}:sum", str(k), int(sums[k]))
        pipe.hincrby(f"{base}:sum", "n", rows.stop - rows.start)
        pipe.hincrby(f"{base}:sum", "removable", int(data.removable[rows].sum(dtype=np.int64)))
        pipe.pexpireat(f"{base}:sum", expire_at_ms)
        pipe.append(f"{base}:totals", data.totals[rows].tobytes())
        pipe.pexpireat(f"{base}:totals", expire_at_ms)

    # ---- reads --------------------------------------------------------------------------------------------
    def series(self) -> list[SeriesKey]:
        """Every series that has stored samples (expired ones are pruned from the index lazily)."""
        try:
            members = self.client.smembers(self.keys.series_set())
            series = sorted(decode_members(members, self.keys.series_set()), key=SeriesKey.sort_key)
            alive = self._alive(series)
        except redis.RedisError as error:
            raise unavailable(error) from error
        dead = [s for s, ok in zip(series, alive) if not ok]
        if dead:
            try:  # checked again inside the script: an ingest may have revived a series since _alive
                self._remove_dead_series(keys=[self.keys.series_set(), *(self.keys.segs(s) for s in dead)],
                                         args=[s.encode() for s in dead])
            except redis.RedisError:
                pass  # lazy clean-up only; the read result is already correct
        return [s for s, ok in zip(series, alive) if ok]

    def _alive(self, series: list[SeriesKey]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for s in series:
            pipe.exists(self.keys.segs(s))
        return [bool(x) for x in pipe.execute()]

    def models(self) -> set[str]:
        return {s.model for s in self.series()}

    def curves(self, model: str, task: str, tenant: str | None = None) -> StoredCurves:
        """Fit data of (model, task, tenant); ``tenant=None`` pools every tenant's samples of (model, task)."""
        wanted = [s for s in self.series() if s.model == model and s.task == task and (tenant is None or s.tenant == tenant)]
        try:
            listing = self.client.pipeline(transaction=False)
            for s in wanted:
                listing.lrange(self.keys.segs(s), 0, -1)
            bases = [self.keys.seg(s, _stored_int(sid, self.keys.segs(s)))
                     for s, ids in zip(wanted, listing.execute()) for sid in ids]
            snapshot = self.client.pipeline(transaction=True)  # one MULTI: sums of all segments at one instant
            for base in bases:
                snapshot.hgetall(f"{base}:sum")
            sums_per_segment = snapshot.execute()
        except redis.RedisError as error:
            raise unavailable(error) from error
        sums = np.zeros(NUM_EDGES, dtype=np.int64)
        segments, removable = [], 0
        for base, fields in zip(bases, sums_per_segment):
            n = _stored_int(fields.get(b"n"), f"{base}:sum")
            if n == 0:
                continue  # expired segment still listed
            sums += np.array([_stored_int(fields.get(str(k).encode()), f"{base}:sum") for k in range(NUM_EDGES)],
                             dtype=np.int64)
            removable += _stored_int(fields.get(b"removable"), f"{base}:sum")
            segments.append((base, n))
        return StoredCurves(self.client, segments, sums, removable)

    def raw(self, series: SeriesKey, count: int = 100) -> list[ScoreSummary]:
        """The most recent ``count`` raw summaries of a series within its retention, newest first (the stream is
        trimmed when its series is written, so older entries may still be stored)."""
        try:
            oldest = _redis_now_ms(self.client) - self.limits.retention_s * 1000
            entries = self.client.xrevrange(self.keys.raw(series), min=str(max(0, oldest)), count=count)
        except redis.RedisError as error:
            raise unavailable(error) from error
        return [ScoreSummary.model_validate_json(fields[b"s"]) for _, fields in entries]
