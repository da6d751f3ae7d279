"""GET /healthz (Redis reachable?) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import RedisError

from calibrator.sample_store import SampleStore
from service.api.deps import get_metrics, get_sample_store
from service.core.metrics import ServiceMetrics
from service.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Redis unreachable"}})
def healthz(samples: Annotated[SampleStore, Depends(get_sample_store)]) -> Response:
    try:
        samples.client.ping()
    except RedisError as error:
        return JSONResponse(Health(status="unavailable", redis=f"{type(error).__name__}: {error}").model_dump(), 503)
    return JSONResponse(Health(status="ok", redis="ok").model_dump())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, service_metrics: Annotated[ServiceMetrics, Depends(get_metrics)]) -> Response:
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
