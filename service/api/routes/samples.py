"""POST /samples: batch ingest of per-request score summaries."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends

from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey
from service.api.deps import Caller, get_metrics, get_sample_store, get_settings, writer
from service.core.config import Settings
from service.core.errors import PayloadTooLargeError, SeriesLimitError
from service.core.metrics import ServiceMetrics
from service.schemas import ERROR_RESPONSES, IngestResult, SampleBatch

router = APIRouter(tags=["samples"])


@router.post("/samples", response_model=IngestResult, responses=ERROR_RESPONSES)
def ingest_samples(
    batch: SampleBatch,
    caller: Annotated[Caller, Depends(writer)],
    settings: Annotated[Settings, Depends(get_settings)],
    store: Annotated[SampleStore, Depends(get_sample_store)],
    metrics: Annotated[ServiceMetrics, Depends(get_metrics)],
) -> IngestResult:
    """Store a batch atomically (all or nothing). A tenant key may only send its own tenant's samples; samples
    without a tenant sent with a tenant key are attributed to that tenant."""
    if len(batch.samples) > settings.max_batch_size:
        raise PayloadTooLargeError(
            f"batch of {len(batch.samples)} summaries exceeds max_batch_size {settings.max_batch_size}"
        )
    samples = [s.model_copy(update={"tenant": caller.tenant_for(s.tenant)}) for s in batch.samples]
    series = sorted({SeriesKey(s.model, s.task, s.tenant) for s in samples}, key=SeriesKey.sort_key)
    refuse_series_over_the_limit(series, store, settings.max_series_per_tenant)
    stored = store.ingest(samples)
    metrics.samples_ingested.inc(stored)
    return IngestResult(stored=stored, series=[str(s) for s in series])


def refuse_series_over_the_limit(batch_series: list[SeriesKey], store: SampleStore, limit: int) -> None:
    """SeriesLimitError, nothing stored, when the batch would give a tenant more than ``limit`` live series. Checked
    before the write, so batches racing each other may together go past it by their own new series."""
    stored = set(store.series())
    new = Counter(s.tenant for s in batch_series if s not in stored)
    if not new:
        return
    held = Counter(s.tenant for s in stored)
    over = sorted((t or "", held[t], n) for t, n in new.items() if held[t] + n > limit)
    if over:
        tenant, have, adding = over[0]
        whose = f"tenant {tenant!r}" if tenant else "samples without a tenant"
        raise SeriesLimitError(
            f"{whose} has {have} (model, task) series stored and this batch starts {adding} more; the limit is "
            f"{limit} (KVZAP_MAX_SERIES_PER_TENANT). Series expire with their samples (KVZAP_RETENTION_S)"
        )
