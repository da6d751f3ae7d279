"""Plugin-side shipping of score summaries, off the hot path.

The hot path calls ``offer`` (or ``wants`` first, to skip summarising unsampled requests): a non-blocking put
into a bounded queue. A daemon thread drains the queue in batches and hands each batch to a transport
(``SampleStore.ingest`` for direct Redis). A full queue, a failed send or a close with summaries still queued drops
them and counts them — the serving loop never waits on Redis, and every summary offered is counted once: sent or
dropped for one reason.
"""

from __future__ import annotations

import logging
import queue
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calibrator.summary import ScoreSummary

log = logging.getLogger(__name__)

Transport = Callable[[Sequence[ScoreSummary]], object]


@dataclass
class SinkCounters:
    offered: int = 0
    sent: int = 0
    dropped_full: int = 0  # queue full at offer time
    dropped_send_error: int = 0  # transport raised (e.g. Redis down); the batch is not retried
    dropped_closed: int = 0  # still queued when close() gave up waiting, or offered after close()


class SampleSink:
    def __init__(
        self,
        transport: Transport,
        *,
        sample_fraction: float = 1.0,
        max_queue: int = 1024,
        batch_size: int = 64,
        flush_interval_s: float = 0.5,
    ) -> None:
        if not 0.0 <= sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in [0, 1], got {sample_fraction}")
        if max_queue < 1 or batch_size < 1 or flush_interval_s <= 0:
            raise ValueError("max_queue and batch_size must be >= 1 and flush_interval_s > 0")
        self.transport = transport
        self.sample_fraction = sample_fraction
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.counters = SinkCounters()
        self._queue: queue.Queue[ScoreSummary] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0  # queued or being sent; flush() waits for 0
        self._thread = threading.Thread(target=self._run, name="kvzap-sample-sink", daemon=True)
        self._thread.start()

    def wants(self, request_id: str) -> bool:
        """Deterministic sampling decision for a request (same id → same answer in every process)."""
        return zlib.crc32(request_id.encode()) < self.sample_fraction * 2**32

    def offer(self, summary: ScoreSummary) -> bool:
        """Queue a summary without blocking; False (and counted) when the queue is full or the sink is closed."""
        # The stop check and the put are one step under ``_idle``, the lock close() sets ``_stop`` under: a summary
        # is either refused here or queued before close() drains the queue, never queued after the drain (where it
        # would be counted as offered but never as sent or dropped).
        with self._idle:
            self.counters.offered += 1
            if self._stop.is_set():
                self.counters.dropped_closed += 1
                return False
            try:
                self._queue.put_nowait(summary)
            except queue.Full:
                self.counters.dropped_full += 1
                return False
            self._pending += 1
        return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far has been sent or dropped; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout_s``) and stop the thread; what is still queued then is dropped
        and counted (a batch being sent is counted by the thread when its send ends)."""
        self.flush(timeout_s)
        with self._idle:  # waits for an offer() between its stop check and its put; see offer()
            self._stop.set()
        self._thread.join(timeout_s)
        dropped = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            dropped += 1
        if dropped:
            log.warning("dropped %d score summaries still queued at close", dropped)
            with self._idle:  # offer() counts dropped_closed too
                self.counters.dropped_closed += dropped
                self._pending -= dropped
                self._idle.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                self._send(batch)

    def _take_batch(self) -> list[ScoreSummary]:
        try:
            first = self._queue.get(timeout=self.flush_interval_s)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _send(self, batch: list[ScoreSummary]) -> None:
        try:
            self.transport(batch)
            self.counters.sent += len(batch)
        except Exception as error:  # noqa: BLE001 — any transport failure must stay off the hot path
            self.counters.dropped_send_error += len(batch)
            log.warning("dropped %d score summaries: %s", len(batch), error)
        with self._idle:
            self._pending -= len(batch)
            self._idle.notify_all()
