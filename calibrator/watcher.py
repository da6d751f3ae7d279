"""Plugin-side view of the current τ: polls the threshold store, keeps the last known τ when Redis is away."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from calibrator.errors import StoreUnavailableError, ThresholdNotFoundError, ThresholdUnreadableError
from calibrator.threshold_store import ThresholdRecord, ThresholdStore

log = logging.getLogger(__name__)


class ThresholdWatcher:
    """``tau`` is read lock-free by the serving loop; a daemon thread refreshes it every ``poll_interval_s``.

    Until a threshold is found ``tau`` is ``default_tau`` (None = the plugin's own configured τ). A record
    deleted from the store does not reset τ: only a new record changes it.
    """

    def __init__(
        self,
        store: ThresholdStore,
        model: str,
        task: str,
        tenant: str | None = None,
        *,
        default_tau: float | None = None,
        poll_interval_s: float = 1.0,
        on_change: Callable[[float, ThresholdRecord], None] | None = None,
    ) -> None:
        self.store, self.model, self.task, self.tenant = store, model, task, tenant
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.tau: float | None = default_tau
        self.record: ThresholdRecord | None = None
        self.failures = 0  # consecutive polls that could not reach the store
        self.last_error: str | None = None
        self.unreadable: str | None = None  # why the stored record is not applied (None: readable or absent)
        self.last_success_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Poll once; True when τ changed. Never raises for an unreachable store or a missing record."""
        try:
            record = self.store.resolve(self.model, self.task, self.tenant)
        except ThresholdNotFoundError as error:  # absent, or unreadable (ThresholdUnreadableError): τ is kept
            self._succeeded()
            self.unreadable = str(error) if isinstance(error, ThresholdUnreadableError) else None
            return False
        except StoreUnavailableError as error:
            if self.failures == 0:  # once per outage, not once per poll
                log.warning("threshold store unreachable, keeping τ %s until it answers: %s", self.tau, error)
            self.failures += 1
            self.last_error = str(error)
            return False
        self._succeeded()
        self.unreadable = None
        if self.record is not None and record == self.record:
            return False
        changed = record.tau != self.tau
        self.record, self.tau = record, record.tau
        if changed and self.on_change is not None:
            self.on_change(record.tau, record)
        return changed

    def _succeeded(self) -> None:
        if self.failures:
            log.info("threshold store reachable again after %d failed polls", self.failures)
        self.failures, self.last_error, self.last_success_at = 0, None, time.time()

    def start(self) -> ThresholdWatcher:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="kvzap-threshold-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception as error:  # noqa: BLE001 — a bad record must not kill the watcher thread
                self.failures += 1
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning("threshold poll failed: %s", error)
