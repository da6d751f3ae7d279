"""The Redis layout gives the same fit as the in-memory curves, stays bounded and writes all-or-nothing."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import fields

import numpy as np
import pytest
import redis
from redis.client import Pipeline
from redis.connection import AbstractConnection

from calibrator import InMemoryCurves, StoreBusyError, StoreUnavailableError, fit_threshold, summarize
from calibrator import sample_store
from calibrator.sample_store import (
    BATCH_MARKER_TTL_S,
    MAX_RETENTION_S,
    MIN_SEGMENTS_PER_BOUND,
    SampleStore,
    StoreLimits,
)
from calibrator.series import SeriesKey, connect


def _summaries(n, mu=-6.0, tenant=None, task="t", seed=0):
    rng = np.random.default_rng(seed)
    return [
        summarize(rng.normal(mu, 2.0, size=(3, 2, 400)).astype(np.float32), 32, model="m", task=task, tenant=tenant)
        for _ in range(n)
    ]


def test_stored_fit_matches_in_memory_fit(redis_client, prefix):
    store = SampleStore(redis_client, prefix, StoreLimits(segment_size=16))
    summaries = _summaries(50)
    store.ingest(summaries[:20])
    store.ingest(summaries[20:])
    stored = store.curves("m", "t")
    memory = InMemoryCurves.from_summaries(summaries)
    assert stored.num_requests == 50 and [n for _, n in stored.segments] == [16, 16, 16, 2]
    np.testing.assert_allclose(stored.mean_curve(), memory.mean_curve(), atol=1 / 65535)
    np.testing.assert_allclose(stored.ratios_at(300), memory.ratios_at(300), atol=0.5 / 65535)
    np.testing.assert_array_equal(stored.total_entries(), memory.total_entries())
    a = fit_threshold(stored, 0.6, bootstrap_resamples=100)
    b = fit_threshold(memory, 0.6, bootstrap_resamples=100)
    assert a.tau == b.tau and a.n_requests == b.n_requests == 50
    assert a.predicted_removed_fraction == pytest.approx(b.predicted_removed_fraction, abs=1e-5)
    assert store.raw(SeriesKey("m", "t"), count=3) == summaries[-1:-4:-1]


def test_series_are_separated_and_pooled_per_tenant(redis_client, prefix):
    store = SampleStore(redis_client, prefix)
    store.ingest(_summaries(5, tenant="acme") + _summaries(7, tenant="beta", mu=-4) + _summaries(3, task="code"))
    assert store.curves("m", "t", "acme").num_requests == 5
    assert store.curves("m", "t", "beta").num_requests == 7
    assert store.curves("m", "t").num_requests == 12  # no tenant: every tenant of (model, task)
    assert store.curves("m", "code").num_requests == 3
    assert store.curves("other", "t").num_requests == 0
    assert store.models() == {"m"}
    assert {str(s) for s in store.series()} == {"m/t (tenant acme)", "m/t (tenant beta)", "m/code"}


def test_oldest_segments_are_dropped_and_raw_stream_capped(redis_client, prefix):
    store = SampleStore(redis_client, prefix, StoreLimits(max_requests=20, segment_size=5, raw_max=15))
    for seed in range(5):
        store.ingest(_summaries(10, seed=seed))
    curves = store.curves("m", "t")
    assert curves.num_requests == 20
    assert [base.rsplit(":", 1)[1] for base, _ in curves.segments] == ["6", "7", "8", "9"]
    assert not redis_client.exists(f"{prefix}seg:m:t:*:0:sum", f"{prefix}seg:m:t:*:0:col:5")
    assert redis_client.xlen(f"{prefix}raw:m:t:*") <= 15 + 100  # MAXLEN ~ trims by whole stream nodes
    assert 0 < redis_client.pttl(f"{prefix}seg:m:t:*:9:col:7") <= StoreLimits().max_age_ms


def test_retention_expires_samples(redis_client, prefix):
    store = SampleStore(redis_client, prefix, StoreLimits(retention_s=1))
    store.ingest(_summaries(3))
    assert store.curves("m", "t").num_requests == 3
    time.sleep(1.3)
    assert store.curves("m", "t").num_requests == 0
    assert store.series() == []


def test_a_slowly_written_series_still_forgets_samples_older_than_its_retention(redis_client, prefix):
    """Each append refreshed the TTL of the segment it went to, so a series written less often than its retention
    kept its first samples for as long as it was written at all. A segment now takes requests for retention_s / 8
    and then expires whole: a sample lives between retention_s and 1.125 × retention_s (2 s to 2.25 s here)."""
    store = SampleStore(redis_client, prefix, StoreLimits(retention_s=2))
    start = time.monotonic()
    store.ingest(_summaries(3, seed=1))
    time.sleep(1.0)
    store.ingest(_summaries(2, seed=2))  # the first segment stopped taking requests 0.25 s after it opened
    assert store.curves("m", "t").num_requests == 5
    time.sleep(2.6 - (time.monotonic() - start))
    assert store.curves("m", "t").num_requests == 2, "the samples written 2.6 s ago are past their retention"
    store.ingest(_summaries(1, seed=3))  # the raw stream is trimmed to the retention by its entries' times
    assert len(store.raw(SeriesKey("m", "t"))) == 3
    assert store.curves("m", "t").num_requests == 3 and time.monotonic() - start < 2.9  # (1 s + 2 s: still kept)


def test_the_count_bound_counts_requests_when_segments_close_by_age(redis_client, prefix):
    """Segments closed by age hold fewer than segment_size requests: the bound drops the oldest whole segment only
    while the series holds more than max_requests (five segments of 3 are kept though five of 4 would not be)."""
    store = SampleStore(redis_client, prefix, StoreLimits(max_requests=16, segment_size=4, retention_s=3))
    for seed in range(5):  # five segments of 3 (each opened after the last stopped taking requests, 0.375 s)
        store.ingest(_summaries(3, seed=seed))
        time.sleep(0.45)
    assert store.curves("m", "t").num_requests == 15
    store.ingest(_summaries(3, seed=5))  # a sixth segment: 18 > 16, the oldest segment goes
    curves = store.curves("m", "t")
    assert curves.num_requests == 15
    assert [base.rsplit(":", 1)[1] for base, _ in curves.segments] == ["1", "2", "3", "4", "5"]
    meta = redis_client.hgetall(store.keys.meta(SeriesKey("m", "t")))
    assert b"n:0" not in meta and meta[b"n:5"] == b"3"


def test_a_shorter_retention_reaches_the_samples_stored_under_the_longer_one(redis_client, prefix):
    """The service restarted with a shorter retention, or a server's sampler wrote under the defaults before it read
    the published limits: the next write brings the older segments' expiry within the new bound, and the index
    keys outlive every segment they list (an index that expired first let a new segment 0 append to the old one's
    keys, so samples past the retention came back into the fit)."""
    long = SampleStore(redis_client, prefix, StoreLimits(retention_s=30))
    short = SampleStore(redis_client, prefix, StoreLimits(retention_s=1))
    series = SeriesKey("m", "t")
    start = time.monotonic()
    long.ingest(_summaries(3, seed=1))
    time.sleep(0.3)
    short.ingest(_summaries(2, seed=2))
    assert 0 < redis_client.pttl(f"{prefix}seg:m:t:*:0:sum") <= short.limits.max_age_ms
    time.sleep(1.8 - (time.monotonic() - start))  # every sample so far is past the 1.125 s bound
    short.ingest(_summaries(2, seed=3))
    assert short.curves("m", "t").num_requests == 2 and redis_client.pttl(short.keys.segs(series)) > 0
    assert len(short.raw(series)) == 2


def test_segments_stored_before_they_recorded_their_age_are_kept_and_closed(redis_client, prefix):
    """Data written by an earlier version (no ``n:``/``expires:`` fields): still counted, takes no new requests."""
    store = SampleStore(redis_client, prefix, StoreLimits(max_requests=12, segment_size=3))
    store.ingest(_summaries(2, seed=1))
    meta = store.keys.meta(SeriesKey("m", "t"))
    redis_client.hdel(meta, "n:0", "expires:0")  # as the earlier layout left it
    store.ingest(_summaries(1, seed=2))  # not into the old segment, though it has room
    curves = store.curves("m", "t")
    assert curves.num_requests == 3 and [base.rsplit(":", 1)[1] for base, _ in curves.segments] == ["0", "1"]
    store.ingest(_summaries(10, seed=3))  # 13 > 12: the old segment is the oldest and goes
    assert store.curves("m", "t").num_requests == 11 and not redis_client.exists(f"{prefix}seg:m:t:*:0:sum")


def test_redis_down_raises_a_typed_error(closed_port_url):
    store = SampleStore(connect(closed_port_url, timeout_s=0.5), "x:")
    with pytest.raises(StoreUnavailableError, match="Redis is unavailable"):
        store.ingest(_summaries(1))
    with pytest.raises(StoreUnavailableError):
        store.curves("m", "t")


def test_a_failing_batch_writes_nothing(redis_client, prefix):
    """Foreign data under one of the batch's keys (a real WRONGTYPE situation) refuses the whole batch."""
    store = SampleStore(redis_client, prefix)
    store.ingest(_summaries(2, task="good"))
    redis_client.set(f"{prefix}raw:m:bad:*", "not a stream")
    with pytest.raises(StoreUnavailableError, match="holds a string, expected a stream; nothing was written"):
        store.ingest(_summaries(2, task="good", seed=1) + _summaries(2, task="bad"))
    assert store.curves("m", "good").num_requests == 2
    assert not redis_client.exists(f"{prefix}segs:m:bad:*")


