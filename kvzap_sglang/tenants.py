"""Tenants of a KVzap server: per-tenant τ, window and KV budget, and who a request belongs to (issue #8).

Knows nothing of SGLang. A TOML file (``--kvzap-tenants PATH``, example in ``configs/tenants.example.toml``)::

    [default]                 # requests with no (known) tenant
    kv_budget_tokens = 4096

    [tenants.acme]
    api_key = "acme-secret-key"
    threshold = -4.0          # τ; omitted: the server's --kvzap-threshold (or the calibration service's τ)
    window = 128              # omitted: --kvzap-window
    kv_budget_tokens = 8192   # cells held by live requests + cached prefixes, in token-equivalents
                              # (one token-equivalent = layers × kv_heads cells); omitted: no budget
    threshold_range = [-4.3, -2.0]  # optional "tighten before queueing" policy: when a request would wait for
                              # the budget, the tenant's τ first rises (up to the upper end) and its decided
                              # entries are re-judged at it; back to its τ once none of its requests wait.
                              # The tenant's τ (file, flag or calibration service) is kept inside the range.
    prefix_cache_group = "public-docs"  # optional: tenants naming the same group share cached prefixes (each
                              # cell still counts against the tenant whose request wrote it); omitted: own cache

Cached prefixes are per tenant (``extra_key_for``: each tenant is its own radix-cache namespace) unless tenants
name the same ``prefix_cache_group`` (``cache_namespace``).

Identity (``TenantsConfig.resolve``): when any tenant has an ``api_key``, a request's tenant is the one whose key it
presents (``Authorization: Bearer KEY``); a request naming a tenant (``X-KVzap-Tenant``) must present that
tenant's key, and an unknown key is refused. Without keys, ``X-KVzap-Tenant`` names the tenant. A request with no
tenant, or naming an unknown tenant without keys configured, runs as ``default``.
"""

from __future__ import annotations

import hmac
import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvzap_sglang.policy import MAX_WINDOW, is_usable_threshold

DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_TENANTS = 64  # the cell store's tenant tags (storage.cell_store.MAX_TENANTS)
# The radix-cache namespace (SGLang's extra_key) of a tenant: cached prefixes are never shared across tenants.
EXTRA_KEY_PREFIX = "kvzap-tenant:"
# The radix-cache namespace of a prefix-cache group (``cache_namespace``): shared by the group's tenants.
GROUP_KEY_PREFIX = "kvzap-group:"


class TenantsConfigError(ValueError):
    """The tenants file is missing or malformed (start-up error)."""


