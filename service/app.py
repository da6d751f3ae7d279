"""FastAPI app of the calibration service: ``uvicorn service.app:app``. ``create_app(settings)`` for tests."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from calibrator.sample_store import SampleStore
from calibrator.series import connect
from calibrator.threshold_store import ThresholdStore
from service.api.routes import calibrate, health, samples, thresholds
from service.core.body_limit import BodySizeLimit
from service.core.config import Settings, load_settings
from service.core.errors import install_error_handlers
from service.core.metrics import MetricsMiddleware, ServiceMetrics


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    client = connect(settings.redis_url, settings.redis_timeout_s)  # connects lazily: start-up works without Redis

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        client.close()

    app = FastAPI(
        title="KVzap calibration service",
        version="0.1.0",
        description="Maps a target KV-cache removed fraction to KVzap's threshold τ from sampled traffic.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sample_store = SampleStore(client, settings.redis_prefix, settings.store_limits())
    app.state.threshold_store = ThresholdStore(client, settings.redis_prefix)
    app.state.metrics = ServiceMetrics()
    for module in (samples, calibrate, thresholds, health):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts 413s too
    return app


app = create_app()