def test_foreign_data_under_the_prefix_is_skipped_or_named(redis_client, prefix, caplog):
    store = SampleStore(redis_client, prefix)
    store.ingest(_summaries(3))
    # A member of the series index that no SeriesKey encodes to: skipped with a warning, left in place.
    redis_client.sadd(f"{prefix}series", b"foreign-member")
    with caplog.at_level("WARNING", logger="calibrator.series"):
        assert store.series() == [SeriesKey("m", "t")]
    assert "foreign-member" in caplog.text
    assert redis_client.sismember(f"{prefix}series", b"foreign-member")
    assert store.curves("m", "t").num_requests == 3
    # Fit data that is not ours cannot be skipped without biasing the fit: refused, naming the key.
    segs = f"{prefix}segs:{SeriesKey('m', 't').encode()}"
    redis_client.rpush(segs, b"junk")
    for action in (lambda: store.curves("m", "t"), lambda: store.ingest(_summaries(1))):
        with pytest.raises(StoreUnavailableError, match=rf"key {re.escape(segs)} holds b'junk'"):
            action()
    assert redis_client.lrange(segs, 0, -1) == [b"0", b"junk"]  # nothing written by the refused ingest
    redis_client.rpop(segs)
    redis_client.hset(f"{prefix}seg:{SeriesKey('m', 't').encode()}:0:sum", "7", b"x")
    with pytest.raises(StoreUnavailableError, match=r":0:sum holds b'x'"):
        store.curves("m", "t")


