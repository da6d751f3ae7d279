"""POST /calibrate: fit τ for a target removed fraction and store it as the current threshold."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from calibrator.errors import CalibrationError, UnknownModelError
from calibrator.fit import fit_threshold
from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey
from calibrator.threshold_store import ThresholdRecord, ThresholdStore
from service.api.deps import Caller, get_metrics, get_sample_store, get_settings, get_threshold_store, writer
from service.core.config import Settings
from service.core.metrics import ServiceMetrics
from service.schemas import ERROR_RESPONSES, CalibrateRequest, CalibrationResponse, ErrorBody, ValidationErrorBody

router = APIRouter(tags=["calibration"])

CALIBRATE_ERRORS = {
    **ERROR_RESPONSES,
    404: {"model": ErrorBody, "description": "unknown model"},
    422: {"model": ValidationErrorBody | ErrorBody,
          "description": "invalid request (error invalid_request, with errors), too few samples, or unreachable "
                         "target (the detail says what is achievable)"},
    409: {"model": ErrorBody, "description": "the threshold was set (PUT or another calibration) while this one was "
                                             "fitting (threshold_changed): the newer value is kept; calibrate again"},
}


def require_known_model(model: str, settings: Settings, samples: SampleStore, caller: Caller) -> None:
    """The configured models and those sampled in series the caller may read: another tenant's model names are
    that tenant's, so a tenant key never sees them (not even as a 404 that differs from an unknown model's)."""
    if model in settings.known_models:
        return
    known = {s.model for s in samples.series() if caller.may_read(s.tenant)}
    if model not in known:
        names = sorted(known | set(settings.known_models))
        raise UnknownModelError(f"unknown model {model!r}: no samples stored and not configured (known: {names})")


@router.post("/calibrate", response_model=CalibrationResponse, responses=CALIBRATE_ERRORS)
def calibrate(
    body: CalibrateRequest,
    caller: Annotated[Caller, Depends(writer)],
    settings: Annotated[Settings, Depends(get_settings)],
    samples: Annotated[SampleStore, Depends(get_sample_store)],
    thresholds: Annotated[ThresholdStore, Depends(get_threshold_store)],
    metrics: Annotated[ServiceMetrics, Depends(get_metrics)],
) -> CalibrationResponse:
    """τ such that the mean removed fraction over the stored requests of (model, task[, tenant]) is closest to
    ``target_ratio``; without a tenant (admin keys) every tenant's samples are pooled. Stored only if the threshold
    is still what it was when the fit began: one set meanwhile (PUT) is kept, and the answer is a 409."""
    tenant = caller.tenant_for(body.tenant)
    series = SeriesKey(body.model, body.task, tenant)
    try:
        require_known_model(body.model, settings, samples, caller)
        seen = thresholds.entry(series)
        report = fit_threshold(
            samples.curves(body.model, body.task, tenant),
            body.target_ratio,
            min_samples=body.min_samples or settings.default_min_samples,
            tolerance=settings.tolerance,
            bootstrap_resamples=settings.bootstrap_resamples,
            confidence=body.confidence,
            seed=body.seed,
            label=str(series),
        )
        record = ThresholdRecord(
            model=body.model, task=body.task, tenant=tenant, tau=report.tau, source="calibrated",
            target_ratio=body.target_ratio, predicted_removed_fraction=report.predicted_removed_fraction,
            n_requests=report.n_requests, updated_by="admin" if caller.is_admin else f"tenant:{caller.tenant}",
        )
        thresholds.put_if_unchanged(record, seen)
    except CalibrationError as error:
        metrics.calibrations.labels(error.code).inc()
        raise
    metrics.calibrations.labels("ok").inc()
    return CalibrationResponse(threshold=record, report=report)
