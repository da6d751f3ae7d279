"""GET /thresholds, GET and PUT /thresholds/{model}/{task}: the current τ per (model, task[, tenant])."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey
from calibrator.summary import LABEL_PATTERN, MAX_LABEL_LENGTH, MODEL_PATTERN
from calibrator.threshold_store import ThresholdRecord, ThresholdStore
from service.api.deps import Caller, get_sample_store, get_settings, get_threshold_store, reader, writer
from service.api.routes.calibrate import require_known_model
from service.core.config import Settings
from service.schemas import ERROR_RESPONSES, ErrorBody, ThresholdUpdate

router = APIRouter(tags=["thresholds"])

ModelPath = Annotated[str, Path(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=MODEL_PATTERN)]
TaskPath = Annotated[str, Path(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=LABEL_PATTERN)]
TenantQuery = Annotated[str | None, Query(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=LABEL_PATTERN)]
NOT_FOUND = {**ERROR_RESPONSES, 404: {"model": ErrorBody, "description": "no such threshold or unknown model"}}


@router.get("/thresholds", response_model=list[ThresholdRecord], responses=ERROR_RESPONSES)
def list_thresholds(
    caller: Annotated[Caller, Depends(reader)],
    store: Annotated[ThresholdStore, Depends(get_threshold_store)],
    model: Annotated[str | None, Query(max_length=MAX_LABEL_LENGTH)] = None,
    task: Annotated[str | None, Query(max_length=MAX_LABEL_LENGTH)] = None,
    tenant: TenantQuery = None,
) -> list[ThresholdRecord]:
    """Current thresholds, filtered; a tenant key sees only its own tenant's entries (naming another tenant is a 403,
    as on the other routes)."""
    if tenant is not None:
        caller.tenant_for(tenant)
    records = store.list(model=model, task=task)
    return [r for r in records if caller.may_read(r.tenant) and (tenant is None or r.tenant == tenant)]


@router.get("/thresholds/{model:path}/{task}", response_model=ThresholdRecord, responses=NOT_FOUND)
def get_threshold(
    model: ModelPath,
    task: TaskPath,
    caller: Annotated[Caller, Depends(reader)],
    store: Annotated[ThresholdStore, Depends(get_threshold_store)],
    tenant: TenantQuery = None,
) -> ThresholdRecord:
    """The τ stored for exactly (model, task, tenant); a tenant key reads its own tenant's entry."""
    series = SeriesKey(model, task, caller.tenant_for(tenant))
    return store.get(series)


@router.put("/thresholds/{model:path}/{task}", response_model=ThresholdRecord, responses=NOT_FOUND)
def put_threshold(
    model: ModelPath,
    task: TaskPath,
    update: ThresholdUpdate,
    caller: Annotated[Caller, Depends(writer)],
    settings: Annotated[Settings, Depends(get_settings)],
    samples: Annotated[SampleStore, Depends(get_sample_store)],
    store: Annotated[ThresholdStore, Depends(get_threshold_store)],
    tenant: TenantQuery = None,
) -> ThresholdRecord:
    """Set τ by hand (admin: any entry; tenant key: its own tenant's entry). The model must be known."""
    effective = caller.tenant_for(tenant)
    require_known_model(model, settings, samples, caller)
    record = ThresholdRecord(
        model=model, task=task, tenant=effective, tau=update.tau, source="manual",
        updated_by="admin" if caller.is_admin else f"tenant:{caller.tenant}",
    )
    store.put(record)
    return record