def _lose_the_exec_reply(monkeypatch, then_unreachable=False):
    """Failure injection (the only mock here): Redis runs the first MULTI … EXEC and replies, and the connection
    then drops as if that reply were lost on the way (redis-py, still watching, reports it as a WatchError); with
    ``then_unreachable`` every later connect fails too. Redis, the store and the data are real."""
    real_execute, real_connect = Pipeline._execute_transaction, AbstractConnection.connect
    lost = []

    def execute(self, connection, commands, raise_on_error):
        result = real_execute(self, connection, commands, raise_on_error)
        if lost:
            return result
        lost.append(True)
        self.watching = True  # the state redis-py is in when reading EXEC's reply fails
        raise redis.ConnectionError("connection dropped before EXEC's reply arrived (injected)")

    def connect(self):
        if lost and then_unreachable:
            raise redis.ConnectionError("Redis went away (injected)")
        real_connect(self)

    monkeypatch.setattr(Pipeline, "_execute_transaction", execute)
    monkeypatch.setattr(AbstractConnection, "connect", connect)


def test_a_reply_lost_after_exec_does_not_store_the_batch_twice(redis_client, prefix, monkeypatch):
    store = SampleStore(redis_client, prefix)
    _lose_the_exec_reply(monkeypatch)
    assert store.ingest(_summaries(5)) == 5
    monkeypatch.undo()
    assert store.curves("m", "t").num_requests == 5
    assert redis_client.xlen(f"{prefix}raw:m:t:*") == 5
    markers = list(redis_client.scan_iter(match=f"{prefix}batch:*"))
    assert len(markers) == 1 and 0 < redis_client.ttl(markers[0]) <= BATCH_MARKER_TTL_S


