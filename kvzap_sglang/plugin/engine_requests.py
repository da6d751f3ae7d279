"""Requests as a tenant through the offline ``sglang.Engine``.

Over HTTP, ``TenantMiddleware`` turns a request's API key into its tenant's ``extra_key`` (the radix-cache namespace
the scheduler reads the tenant from). An Engine has no HTTP edge, and SGLang 0.5.23's ``Engine.generate`` takes no
``extra_key``, so its callers name the tenant here: the same request as ``Engine.generate`` /
``Engine.async_generate``, given as ``GenerateReqInput`` fields (``text=``, ``input_ids=``, ``sampling_params=``,
``stream=``, ...), run as ``tenant``::

    out = generate_as(engine, "acme", text="Hello", sampling_params={"max_new_tokens": 16})

The caller is trusted with every tenant (the Engine runs in its process, with its tenants file): these helpers vouch
for the ``extra_key`` they write, as the HTTP edge does for its own (``tenants.refuse_unvouched_tenant_keys``
refuses any other that names a tenant). SGLang validates a request on its first step, so each step runs vouched.
"""

from __future__ import annotations

from typing import Any

from kvzap_sglang.plugin.prompt_checks import TENANT_NAMES_ATTR
from kvzap_sglang.plugin.tenants import vouching_for
from kvzap_sglang.tenants import extra_key_for


def tenant_request(engine, tenant: str, salt: str | None = None, **fields: Any):
    """``GenerateReqInput(**fields)`` in ``tenant``'s namespace (``salt``: the caller's own ``extra_key``, kept
    after it). Raises ``ValueError`` for a tenant the Engine does not have: it would run as ``default`` unnoticed."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    names = getattr(engine.tokenizer_manager, TENANT_NAMES_ATTR, None)
    if names is None:
        raise ValueError("this Engine serves no tenants: build it with kvzap_threshold=... and kvzap_tenants=PATH")
    if tenant not in names:
        raise ValueError(f"unknown tenant {tenant!r}: this Engine's tenants are {names}")
    if "extra_key" in fields:
        raise ValueError("pass the caller's own extra_key as salt=...: the tenant's namespace comes first")
    return GenerateReqInput(extra_key=extra_key_for(tenant, salt), **fields)


def generate_as(engine, tenant: str, salt: str | None = None, **fields: Any):
    """``engine.generate`` as ``tenant``: the output dict (a list for a batch), or an iterator of chunks with
    ``stream=True``."""
    request = tenant_request(engine, tenant, salt, **fields)
    chunks = engine.tokenizer_manager.generate_request(request, None)
    if fields.get("stream"):
        return _iterate(engine.loop, chunks, request.extra_key)
    with vouching_for(request.extra_key):  # the loop's task copies this context
        return engine.loop.run_until_complete(chunks.__anext__())


async def async_generate_as(engine, tenant: str, salt: str | None = None, **fields: Any):
    """``await engine.async_generate(...)`` as ``tenant``: the output, or an async iterator with ``stream=True``."""
    request = tenant_request(engine, tenant, salt, **fields)
    chunks = engine.tokenizer_manager.generate_request(request, None)
    if fields.get("stream"):
        return _aiterate(chunks, request.extra_key)
    with vouching_for(request.extra_key):
        return await chunks.__anext__()


def _iterate(loop, chunks, extra_key):
    while True:
        try:
            with vouching_for(extra_key):
                chunk = loop.run_until_complete(chunks.__anext__())
        except StopAsyncIteration:
            return
        yield chunk


async def _aiterate(chunks, extra_key):
    while True:
        try:
            with vouching_for(extra_key):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        yield chunk
