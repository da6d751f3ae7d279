"""Dependencies injected into routes: settings, stores, and the caller identified by its API key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from calibrator.sample_store import SampleStore
from calibrator.threshold_store import ThresholdStore
from service.core.config import Settings
from service.core.errors import ForbiddenError, UnauthorizedError
from service.core.metrics import ServiceMetrics

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="admin or tenant API key")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sample_store(request: Request) -> SampleStore:
    return request.app.state.sample_store


def get_threshold_store(request: Request) -> ThresholdStore:
    return request.app.state.threshold_store


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``tenant`` is None for admins (and anonymous readers when reads are public)."""

    is_admin: bool
    tenant: str | None

    def tenant_for(self, requested: str | None) -> str | None:
        """The tenant an operation acts on: a tenant key acts on its own tenant, and only on it."""
        if self.is_admin or self.tenant is None:
            return requested
        if requested is not None and requested != self.tenant:
            raise ForbiddenError(f"this API key belongs to tenant {self.tenant!r} and cannot touch tenant {requested!r}")
        return self.tenant

    def may_read(self, tenant: str | None) -> bool:
        return self.is_admin or self.tenant is None or tenant == self.tenant


def _identify(key: str | None, settings: Settings) -> Caller | None:
    if not key:
        return None
    found = None
    for admin in settings.admin_api_keys:  # compare every key in constant time, no early exit
        if hmac.compare_digest(key.encode(), admin.get_secret_value().encode()):
            found = Caller(is_admin=True, tenant=None)
    for tenant_key, tenant in settings.tenant_api_keys.items():
        if hmac.compare_digest(key.encode(), tenant_key.encode()):
            found = found or Caller(is_admin=False, tenant=tenant)
    if found is None:
        raise UnauthorizedError("invalid API key")
    return found


def writer(
    key: Annotated[str | None, Security(api_key_header)], settings: Annotated[Settings, Depends(get_settings)]
) -> Caller:
    caller = _identify(key, settings)
    if caller is None:
        raise UnauthorizedError("this endpoint writes: send an admin or tenant key in the X-API-Key header")
    return caller


def reader(
    key: Annotated[str | None, Security(api_key_header)], settings: Annotated[Settings, Depends(get_settings)]
) -> Caller:
    caller = _identify(key, settings)
    if caller is None:
        if not settings.public_reads:
            raise UnauthorizedError("reads need an admin or tenant key in the X-API-Key header")
        return Caller(is_admin=False, tenant=None)
    return caller


def admin(caller: Annotated[Caller, Depends(writer)]) -> Caller:
    if not caller.is_admin:
        raise ForbiddenError("this endpoint needs an admin key")
    return caller