def test_an_unknown_outcome_is_not_reported_as_nothing_written(redis_client, prefix, monkeypatch):
    store = SampleStore(redis_client, prefix)
    _lose_the_exec_reply(monkeypatch, then_unreachable=True)
    with pytest.raises(StoreUnavailableError, match="may have been stored") as caught:
        store.ingest(_summaries(5))
    assert caught.value.code == "store_outcome_unknown" and "nothing was written" not in str(caught.value)
    monkeypatch.undo()
    assert store.curves("m", "t").num_requests == 5  # it was: Redis ran the EXEC whose reply was lost


def test_pruning_a_dead_series_never_drops_one_revived_meanwhile(redis_client, prefix, monkeypatch):
    """Another worker's ingest lands between series()'s liveness check and its clean-up of the index. The wrapper
    around ``_alive`` only forces that interleaving; Redis and both stores are real."""
    store = SampleStore(redis_client, prefix)
    redis_client.sadd(f"{prefix}series", SeriesKey("m", "t").encode())  # listed without data: dead
    real_alive = store._alive

    def alive_then_concurrent_ingest(series):
        alive = real_alive(series)
        SampleStore(redis_client, prefix).ingest(_summaries(3))  # another worker's store
        return alive

    monkeypatch.setattr(store, "_alive", alive_then_concurrent_ingest)
    assert store.series() == []  # dead when it was checked
    monkeypatch.undo()
    assert store.series() == [SeriesKey("m", "t")] and store.curves("m", "t").num_requests == 3


def test_a_segment_over_a_quarter_of_the_series_bound_is_refused(redis_client, prefix):
    """Retention drops whole segments: with segment_size > max_requests a series would hold segment_size, and with
    fewer than MIN_SEGMENTS_PER_BOUND segments per bound a drop would leave it far below the bound."""
    with pytest.raises(ValueError, match="segment_size 10000 is more than 1/4 of max_requests 100"):
        SampleStore(redis_client, prefix, StoreLimits(max_requests=100))
    with pytest.raises(ValueError, match="segment_size 26 is more than 1/4 of max_requests 100"):
        StoreLimits(max_requests=100, segment_size=26)
    SampleStore(redis_client, prefix, StoreLimits(max_requests=100, segment_size=25))


