"""HTTP request/response bodies (pydantic v2). Domain models (ScoreSummary, ThresholdFit, ThresholdRecord) are
the library's own, reused as-is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from calibrator.fit import ThresholdFit
from calibrator.summary import LABEL_PATTERN, MAX_LABEL_LENGTH, MODEL_PATTERN, ScoreSummary
from calibrator.threshold_store import TAU_LIMIT, ThresholdRecord

HARD_MAX_BATCH = 10_000  # schema-level cap; the configured max_batch_size is usually lower


class SampleBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    samples: list[ScoreSummary] = Field(min_length=1, max_length=HARD_MAX_BATCH)


class IngestResult(BaseModel):
    stored: int
    series: list[str]


class CalibrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=MODEL_PATTERN)
    task: str = Field(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=LABEL_PATTERN)
    # NaN / Infinity parse as JSON numbers in Python but are no target: "finite number" says why they are refused.
    target_ratio: float = Field(
        ge=0.0, lt=1.0, allow_inf_nan=False,
        description="target mean removed fraction, in [0, 1); 0 gives the lowest candidate τ (-32)",
    )
    tenant: str | None = Field(None, min_length=1, max_length=MAX_LABEL_LENGTH, pattern=LABEL_PATTERN)
    min_samples: int | None = Field(None, ge=1, le=10_000_000)
    confidence: float = Field(0.95, ge=0.5, le=0.999, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class CalibrationResponse(BaseModel):
    threshold: ThresholdRecord
    report: ThresholdFit


class ThresholdUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tau: float = Field(ge=-TAU_LIMIT, le=TAU_LIMIT, allow_inf_nan=False, description="log-score threshold")


class ErrorBody(BaseModel):
    error: str
    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body / query / path, then field names and list indexes")
    msg: str
    type: str


class ValidationErrorBody(ErrorBody):
    """422 for a request that does not match the schema; ``detail`` joins every ``loc: msg``."""

    errors: list[FieldError]


class Health(BaseModel):
    status: str
    redis: str


ERROR_RESPONSES = {
    400: {"model": ErrorBody, "description": "body is not valid JSON, or a malformed Content-Length"},
    401: {"model": ErrorBody, "description": "missing or invalid X-API-Key"},
    403: {"model": ErrorBody, "description": "the key's tenant does not own this entry"},
    413: {"model": ErrorBody, "description": "body or batch over the configured limits"},
    422: {"model": ValidationErrorBody | ErrorBody,
          "description": "request does not match the schema (invalid_request, with errors); POST /samples: the batch "
                         "would give a tenant more series than KVZAP_MAX_SERIES_PER_TENANT (series_limit)"},
    503: {"model": ErrorBody, "description": "Redis unavailable: nothing was written (store_unavailable), or a "
                                             "write went out and its outcome is unknown (store_outcome_unknown); "
                                             "or Redis is up but writers of the same series in other processes "
                                             "kept conflicting, nothing was written (store_busy, with Retry-After)"},
}
