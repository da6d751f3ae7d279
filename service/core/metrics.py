"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The method is a label, and any token is a valid HTTP method: the rest count as OTHER (bounded cardinality).
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# nginx's "client closed request": the client left before a response was sent. Not a server error.
CLIENT_CLOSED_REQUEST = 499


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvzap_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("kvzap_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry)
        self.samples_ingested = Counter("kvzap_samples_ingested", "score summaries stored", registry=self.registry)
        self.calibrations = Counter("kvzap_calibrations", "calibration attempts", ["outcome"], registry=self.registry)
        self.errors = Counter("kvzap_errors", "responses with status >= 400", ["code"], registry=self.registry)


class MetricsMiddleware:
    """Counts and times every request by its route template (never by raw path) and standard method: bounded label
    cardinality. A request whose client left before any response counts as 499, not as an error. ``routes`` are the
    app's, for requests answered before routing (a 413 from the body limit, a client gone mid-body)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: list[BaseRoute] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes or []

    def route_template(self, scope: Scope) -> str:
        """The template of the route that served the request, else of the one its path matches; ``unmatched`` for
        a path no route serves (a 404), so raw paths never become labels."""
        route = scope.get("route") or next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, disconnected = None, False
        start = time.perf_counter()

        async def watch_disconnect() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, watch_disconnect, record_status)
        except Exception:
            status = status or 500  # ServerErrorMiddleware, outside this one, answers it with a 500
            raise
        finally:
            if status is None:  # the app returned without a response
                status = CLIENT_CLOSED_REQUEST if disconnected else 500
            route = self.route_template(scope)
            method = scope["method"] if scope["method"] in STANDARD_METHODS else "OTHER"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
            if status >= 400 and status != CLIENT_CLOSED_REQUEST:
                self.metrics.errors.labels(str(status)).inc()