def test_a_store_without_limits_of_its_own_follows_the_published_ones(redis_client, prefix):
    """A KVzap server's sampler builds its store without limits: it must store under the service's retention (it
    used the defaults: a week's TTL and a raw stream, whatever the service was configured with)."""
    service = SampleStore(redis_client, prefix, StoreLimits(max_requests=8, segment_size=2, raw_max=0, retention_s=60))
    sampler = SampleStore(redis_client, prefix)
    sampler.ingest(_summaries(3, seed=1))  # nothing published yet: the defaults
    assert redis_client.ttl(sampler.keys.segs(SeriesKey("m", "t"))) > 60
    service.publish_limits()
    sampler._limits_read_at = None  # as LIMITS_REFRESH_S after the last read
    for seed in range(2, 6):
        sampler.ingest(_summaries(4, seed=seed))
    series = SeriesKey("m", "t")
    assert sampler.limits == service.limits
    assert 0 < redis_client.pttl(sampler.keys.segs(series)) <= service.limits.max_age_ms == 67_500
    assert 6 < sampler.curves("m", "t").num_requests <= 8  # whole 2-request segments beyond the bound are dropped


def test_unreadable_published_limits_are_ignored(redis_client, prefix):
    sampler = SampleStore(redis_client, prefix)
    redis_client.hset(f"{prefix}limits", mapping={"max_requests": "many", "segment_size": 5})
    assert sampler.ingest(_summaries(2)) == 2
    assert sampler.limits == StoreLimits()
    redis_client.hset(f"{prefix}limits", mapping={"max_requests": 4, "segment_size": 5})  # segment > bound
    sampler._limits_read_at = None
    assert sampler.ingest(_summaries(2)) == 2 and sampler.limits == StoreLimits()


def test_limits_published_under_the_older_rules_are_ignored(redis_client, prefix, caplog):
    """A service of an earlier version published a bound of fewer than MIN_SEGMENTS_PER_BOUND segments or a
    retention past MAX_RETENTION_S: a sampler keeps its last good limits (with a warning) and goes on storing."""
    sampler = SampleStore(redis_client, prefix)
    for published in ({"max_requests": 10, "segment_size": 5}, {"retention_s": 9_999_999_999}):
        redis_client.delete(f"{prefix}limits")
        redis_client.hset(f"{prefix}limits", mapping=published)
        sampler._limits_read_at = None
        with caplog.at_level("WARNING", logger="calibrator.sample_store"):
            assert sampler.ingest(_summaries(2)) == 2
        assert sampler.limits == StoreLimits() and "ignoring the unreadable store limits" in caplog.text
        caplog.clear()


