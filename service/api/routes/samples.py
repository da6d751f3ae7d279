"""POST /samples: batch ingest of per-request score summaries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey
from service.api.deps import Caller, get_metrics, get_sample_store, get_settings, writer
from service.core.config import Settings
from service.core.errors import PayloadTooLargeError
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
    stored = store.ingest(samples)
    metrics.samples_ingested.inc(stored)
    series = sorted({SeriesKey(s.model, s.task, s.tenant) for s in samples}, key=SeriesKey.sort_key)
    return IngestResult(stored=stored, series=[str(s) for s in series])
