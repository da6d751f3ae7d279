"""Plugin-side pieces against the real Redis, including Redis going away (a closed port, not a mock)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis

from calibrator import StoreOutcomeUnknownError, StoreUnavailableError, ThresholdNotFoundError, summarize
from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey, connect
from calibrator.sink import SampleSink
from calibrator.threshold_store import ThresholdRecord, ThresholdStore
from calibrator.watcher import ThresholdWatcher


def _summary(i: int):
    scores = np.random.default_rng(i).normal(-6, 2, size=(2, 2, 64)).astype(np.float32)
    return summarize(scores, 16, model="m", task="t", tenant="acme")


def test_sink_ships_batches_to_redis(redis_client, prefix):
    store = SampleStore(redis_client, prefix)
    sink = SampleSink(store.ingest, batch_size=8, flush_interval_s=0.05)
    assert all(sink.offer(_summary(i)) for i in range(30))
    assert sink.flush(10.0)
    sink.close()
    assert sink.counters.sent == 30 and sink.counters.dropped_full == sink.counters.dropped_send_error == 0
    assert store.curves("m", "t", "acme").num_requests == 30


def _held_transport():
    """A real slow consumer: holds the sender thread until ``release`` is set; ``sent`` collects what it got."""
    release, sent = threading.Event(), []

    def transport(batch):
        release.wait(10)
        sent.extend(batch)

    return transport, release, sent


def test_sink_never_blocks_and_counts_drops():
    slow_transport, release, sent = _held_transport()
    sink = SampleSink(slow_transport, max_queue=4, batch_size=1, flush_interval_s=0.01)
    start = time.perf_counter()
    accepted = [sink.offer(_summary(i)) for i in range(50)]
    assert time.perf_counter() - start < 0.5  # offer returns at once even though the consumer is stuck
    assert sum(accepted) <= 5 and sink.counters.dropped_full == 50 - sum(accepted)
    release.set()
    assert sink.flush(10.0)
    sink.close()
    assert len(sent) == sum(accepted) == sink.counters.sent


def test_closing_counts_what_was_still_queued():
    """close() gives up after its timeout: the summaries still queued are dropped and counted (they vanished from
    the counters before), the batch being sent is counted when its send ends, and a later offer is counted too."""
    stuck_transport, release, sent = _held_transport()
    sink = SampleSink(stuck_transport, max_queue=16, batch_size=1, flush_interval_s=0.01)
    assert all(sink.offer(_summary(i)) for i in range(5))
    time.sleep(0.2)  # the thread has taken the first summary and is stuck sending it
    sink.close(timeout_s=0.2)
    assert sink.counters.dropped_closed == 4 and not sink.offer(_summary(5))
    release.set()
    assert sink.flush(10.0)  # the stuck send ends; nothing else is pending
    counters = sink.counters
    assert len(sent) == counters.sent == 1 and counters.dropped_closed == 5
    dropped = counters.dropped_full + counters.dropped_send_error + counters.dropped_closed
    assert counters.offered == counters.sent + dropped


def test_close_racing_an_offer_leaves_nothing_uncounted(monkeypatch):
    """close() running while an offer() is between its stop check and its put: the summary is sent or counted as
    dropped, never left in the queue uncounted. The wrapper around the stop check injects that interleaving: it
    starts close() in another thread and gives it up to 1 s to finish before offer() goes on to its put."""
    transport, release, sent = _held_transport()
    release.set()  # never holds: it only records what it got
    sink = SampleSink(transport, batch_size=1, flush_interval_s=0.01)
    offering_thread, closers = threading.get_ident(), []
    is_set = sink._stop.is_set

    def is_set_then_close():
        stopped = is_set()
        if threading.get_ident() == offering_thread and not closers:  # the sender thread checks it too
            closers.append(threading.Thread(target=sink.close))
            closers[0].start()
            closers[0].join(timeout=1.0)  # the fixed sink holds close() off until offer() is done
        return stopped

    monkeypatch.setattr(sink._stop, "is_set", is_set_then_close)
    sink.offer(_summary(0))
    assert closers
    closers[0].join(10.0)
    assert not closers[0].is_alive()
    counters = sink.counters
    dropped = counters.dropped_full + counters.dropped_send_error + counters.dropped_closed
    assert counters.offered == counters.sent + dropped == 1 and len(sent) == counters.sent
    assert sink._queue.empty()


def test_sink_drops_with_a_counter_when_redis_is_down(closed_port_url):
    store = SampleStore(connect(closed_port_url, timeout_s=0.2), "x:")
    sink = SampleSink(store.ingest, batch_size=4, flush_interval_s=0.01)
    for i in range(10):
        sink.offer(_summary(i))
    assert sink.flush(10.0)
    sink.close()
    assert sink.counters.sent == 0 and sink.counters.dropped_send_error == 10


def test_sampling_decision_is_deterministic_and_proportional():
    sink = SampleSink(lambda batch: None, sample_fraction=0.25)
    decisions = [sink.wants(f"req-{i}") for i in range(4000)]
    sink.close()
    assert decisions == [sink.wants(f"req-{i}") for i in range(4000)]
    assert 0.22 < np.mean(decisions) < 0.28


def test_watcher_follows_updates_and_prefers_the_tenant_entry(redis_client, prefix):
    thresholds = ThresholdStore(redis_client, prefix)
    changes = []
    watcher = ThresholdWatcher(thresholds, "m", "t", "acme", default_tau=-5.0, poll_interval_s=0.02,
                               on_change=lambda tau, record: changes.append(tau))
    assert watcher.refresh() is False and watcher.tau == -5.0  # nothing stored yet: the default stays
    thresholds.put(ThresholdRecord(model="m", task="t", tau=-7.0, source="manual"))
    watcher.start()
    try:
        _wait(lambda: watcher.tau == -7.0)
        thresholds.put(ThresholdRecord(model="m", task="t", tenant="acme", tau=-6.5, source="calibrated"))
        _wait(lambda: watcher.tau == -6.5)
        thresholds.put(ThresholdRecord(model="m", task="t", tenant="other", tau=-1.0, source="manual"))
        time.sleep(0.1)
        assert watcher.tau == -6.5
    finally:
        watcher.stop()
    assert changes == [-7.0, -6.5]
    assert watcher.record.series == SeriesKey("m", "t", "acme")


def test_watcher_keeps_the_last_tau_when_redis_goes_away(redis_client, prefix, closed_port_url):
    thresholds = ThresholdStore(redis_client, prefix)
    thresholds.put(ThresholdRecord(model="m", task="t", tau=-4.25, source="manual"))
    watcher = ThresholdWatcher(thresholds, "m", "t")
    assert watcher.refresh() is True and watcher.tau == -4.25
    watcher.store = ThresholdStore(connect(closed_port_url, timeout_s=0.2), prefix)  # Redis is gone
    assert watcher.refresh() is False
    assert watcher.tau == -4.25 and watcher.failures == 1 and "unavailable" in watcher.last_error
    watcher.store = thresholds  # back again
    thresholds.put(ThresholdRecord(model="m", task="t", tau=-3.0, source="manual"))
    assert watcher.refresh() is True and watcher.tau == -3.0 and watcher.failures == 0


def _wait(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_unreadable_threshold_records_count_as_absent(redis_client, prefix, caplog):
    thresholds = ThresholdStore(redis_client, prefix)
    thresholds.put(ThresholdRecord(model="m", task="t", tau=-7.0, source="manual"))
    tenant_field = SeriesKey("m", "t", "acme").encode()
    redis_client.hset(thresholds.hash_key, mapping={tenant_field: b"{not json", "foreign": b'{"tau": "x"}'})
    with caplog.at_level("WARNING", logger="calibrator.threshold_store"):
        assert [r.tau for r in thresholds.list()] == [-7.0]
    assert "m:t:acme" in caplog.text and "foreign" in caplog.text
    # The tenant's entry is unreadable: the (model, task) entry applies, as if the tenant had none.
    assert thresholds.resolve("m", "t", "acme").tau == -7.0
    with pytest.raises(ThresholdNotFoundError, match="m/t \\(tenant acme\\) is unreadable"):
        thresholds.get(SeriesKey("m", "t", "acme"))
    assert redis_client.hget(thresholds.hash_key, "foreign") == b'{"tau": "x"}'  # left in place
    thresholds.put(ThresholdRecord(model="m", task="t", tenant="acme", tau=-6.0, source="manual"))
    assert thresholds.get(SeriesKey("m", "t", "acme")).tau == -6.0


@pytest.mark.parametrize("tau", ["1e300", "-1000.5", "true", '"-3.0"', "null", "NaN"])
def test_a_tau_that_is_no_number_or_out_of_bounds_is_unreadable_and_the_watcher_keeps_its_tau(redis_client, prefix,
                                                                                              tau):
    """What a server would apply: 1e300 stopped its scheduler, ``true`` and ``"-3.0"`` were applied as numbers."""
    thresholds = ThresholdStore(redis_client, prefix)
    thresholds.put(ThresholdRecord(model="m", task="t", tau=-7.0, source="manual"))
    watcher = ThresholdWatcher(thresholds, "m", "t")
    assert watcher.refresh() is True and watcher.tau == -7.0 and watcher.unreadable is None
    redis_client.hset(thresholds.hash_key, SeriesKey("m", "t").encode(),
                      f'{{"model": "m", "task": "t", "source": "manual", "tau": {tau}}}')  # fmt: skip
    assert watcher.refresh() is False and watcher.tau == -7.0
    assert "m/t is unreadable" in watcher.unreadable
    with pytest.raises(ThresholdNotFoundError, match="unreadable"):
        thresholds.get(SeriesKey("m", "t"))
    thresholds.put(ThresholdRecord(model="m", task="t", tau=-1000.0, source="manual"))  # the bound itself is a τ
    assert watcher.refresh() is True and watcher.tau == -1000.0 and watcher.unreadable is None


def test_a_record_without_updated_at_is_applied_once(redis_client, prefix):
    """Read without ``updated_at``, a record got the time of reading: every poll saw a new record, and servers with
    tenants applied and logged it again each poll."""
    thresholds = ThresholdStore(redis_client, prefix)
    redis_client.hset(thresholds.hash_key, SeriesKey("m", "t", "acme").encode(),
                      '{"model": "m", "task": "t", "tenant": "acme", "source": "manual", "tau": -3}')  # fmt: skip
    first = thresholds.resolve("m", "t", "acme")
    assert first.tau == -3.0 and first.updated_at == 0.0 and thresholds.resolve("m", "t", "acme") == first
    changes = []
    watcher = ThresholdWatcher(thresholds, "m", "t", "acme", on_change=lambda tau, record: changes.append(record))
    assert [watcher.refresh() for _ in range(3)] == [True, False, False] and len(changes) == 1


def test_bad_records_and_an_outage_are_logged_once_not_every_poll(redis_client, prefix, closed_port_url, caplog):
    thresholds = ThresholdStore(redis_client, prefix)
    redis_client.hset(thresholds.hash_key, SeriesKey("m", "t").encode(), b"{not json")
    watcher = ThresholdWatcher(thresholds, "m", "t")
    with caplog.at_level("INFO"):
        for _ in range(5):
            watcher.refresh()
        redis_client.hset(thresholds.hash_key, SeriesKey("m", "t").encode(), b"{still not json")
        watcher.refresh()
        watcher.store = ThresholdStore(connect(closed_port_url, timeout_s=0.2), prefix)
        for _ in range(3):
            watcher.refresh()
        watcher.store = thresholds
        watcher.refresh()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreadable threshold record" in m for m in messages) == 2  # one per bad value
    assert sum("unreachable" in m for m in messages) == 1 and sum("reachable again" in m for m in messages) == 1
    assert watcher.failures == 0


def _reply_lost_after(monkeypatch, client, method: str, then_unreachable: bool = False):
    """Failure injection (the only mock here): Redis runs ``client.<method>`` and its reply is lost on the way back;
    with ``then_unreachable`` every later command fails too. Redis and the stored data are real."""
    real = getattr(client, method)
    lost = []

    def run_and_lose_the_reply(*args, **kwargs):
        if lost and then_unreachable:
            raise redis.ConnectionError("Redis went away (injected)")
        real(*args, **kwargs)
        lost.append(True)
        raise redis.TimeoutError("Timeout reading from socket (injected)")

    monkeypatch.setattr(client, method, run_and_lose_the_reply)
    if then_unreachable:
        monkeypatch.setattr(client, "hget", lambda *a, **k: run_and_lose_the_reply())


def test_a_threshold_write_whose_reply_was_lost_is_never_reported_as_not_written(redis_client, prefix, monkeypatch):
    """A PUT or a calibration whose HSET ran but whose reply was lost answered 503 "nothing was written" while every
    server polling the hash applied that τ (review). Read back: stored means success; unknown is said so."""
    store = ThresholdStore(redis_client, prefix)
    record = ThresholdRecord(model="m", task="t", tau=-7.25, source="manual")
    _reply_lost_after(monkeypatch, redis_client, "hset")
    store.put(record)  # the read-back finds it: a success
    monkeypatch.undo()
    assert store.get(record.series).tau == -7.25

    seen = store.entry(record.series)
    newer = record.model_copy(update={"tau": -6.0, "source": "calibrated"})
    _reply_lost_after(monkeypatch, redis_client, "evalsha", then_unreachable=True)
    with pytest.raises(StoreOutcomeUnknownError, match="may have been stored") as caught:
        store.put_if_unchanged(newer, seen)
    assert caught.value.code == "store_outcome_unknown"
    monkeypatch.undo()
    assert store.get(record.series).tau == -6.0  # it was: Redis ran the script whose reply was lost


def test_a_threshold_write_to_an_unreachable_redis_says_nothing_was_written(closed_port_url):
    store = ThresholdStore(connect(closed_port_url, timeout_s=0.5), "kvzap-test:")
    with pytest.raises(StoreUnavailableError, match="Redis is unavailable") as caught:
        store.put(ThresholdRecord(model="m", task="t", tau=-3.0, source="manual"))
    assert caught.value.code == "store_unavailable"
