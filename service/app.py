"""FastAPI app of the calibration service: ``uvicorn service.app:app``. ``create_app(settings)`` for tests."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError

from calibrator.errors import StoreUnavailableError
from calibrator.sample_store import SampleStore
from calibrator.series import connect
from calibrator.threshold_store import ThresholdStore
from service.api.routes import calibrate, health, samples, thresholds
from service.core.body_limit import BodySizeLimit
from service.core.config import Settings, load_settings
from service.core.errors import install_error_handlers
from service.core.metrics import MetricsMiddleware, ServiceMetrics

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    client = connect(settings.redis_url, settings.redis_timeout_s)  # connects lazily: start-up works without Redis

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        publisher = asyncio.create_task(publish_limits(app.state.sample_store))
        yield
        publisher.cancel()
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
    routers = [module.router for module in (samples, calibrate, thresholds, health)]
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outermost: counts 413s too, under the route their path matches (the router has not run for them). The
    # routers' own routes: FastAPI wraps an included router in a route with no template of its own.
    api_routes = [route for router in routers for route in router.routes]
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=api_routes)
    return app


async def publish_limits(store: SampleStore, retry_s: float = 5.0) -> None:
    """Publish the retention settings once Redis answers: the KVzap servers' samplers store under them too
    (``SampleStore`` without limits of its own), so these settings bound every producer's samples."""
    while True:
        try:
            await asyncio.to_thread(store.publish_limits)
            return
        except StoreUnavailableError as error:
            log.warning("could not publish the store limits (retrying in %s s): %s", retry_s, error)
            await asyncio.sleep(retry_s)


def app_from_environment() -> FastAPI:
    """The app ``uvicorn service.app:app`` imports. A bad setting stops it with one line naming the setting (exit
    status 1) instead of uvicorn's 50-line import traceback ending in pydantic's report."""
    try:
        return create_app()
    except ValidationError as error:
        reasons = "; ".join(f"KVZAP_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg']}"
                            for e in error.errors())  # fmt: skip
        raise SystemExit(f"kvzap calibration service: bad settings: {reasons}") from None
    except (SettingsError, FileNotFoundError) as error:  # an unparsable KVZAP_* value, a missing KVZAP_ENV_FILE
        cause = f" ({error.__cause__})" if error.__cause__ else ""  # e.g. the JSON error of a list setting
        raise SystemExit(f"kvzap calibration service: bad settings: {error}{cause}") from None


app = app_from_environment()