class TenantAuthError(Exception):
    """A request's tenant identity is refused; ``status`` is the HTTP status to answer with (401 or 403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TenantSpec(BaseModel):
    # Strict: TOML has real numbers, booleans and strings, so `window = true` or `kv_budget_tokens = "4096"` is a
    # mistake in the file, not something to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    threshold: float | None = None
    window: int | None = Field(None, ge=0, le=MAX_WINDOW)
    kv_budget_tokens: int | None = Field(None, ge=1)
    # Printable ASCII, no spaces: the key a client sends in an HTTP header, which the middleware strips and decodes
    # as latin-1 (a key with spaces or other characters could never match).
    api_key: str | None = Field(None, min_length=8, pattern=r"^[\x21-\x7e]+$", repr=False)
    threshold_range: tuple[float, float] | None = None  # [τ_min, τ_max] of the tighten-before-queueing policy
    prefix_cache_group: str | None = Field(None, pattern=TENANT_PATTERN)  # tenants sharing cached prefixes

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not is_usable_threshold(value):
            raise ValueError("threshold must be a finite float32 number")
        return value

    @field_validator("threshold_range", mode="before")
    @classmethod
    def _array_as_pair(cls, value):
        return tuple(value) if isinstance(value, list) else value  # a TOML array; strict mode wants a tuple

    @field_validator("threshold_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None:
            low, high = value
            if not (is_usable_threshold(low) and is_usable_threshold(high)) or low > high:
                raise ValueError(f"threshold_range must be two finite numbers [min, max] with min <= max, got {value}")
        return value

    @model_validator(mode="after")
    def _threshold_in_range(self) -> TenantSpec:
        if self.threshold_range is not None:
            if self.kv_budget_tokens is None:
                raise ValueError("threshold_range (tighten before queueing) needs a kv_budget_tokens")
            low, high = self.threshold_range
            if self.threshold is not None and not low <= self.threshold <= high:
                raise ValueError(f"threshold {self.threshold} lies outside threshold_range [{low}, {high}]")
        return self

    def clamp_threshold(self, tau: float) -> float:
        """``tau`` kept inside ``threshold_range`` (unchanged without one)."""
        return clamp_to_range(tau, self.threshold_range)


class TenantsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: TenantSpec = TenantSpec()
    tenants: dict[str, TenantSpec] = {}

    @field_validator("tenants")
    @classmethod
    def _names(cls, value: dict[str, TenantSpec]) -> dict[str, TenantSpec]:
        for name in value:
            if not re.fullmatch(TENANT_PATTERN, name) or name == DEFAULT_TENANT:
                raise ValueError(f"tenant name {name!r} must match {TENANT_PATTERN} and not be {DEFAULT_TENANT!r}")
        if len(value) + 1 > MAX_TENANTS:
            raise ValueError(f"at most {MAX_TENANTS - 1} tenants besides {DEFAULT_TENANT!r}")
        return value

    @model_validator(mode="after")
    def _distinct_keys(self) -> TenantsConfig:
        keys = [spec.api_key for spec in self.specs().values() if spec.api_key]
        if len(keys) != len(set(keys)):
            raise ValueError("two tenants share an api_key")
        return self

    @classmethod
    def load(cls, path: str | Path) -> TenantsConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
            if not data:
                raise TenantsConfigError(f"tenants file {path} configures nothing: add [tenants.NAME] tables "
                                         "(or [default])")
            return cls.model_validate(data)
        except FileNotFoundError:
            raise TenantsConfigError(f"tenants file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:  # a directory, no permission, not UTF-8 text
            raise TenantsConfigError(f"tenants file {path} cannot be read as TOML text: {error}") from None
        except tomllib.TOMLDecodeError as error:
            raise TenantsConfigError(f"tenants file {path}: {error}") from None
        except ValidationError as error:
            raise TenantsConfigError(f"tenants file {path}: {describe_errors(error)}") from None

    def specs(self) -> dict[str, TenantSpec]:
        """Every tenant by name, ``default`` first (its index is 0)."""
        return {DEFAULT_TENANT: self.default, **self.tenants}

    def names(self) -> list[str]:
        return list(self.specs())

    def prefix_cache_groups(self) -> dict[str, str]:
        """Tenant → prefix-cache group, for the tenants that name one."""
        return {name: spec.prefix_cache_group for name, spec in self.specs().items() if spec.prefix_cache_group}

    @property
    def keys_configured(self) -> bool:
        return any(spec.api_key for spec in self.specs().values())

    def resolve(self, api_key: str | None, claimed: str | None) -> str:
        """The tenant a request runs as (module docstring). Raises ``TenantAuthError`` (401/403)."""
        specs = self.specs()
        if not self.keys_configured:
            return claimed if claimed in specs else DEFAULT_TENANT
        if api_key:
            owner = next((name for name, spec in specs.items()
                          if spec.api_key and hmac.compare_digest(spec.api_key.encode(), api_key.encode())), None)  # fmt: skip
            if owner is None:
                raise TenantAuthError(401, "unknown API key")
            if claimed and claimed != owner:
                raise TenantAuthError(403, f"this API key belongs to tenant {owner!r}, not {claimed!r}")
            return owner
        if claimed and claimed in specs and specs[claimed].api_key:
            raise TenantAuthError(401, f"tenant {claimed!r} needs its API key (Authorization: Bearer ...)")
        if claimed and claimed not in specs:
            return DEFAULT_TENANT
        return claimed or DEFAULT_TENANT


def describe_errors(error: ValidationError) -> str:
    """Pydantic's errors on one line, each as ``where: what (got value)``: a start-up error is read in a log, where
    pydantic's own text spans several lines per error. Secrets never appear: an ``api_key``'s value, and any table
    (which may hold one), are left out."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "file"
        what = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        shown = isinstance(value, (bool, int, float, str)) and "api_key" not in item["loc"]
        parts.append(f"{where}: {what}" + (f" (got {_short_repr(value)})" if shown else ""))
    return "; ".join(parts)


def _short_repr(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clamp_to_range(tau: float, threshold_range: tuple[float, float] | None) -> float:
    """``tau`` kept inside ``[min, max]`` of a tenant's ``threshold_range`` (unchanged for ``None``)."""
    if threshold_range is None:
        return tau
    low, high = threshold_range
    return min(max(tau, low), high)


def extra_key_for(tenant: str, client_extra_key: str | None = None) -> str:
    """The radix-cache namespace of ``tenant`` (keeping the client's own ``extra_key`` salt after it).

    The tenant's name always ends at a ``|``: SGLang appends a LoRA request's ``lora_id`` to its ``extra_key``
    (``Req.__init__``), which would otherwise run into the name and make the request an unknown tenant's."""
    return f"{EXTRA_KEY_PREFIX}{tenant}|{client_extra_key or ''}"


def cache_namespace(extra_key: str | None, groups: dict[str, str]) -> str | None:
    """The radix-cache namespace of a request's ``extra_key``: its tenant's group's when the tenant is in a
    ``prefix_cache_group`` (tenant name replaced by the group, the client's salt kept), else ``extra_key`` itself."""
    if not extra_key or not extra_key.startswith(EXTRA_KEY_PREFIX):
        return extra_key
    tenant, sep, salt = extra_key[len(EXTRA_KEY_PREFIX) :].partition("|")
    group = groups.get(tenant)
    return extra_key if group is None else f"{GROUP_KEY_PREFIX}{group}{sep}{salt}"


def tenant_of_extra_key(extra_key: str | None) -> str:
    """Inverse of ``extra_key_for``: the tenant a scheduled request belongs to (``default`` without one)."""
    if not extra_key or not extra_key.startswith(EXTRA_KEY_PREFIX):
        return DEFAULT_TENANT
    return extra_key[len(EXTRA_KEY_PREFIX) :].split("|", 1)[0]