def test_a_series_over_its_bound_keeps_all_but_one_segment_of_it(redis_client, prefix):
    """Retention drops whole segments: with one segment per bound (accepted before) a series cycled between
    max_requests and 1 request, and a calibration right after a drop saw too few samples. The bound now spans at
    least MIN_SEGMENTS_PER_BOUND segments, so a series past it keeps more than max_requests - segment_size."""
    with pytest.raises(ValueError, match="segment_size 1000 is more than 1/4 of max_requests 1000"):
        StoreLimits(max_requests=1000, segment_size=1000)
    limits = StoreLimits(max_requests=40, segment_size=40 // MIN_SEGMENTS_PER_BOUND)
    store = SampleStore(redis_client, prefix, limits)
    sent = 0
    for seed, n in enumerate([25, 15, 1, 9, 13, 7, 30, 1, 10]):
        store.ingest(_summaries(n, seed=seed))
        sent += n
        held = store.curves("m", "t").num_requests
        if sent <= limits.max_requests:
            assert held == sent
        else:
            assert limits.max_requests - limits.segment_size < held <= limits.max_requests, (sent, held)


def test_a_retention_over_ten_years_is_refused():
    """A larger one ("keep for ever") reached back before 1970: the raw stream's trim failed inside EXEC after the
    rest of the batch was applied (stored, yet answered store_outcome_unknown: a retry stored it twice)."""
    assert MAX_RETENTION_S == 10 * 365 * 24 * 3600
    StoreLimits(retention_s=MAX_RETENTION_S)
    with pytest.raises(ValueError, match=f"retention_s 9999999999 is longer than the longest accepted, "
                                         f"{MAX_RETENTION_S}"):
        StoreLimits(retention_s=9_999_999_999)


def test_the_raw_stream_trim_never_reaches_before_1970(redis_client, prefix):
    """The trim's MINID is clamped at 0. The cap on retention_s keeps it positive, so these limits are built past
    their validation (as an earlier version's store held them) to reach the clamp; Redis and the store are real."""
    huge = object.__new__(StoreLimits)
    for field in fields(StoreLimits):
        object.__setattr__(huge, field.name, getattr(StoreLimits(), field.name))
    object.__setattr__(huge, "retention_s", 9_999_999_999)
    store = SampleStore(redis_client, prefix, huge)
    assert huge.retention_s * 1000 > redis_client.time()[0] * 1000  # the unclamped MINID would be negative
    assert store.ingest(_summaries(3)) == 3 and store.ingest(_summaries(2, seed=1)) == 2
    assert store.curves("m", "t").num_requests == 5 and redis_client.xlen(store.keys.raw(SeriesKey("m", "t"))) == 5


def test_writers_of_one_series_all_get_their_batches_stored(redis_client, prefix):
    """Eight threads write small batches to one series at once (real Redis, real threads, as the service's request
    threads do): they take turns within the process. Racing each other under WATCH, some ran out of attempts (503)."""
    store = SampleStore(redis_client, prefix, StoreLimits(segment_size=50))
    batch = _summaries(4)
    failures = []

    def write():
        for _ in range(40):
            try:
                store.ingest(batch)
            except StoreUnavailableError as error:
                failures.append(error)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert store.curves("m", "t").num_requests == 8 * 40 * len(batch)


def _conflict_on_every_attempt(monkeypatch, store, times):
    """Failure injection: the first ``times`` attempts of ``store``'s ingests see another writer's real ingest of
    one request into the same series land between their reads under WATCH and their EXEC (a genuine WATCH
    conflict). Returns the pauses ``time.sleep`` was asked for, which it still takes."""
    real_queue, real_sleep = store._queue_batch, time.sleep
    other, injected, pauses = SampleStore(store.client, store.keys.prefix, store.limits), [], []

    def queue_then_conflict(pipe, rows, marker):
        real_queue(pipe, rows, marker)
        if len(injected) < times:
            injected.append(other.ingest(_summaries(1, seed=99)))

    def sleep(seconds):
        pauses.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(store, "_queue_batch", queue_then_conflict)
    monkeypatch.setattr(sample_store.time, "sleep", sleep)
    return pauses


def test_a_conflicting_ingest_retries_after_a_growing_jittered_pause(redis_client, prefix, monkeypatch):
    store = SampleStore(redis_client, prefix)
    pauses = _conflict_on_every_attempt(monkeypatch, store, times=8)
    assert store.ingest(_summaries(5)) == 5
    monkeypatch.undo()
    assert store.curves("m", "t").num_requests == 8 + 5
    assert len(pauses) == 8 and all(0 <= p <= min(0.05, 0.001 * 2**retry) for retry, p in enumerate(pauses))


def test_an_ingest_that_always_conflicts_is_busy_not_unavailable(redis_client, prefix, monkeypatch):
    """Redis is up and the batch lost every race: StoreBusyError (store_busy, 503 with Retry-After in the service),
    nothing written, after pauses that stay under a second in all."""
    store = SampleStore(redis_client, prefix)
    pauses = _conflict_on_every_attempt(monkeypatch, store, times=1000)
    with pytest.raises(StoreBusyError, match="nothing was written") as caught:
        store.ingest(_summaries(5))
    monkeypatch.undo()
    assert caught.value.code == "store_busy" and isinstance(caught.value, StoreUnavailableError)
    attempts = sample_store._MAX_WATCH_RETRIES
    assert store.curves("m", "t").num_requests == attempts  # only the other writer's requests
    assert len(pauses) == attempts - 1 and sum(pauses) < 0.75
