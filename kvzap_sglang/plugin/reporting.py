"""Observability: per-request KVzap figures in ``/generate`` ``meta_info`` and server-wide totals.

Path of the per-request figures (all SGLang extension points, no fork):

1. ``release_kv_cache`` (scheduler, AROUND hook ``hooks.release``) — the request's slots still hold their cells:
   count them (``cells_held``) against the full count ``tokens × layers × kv_heads`` and keep the figures on the
   request (``Req.kvzap_figures``: they go with it, whether its output is streamed or it is dropped);
2. ``KvzapOutputStreamer`` (the scheduler's ``SchedulerOutputStreamer`` with ``has_additional_customized_info``) —
   attaches them to the request's final output as customized info ``"kvzap"``;
3. ``TokenizerManager.update_request_meta_info`` (main process, AROUND hook) — takes ``"kvzap"`` out of what SGLang
   accumulates and puts the one dict into the final output's ``meta_info``: ``meta_info["kvzap"]`` is
   ``{"removed_fraction", "cells_held", "cells_full", "tokens"}`` there and absent from earlier stream chunks.
   SGLang treats accumulated keys as per-token lists (it slices them with ``--incremental-streaming-output`` and
   re-reports them in every chunk of a cumulative stream), which a dict in their place broke.

Server-wide totals (``KvzapRuntime.snapshot``) go to ``/server_info`` (``internal_states[0]["kvzap"]``) and, with
``--enable-metrics``, to ``/metrics`` as ``kvzap_*`` gauges (prometheus multiprocess mode, written by the scheduler).
"""

from __future__ import annotations

import os
import re
import time

from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

from kvzap_sglang.plugin import runtime
from kvzap_sglang.plugin.settings import kvzap_enabled

META_KEY = "kvzap"
FIGURES_ATTR = "kvzap_figures"  # on SGLang's Req: a table by request id kept the figures of requests never streamed
ENDED_ATTR = "kvzap_ended"  # on SGLang's Req: already counted in requests_finished


def record_release(rt: runtime.KvzapRuntime, req, tree_cache) -> None:
    """Called by ``hooks.release`` before ``release_kv_cache`` runs: the request's cell figures before its slots go."""
    kv = req.kv
    tokens = int(kv.kv_allocated_len)
    slots = tree_cache.req_to_token_pool.req_to_token[kv.req_pool_idx, :tokens]
    held = int(rt.store.cells_held(slots).sum()) if tokens else 0
    full = tokens * rt.store.config.entries_per_token
    setattr(req, FIGURES_ATTR, {  # a retracted request's figures are replaced when it is released again
        "removed_fraction": 1.0 - held / full if full else 0.0,
        "cells_held": held,
        "cells_full": full,
        "tokens": tokens,
    })  # fmt: skip
    if req.finished():
        count_request_end(rt, req)


def count_request_end(rt: runtime.KvzapRuntime, req) -> None:
    """``requests_finished`` counts every request the scheduler ends, once: through the output stream (finished,
    or aborted while it ran: released finished) or through ``send_abort_output`` (aborted while queued, part-way
    through a chunked prefill, or by ``retract_decode``), a path that releases first and never finishes the request."""
    if not getattr(req, ENDED_ATTR, False):
        setattr(req, ENDED_ATTR, True)
        rt.totals.requests_finished += 1


def count_scheduler_abort(original, self, abort_req, req, *args, **kwargs):
    """AROUND ``Scheduler.send_abort_output``: the requests the scheduler ends outside the output stream. They get
    no ``meta_info["kvzap"]`` (SGLang's abort message carries no customized info) but are counted."""
    rt = runtime.current()
    if rt is not None and req is not None:
        count_request_end(rt, req)
        metrics.update(rt)
    return original(self, abort_req, req, *args, **kwargs)


class KvzapOutputStreamer(SchedulerOutputStreamer):
    """Adds ``"kvzap"`` to the customized info of finished requests (one-element list; see module docstring)."""

    has_additional_customized_info = True

    def build_additional_customized_info(self, reqs) -> dict[str, list]:
        values = []
        for req in reqs:
            figures = getattr(req, FIGURES_ATTR, None) if req.finished() else None
            values.append([figures] if figures is not None else [])
        return {META_KEY: values}

    def is_request_level_customized_info_key(self, key: str) -> bool:
        return key == META_KEY or super().is_request_level_customized_info_key(key)


def unwrap_meta_info(original, self, meta_info, state, customized_info, index, finish_reason):
    """AROUND ``TokenizerManager.update_request_meta_info``: ``meta_info["kvzap"]`` is the request's dict, on its
    final output only (module docstring). Once, the hook turned SGLang's accumulated list into the dict in place: a
    stream with ``--incremental-streaming-output`` then sliced the dict (``TypeError``, and the server went down),
    and a cumulative stream sent ``"kvzap": []`` in every chunk before the last."""
    ours = customized_info.get(META_KEY) if customized_info else None
    if ours is not None:
        customized_info = {key: values for key, values in customized_info.items() if key != META_KEY}
    result = original(self, meta_info, state, customized_info, index, finish_reason)
    if ours is not None and ours[index]:
        meta_info[META_KEY] = ours[index][-1]
    return result


# ServerArgs fields SGLang 0.5.23's /server_info returns in plain text, and the flags that set them (its
# launch_command echoes argv). /server_info is open whenever no --api-key is set, which is the case with tenants
# (their keys replace it) — and tenants require --admin-api-key, so it would be served to every client.
SECRET_FIELDS = ("api_key", "admin_api_key", "ssl_keyfile_password")
_SECRET_FLAGS = re.compile(r"(--(?:admin-api-key|api-key|ssl-keyfile-password)(?:=|\s+))(\S+)")
# An Engine's launch_command is ``Engine(admin_api_key='…', …)``: the repr of each keyword argument's value.
_SECRET_KWARGS = re.compile(r"(\b(?:admin_api_key|api_key|ssl_keyfile_password)=)"
                            r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")
REDACTED = "<redacted>"


def redact_server_info_secrets(info, *args, **kwargs):
    """AFTER ``build_server_info`` (the body of ``/server_info``) and ``engine._server_args_for_logging`` (the
    ``server_args=…`` line every launch logs at INFO): SGLang's keys become ``<redacted>`` while KVzap is on. Stock
    SGLang served ``admin_api_key`` to anyone who could read ``/server_info``, and logged it (its own redaction covers
    the watermark keys only)."""
    if kvzap_enabled() and isinstance(info, dict):
        redact_secrets(info)
    return None


def redact_secrets(info: dict) -> None:
    """SGLang's keys in a server-args dict (``/server_info``'s body, a scheduler's internal state) → ``<redacted>``."""
    for name in SECRET_FIELDS:
        if info.get(name):
            info[name] = REDACTED
    if isinstance(info.get("launch_command"), str):
        command = _SECRET_FLAGS.sub(rf"\1{REDACTED}", info["launch_command"])
        info["launch_command"] = _SECRET_KWARGS.sub(rf"\1'{REDACTED}'", command)


def add_internal_state(original, self, *args, **kwargs):
    """AROUND ``Scheduler.get_internal_state``: server-wide KVzap totals under ``"kvzap"``, SGLang's keys redacted."""
    output = original(self, *args, **kwargs)
    redact_secrets(output.internal_state)  # it repeats the server args: /server_info's internal_states
    rt = runtime.current()
    if rt is not None:
        state = rt.snapshot()
        store = rt.store
        # Cells held by the prefix cache (radix tree), the allocator's idle self-checks run so far, and how often it
        # had the tree evict for virtual slots rather than cells.
        state["cells_cached"] = sum(store.group_cells[1:])
        state["slots_cached"] = sum(store.group_slots[1:])
        state["prefix_cache"] = type(self.tree_cache).__name__
        state["idle_checks"] = getattr(self.token_to_kv_pool_allocator, "idle_checks", 0)
        state["slot_reclaims"] = getattr(self.token_to_kv_pool_allocator, "slot_reclaims", 0)
        if rt.tenants is not None:
            from kvzap_sglang.plugin.tenants import snapshot as tenants_snapshot

            state["tenants"] = tenants_snapshot(rt.tenants, store)
        output.internal_state[META_KEY] = state
    return output


class _Metrics:
    """``kvzap_*`` prometheus gauges, created lazily in the scheduler when SGLang runs with ``--enable-metrics``."""

    def __init__(self) -> None:
        self._gauges = None
        self._updated_at = 0.0

    def update_at_most_every(self, rt: runtime.KvzapRuntime, seconds: float) -> None:
        if time.monotonic() - self._updated_at >= seconds:
            self.update(rt)

    def update(self, rt: runtime.KvzapRuntime) -> None:
        self._updated_at = time.monotonic()
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return  # metrics off: SGLang's /metrics reads the multiprocess directory only
        if self._gauges is None:
            from prometheus_client import Gauge

            names = {
                "cells_total": "KV cells (one (layer, KV head, token) entry each) in the KVzap store",
                "cells_in_use": "KV cells currently held by token slots",
                "entries_reserved": "Cells taken by token slots since start-up",
                "entries_pruned": "Cells freed by KVzap decisions since start-up",
                "removed_fraction": "entries_pruned / entries_reserved since start-up",
                "requests_finished": "Requests the scheduler ended (finished or aborted) with KVzap on",
            }
            self._gauges = {k: Gauge(f"kvzap_{k}", doc, multiprocess_mode="mostrecent") for k, doc in names.items()}
        snapshot = rt.snapshot()
        for key, gauge in self._gauges.items():
            gauge.set(float(snapshot[key]))
        if rt.tenants is not None:
            self.update_tenants(rt)

    def update_tenants(self, rt: runtime.KvzapRuntime) -> None:
        """Per-tenant ``kvzap_tenant_*`` gauges (label ``tenant``)."""
        from prometheus_client import Gauge

        from kvzap_sglang.plugin.tenants import snapshot as tenants_snapshot

        if getattr(self, "_tenant_gauges", None) is None:
            names = {
                "cells_held": "KV cells held by the tenant's live requests and cached prefixes",
                "budget_cells": "The tenant's KV budget in cells (-1: none)",
                "queued_requests": "The tenant's requests waiting for admission",
                "running_requests": "The tenant's requests admitted and not finished",
                "threshold": "The tenant's τ in use",
                "threshold_base": "The tenant's τ when it is not tightening before queueing",
                "tightenings": "Times the tenant's τ was raised before queueing (threshold_range)",
                "refused_requests": "The tenant's requests refused because their prompt alone exceeds its budget",
                "removed_fraction": "Entries pruned / entries written for the tenant since start-up",
            }
            self._tenant_gauges = {k: Gauge(f"kvzap_tenant_{k}", doc, ["tenant"], multiprocess_mode="mostrecent")
                                   for k, doc in names.items()}  # fmt: skip
        for tenant, figures in tenants_snapshot(rt.tenants, rt.store).items():
            for key, gauge in self._tenant_gauges.items():
                value = figures[key]
                gauge.labels(tenant=tenant).set(-1.0 if value is None else float(value))


metrics = _Metrics()
# Every slot free (finish, abort, retraction, over-allocated tail), request end and flush refreshes the gauges, so
# /metrics reads the idle figures once the server is idle (hooks.release, KvzapSlotAllocator.free/clear).
runtime.cells_released_listeners.append(metrics.update)
