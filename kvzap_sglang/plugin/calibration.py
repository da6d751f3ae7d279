"""KVzap's side of calibration (issue #5): sampled score summaries go to Redis, the calibrated τ comes back live.

Start-up (launching process): ``--kvzap-redis-url`` & co. (``sglang.Engine(kvzap_redis_url=...)``, or the
``KVZAP_*`` variables of ``settings.CalibrationSettings``) are validated next to KVzap's own settings and exported
for the spawned scheduler; a malformed value stops the launch (CLI: exit 2) before any process starts.

Scheduler process, when KVzap is on and a Redis URL is configured:

* pool built (AFTER ``KVCacheConfigurator._build_mha_kv_pool``, registered after KVzap's own hook so the runtime
  exists): a ``SampleSink`` (ships batches with ``SampleStore.ingest`` from its own thread, under the retention
  limits the calibration service published in Redis: ``SampleStore.publish_limits``) and a
  ``ThresholdWatcher`` (polls the τ stored for (model, task), keeps the last known τ when Redis is away) start;
* request finished (BEFORE ``release_kv_cache``, while its slots still hold their scores): for a sampled request
  the per-entry scores ``[L, H, T]`` are summarised (``calibrator.summarize``, the plugin's window) and offered to
  the sink — a non-blocking put; Redis is only touched by the sink's thread;
* between forwards (BEFORE ``Scheduler.get_next_batch_to_run``, so admission matches prefixes at it too, and in
  ``get_internal_state``): the watcher's τ, if it differs, becomes the runtime's τ (``KvzapRuntime.set_threshold``).
  Never inside a forward: every layer of one forward decides with the same τ. A request straddling a change has its
  earlier window exits judged with the old τ and its later ones with the new τ (each entry is judged once, paper
  Algorithm 1).
* ``/server_info``: ``internal_states[0]["kvzap_calibration"]`` (τ, its source, watcher and sink counters).

With ``--kvzap-tenants``, each summary is filed under its request's tenant and every configured tenant has its own
watcher: the service's τ for (model, task, tenant) becomes that tenant's τ (a (model, task) τ only reaches tenants
whose τ the tenants file leaves open). Without tenants, every summary's tenant is ``"default"`` (a bare
``extra_key`` is a cache-isolation salt that may be per user, which would open one Redis series per user), and the
server's τ is the one stored for (model, task, ``default``) — the series its samples land in — else (model, task)'s.

A τ is applied only from a valid record (``ThresholdRecord``: a strict number within ±``TAU_LIMIT``); an invalid one
is logged once and shown in ``/server_info`` (``stored_record_error``) while the τ in use is kept.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvzap_sglang.plugin import runtime
from kvzap_sglang.plugin.settings import (
    ENV_THRESHOLD,
    CalibrationSettings,
    KVzapConfigError,
    KVzapSettings,
    clear_calibration_env,
    parse_number,
    read_at_plugin_load,
)

if TYPE_CHECKING:
    from calibrator.sink import SampleSink
    from calibrator.watcher import ThresholdWatcher

logger = logging.getLogger(__name__)

META_KEY = "kvzap_calibration"
DEFAULT_TENANT = "default"
# CalibrationSettings field → flag / Engine keyword ``kvzap_<field>``.
FIELDS = ("redis_url", "redis_prefix", "sample_rate", "task", "model_id", "tau_poll_s")


# ---------------------------------------------------------------------------- start-up (launching process)


def default_model_id(model_path: str | os.PathLike | None) -> str:
    """The served model folder's basename (``smollm2-135m`` for the embedded model's converted folder)."""
    from calibrator.summary import MODEL_PATTERN

    name = Path(str(model_path or "")).name
    if not re.fullmatch(MODEL_PATTERN, name):
        raise KVzapConfigError(
            f"cannot derive a calibration model id from the model path {str(model_path)!r}; pass --kvzap-model-id"
        )
    return name


def launch_settings(kvzap_on: bool, given: dict, model_path) -> CalibrationSettings | None:
    """The calibration settings a launch will export (flags/kwargs in ``given`` over the environment), or ``None``.

    Raises:
        KVzapConfigError: a malformed value, calibration options without KVzap or without a Redis URL.
    """
    given = {key: value for key, value in given.items() if value is not None}
    if not kvzap_on:
        if given:
            names = ", ".join(f"--kvzap-{key.replace('_', '-')}" for key in given)
            raise KVzapConfigError(f"{names} only apply with KVzap on (--kvzap-threshold)")
        return None  # KVZAP_REDIS_URL alone may be the calibration service's setting: not ours to judge
    settings = CalibrationSettings.from_env(**given)
    if settings is None:
        if given:
            names = ", ".join(f"--kvzap-{key.replace('_', '-')}" for key in given)
            raise KVzapConfigError(f"{names} need a calibration Redis: add --kvzap-redis-url redis://HOST:PORT/DB")
        return None
    _require_redis_client()
    if settings.model_id is None:
        settings = replace(settings, model_id=default_model_id(model_path))
    return settings


def _require_redis_client() -> None:
    """redis-py comes with the ``service`` extra; without it every scheduler stopped at start-up on an ImportError
    traceback. Checked in the launching process, so the launch fails fast with the fix instead."""
    if importlib.util.find_spec("redis") is None:
        raise KVzapConfigError("--kvzap-redis-url needs the redis package (redis-py): "
                               "pip install 'kvzap-sglang[service]'")


def export(settings: CalibrationSettings) -> None:
    clear_calibration_env()
    os.environ.update(settings.to_env())


def add_cli_args(result, parser: argparse.ArgumentParser):
    """AFTER ``ServerArgs.add_cli_args``: the calibration flags (all default to None = "not given")."""
    group = parser.add_argument_group("KVzap calibration (kvzap-sglang plugin; needs --kvzap-threshold)")
    group.add_argument("--kvzap-redis-url", default=None, metavar="URL",
                       help="Redis of the calibration service: sample score summaries there and follow the τ stored "
                            "for (model, task). Env: KVZAP_REDIS_URL.")
    group.add_argument("--kvzap-redis-prefix", default=None, metavar="PREFIX",
                       help="Key prefix shared with the service (default kvzap:).")
    # Numbers are read in check_cli_args, not by argparse (type=): its error came after SGLang's ~490-line usage.
    group.add_argument("--kvzap-sample-rate", default=None, metavar="P",
                       help="Fraction of finished requests whose score summary is sampled (default 0.25; 0 = none).")
    group.add_argument("--kvzap-task", default=None, metavar="LABEL", help="Task label of this server's traffic.")
    group.add_argument("--kvzap-model-id", default=None, metavar="ID",
                       help="Model id for calibration (default: basename of --model-path).")
    group.add_argument("--kvzap-tau-poll-s", default=None, metavar="S",
                       help="Seconds between polls of the stored τ (default 2).")  # fmt: skip
    return result


def check_cli_args(cls, args: argparse.Namespace):
    """BEFORE ``ServerArgs.from_cli_args``: validate and export the calibration flags (exit 2 on a bad one)."""
    given = {name: getattr(args, f"kvzap_{name}", None) for name in FIELDS}
    try:
        given["sample_rate"] = parse_number(given.get("sample_rate"), "sample rate (--kvzap-sample-rate)")
        given["tau_poll_s"] = parse_number(given.get("tau_poll_s"), "tau poll interval (--kvzap-tau-poll-s)")
        kvzap_on = getattr(args, "kvzap_threshold", None) is not None or bool(os.environ.get(ENV_THRESHOLD, "").strip())
        settings = launch_settings(kvzap_on, given, args.model_path)  # no flag: the KVZAP_* env decides, as in launch
    except KVzapConfigError as error:
        print(f"sglang: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings is not None:
        export(settings)
    return None


def wrap_server_args_factory(server_args_factory):
    """``Engine.server_args_class`` accepting ``kvzap_redis_url=...`` & co. on top of KVzap's own keywords."""
    from kvzap_sglang.plugin.launch import ENGINE_KWARGS

    def server_args_with_calibration(**kwargs):
        given = {name: kwargs.pop(f"kvzap_{name}") for name in FIELDS if f"kvzap_{name}" in kwargs}
        if any(key in kwargs for key in ENGINE_KWARGS):  # the same rule as launch.make_server_args_factory
            kvzap_on = kwargs.get("kvzap_threshold") is not None
        else:
            kvzap_on = bool(os.environ.get(ENV_THRESHOLD, "").strip())
        settings = launch_settings(kvzap_on, given, kwargs.get("model_path"))  # raises before anything is exported
        server_args = server_args_factory(**kwargs)
        if settings is not None:
            export(settings)
        return server_args

    server_args_with_calibration.kvzap_calibration_wraps = server_args_factory
    return server_args_with_calibration


# ---------------------------------------------------------------------------- scheduler process


@dataclass
class CalibrationLink:
    """One per scheduler process: the sink of sampled summaries and the watcher of τ."""

    settings: CalibrationSettings
    model_id: str
    sink: SampleSink
    watcher: ThresholdWatcher
    tau_changes: int = 0
    sample_errors: int = 0
    initial_tau: float | None = None
    last_error: str | None = field(default=None, repr=False)
    tenant_watchers: dict = field(default_factory=dict)  # tenant name → ThresholdWatcher (--kvzap-tenants)
    fixed_tau_tenants: frozenset = frozenset()  # tenants whose τ the tenants file sets
    applied_records: dict = field(default_factory=dict)  # tenant name → the last ThresholdRecord applied
    refused_record: object = field(default=None, repr=False)  # the last record whose τ the runtime refused

    @classmethod
    def start(cls, settings: CalibrationSettings, model_id: str, initial_tau: float) -> CalibrationLink:
        from calibrator.sample_store import SampleStore
        from calibrator.series import connect
        from calibrator.sink import SampleSink
        from calibrator.threshold_store import ThresholdStore
        from calibrator.watcher import ThresholdWatcher

        client = connect(settings.redis_url)  # connects lazily; fails fast (no retries) when Redis is down
        sink = SampleSink(SampleStore(client, settings.redis_prefix).ingest, sample_fraction=settings.sample_rate)
        watcher = ThresholdWatcher(
            ThresholdStore(client, settings.redis_prefix), model_id, settings.task, DEFAULT_TENANT,
            poll_interval_s=settings.tau_poll_s,
        ).start()  # one synchronous poll: a τ already stored applies from the first forward
        atexit.register(sink.close, 1.0)
        logger.info(
            "KVzap calibration: model=%s task=%s sample_rate=%s, τ polled every %ss (stored τ: %s)",
            model_id, settings.task, settings.sample_rate, settings.tau_poll_s, watcher.tau,
        )  # fmt: skip
        link = cls(settings, model_id, sink, watcher, initial_tau=initial_tau)
        tenants = tenants_config()
        if tenants is not None:
            store = ThresholdStore(client, settings.redis_prefix)
            # Every tenant, ``default`` included: each resolves its own (model, task, tenant) τ, else (model, task)'s.
            link.tenant_watchers = {
                name: ThresholdWatcher(store, model_id, settings.task, name, poll_interval_s=settings.tau_poll_s).start()
                for name in tenants.specs()
            }  # fmt: skip
            link.fixed_tau_tenants = frozenset(n for n, spec in tenants.specs().items() if spec.threshold is not None)
        return link

    def apply_tau(self, rt: runtime.KvzapRuntime) -> None:
        """Make the watcher's τ the runtime's τ (scheduler thread, between forwards). With tenants, the tenant
        watchers (``apply_tenant_taus``) decide every τ, the default tenant's too: a (model, task) τ must not
        replace a τ the tenants file sets for ``[default]``."""
        if self.tenant_watchers:
            return
        tau = self.watcher.tau  # one attribute read: the watcher thread replaces it atomically
        if tau is None or tau == rt.settings.threshold:
            return
        old = rt.settings.threshold
        record = self.watcher.record
        if not self._applied(lambda: rt.set_threshold(tau), record):
            return
        self.tau_changes += 1
        logger.info(
            "KVzap τ %s -> %s for %s/%s (%s%s)", old, tau, self.model_id, self.settings.task,
            getattr(record, "source", "?"),
            f", target removed fraction {record.target_ratio}" if getattr(record, "target_ratio", None) is not None else "",
        )  # fmt: skip

    def apply_tenant_taus(self, rt: runtime.KvzapRuntime) -> None:
        """Each tenant watcher's τ becomes its tenant's τ (scheduler thread, between forwards)."""
        if rt.tenants is None:
            return
        for name, watcher in self.tenant_watchers.items():
            record = watcher.record  # one attribute read: the watcher thread replaces it atomically
            # Applied once per new record: comparing with the tenant's τ in use would apply it again every step
            # while that τ differs (kept inside threshold_range, or tightened before queueing).
            if record is None or self.applied_records.get(name) == record:
                continue
            self.applied_records[name] = record
            if record.tenant != name and name in self.fixed_tau_tenants:
                continue  # only the tenant's own record overrides a τ the tenants file sets
            if not self._applied(lambda: rt.set_tenant_threshold(name, record.tau), record):
                continue
            self.tau_changes += 1
            logger.info("KVzap τ of tenant %s -> %s (%s)", name, record.tau, record.source)

    def _applied(self, apply, record) -> bool:
        """Run ``apply`` (a τ change on the scheduler thread); a τ the runtime refuses is logged once per record and
        skipped, never raised: it would stop the scheduler, and again at every restart while the record stays."""
        try:
            apply()
        except KVzapConfigError as error:
            if self.refused_record is not record:
                self.refused_record = record
                self.last_error = f"τ record refused: {error}"
                logger.warning("KVzap: not applying the stored τ (%s): %s", getattr(record, "series", "?"), error)
            return False
        return True

    def sample(self, req, tree_cache, rt: runtime.KvzapRuntime) -> None:
        """Summarise a finished request's scores and hand the summary to the sink (never blocks on Redis)."""
        import torch
        from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        from calibrator.summary import summary_from_counts

        if not req.finished() or isinstance(req.finished_reason, FINISH_ABORT):
            return  # retracted or aborted: its scores are not a finished request's traffic
        if str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):
            return  # /health's 1-token probes are not traffic
        kv = getattr(req, "kv", None)
        if kv is None or not kv.holds_kv or kv.req_pool_idx is None or not self.sink.wants(req.rid):
            return
        tokens = int(kv.kv_allocated_len)  # the same count as meta_info["kvzap"]["tokens"]
        if tokens == 0:
            return  # a row without KV: no removed fraction (0/0), and the calibrator refuses num_tokens=0
        slots = tree_cache.req_to_token_pool.req_to_token[kv.req_pool_idx, :tokens]
        scores = rt.store.slot_scores.index_select(0, slots.to(device=rt.store.device, dtype=torch.int64))  # [T, L, H]
        tenant, window = DEFAULT_TENANT, rt.settings.window
        if rt.tenants is not None:  # the tenant the request ran as, at the window its entries were decided with
            t = rt.tenants.index_of_request(req)
            tenant, window = rt.tenants.names[t], rt.tenants.windows[t]
        eligible = scores[: max(tokens - window, 0)]  # [T - window, L, H]: the entries outside the request's window
        summary = summary_from_counts(bucket_counts(eligible), scores.shape[1], scores.shape[2], tokens, window,
                                      model=self.model_id, task=self.settings.task, tenant=tenant)  # fmt: skip
        self.sink.offer(summary)

    def snapshot(self, rt: runtime.KvzapRuntime | None) -> dict:
        watcher, record = self.watcher, self.watcher.record
        return {
            "model": self.model_id,
            "task": self.settings.task,
            "sample_rate": self.settings.sample_rate,
            "tau": None if rt is None else rt.settings.threshold,
            "tau_source": "start-up" if record is None else record.source,
            "tau_initial": self.initial_tau,
            "tau_changes": self.tau_changes,
            "stored_tau": watcher.tau,
            "redis_poll_failures": watcher.failures,
            "redis_last_error": watcher.last_error,
            "redis_last_success_at": watcher.last_success_at,
            "stored_record_error": watcher.unreadable,
            "samples": asdict(self.sink.counters) | {"errors": self.sample_errors, "last_error": self.last_error},
        } | ({"tenants": {name: _watcher_state(w) for name, w in self.tenant_watchers.items()}}
             if self.tenant_watchers else {})  # fmt: skip


def bucket_counts(scores):
    """``[NUM_BUCKETS]`` int64 histogram of ``scores`` (any shape, float32 or bf16, on the store's device) in the
    calibrator's bin layout: exactly what ``calibrator.summary.summarize`` counts with numpy, counted with torch where
    the scores are. This runs on the scheduler thread for every sampled request; the numpy path (a float64 copy and
    a binary search per entry) took 136 ms at 32k tokens × 90 (layer, head) entries (``benchmarks/summary_cost.py``).

    The layout is two regular grids (1/8 below -16, 1/16 up to 16: ``calibrator/bins.py``), so an entry's bucket
    ``#{edges <= s}`` is arithmetic; float32 rounding can put it one off near an edge, which one comparison with the
    edge on each side corrects (every edge is exact in float32)."""
    import torch

    from calibrator import bins

    values = scores.reshape(-1).float()
    unscored = torch.isnan(values)  # kept, never removed: the overflow bucket
    values = values.masked_fill(unscored, 0.0)
    grid = torch.where(values < bins.FINE_START, (values - bins.COARSE_START) / bins.COARSE_STEP,
                         (values - bins.FINE_START) / bins.FINE_STEP + bins.NUM_COARSE_EDGES)  # fmt: skip
    count = (grid.floor() + 1).clamp(0, bins.NUM_EDGES).long()  # ≈ #{edges <= s}: the grid index of s, plus 1
    bounds = torch.empty(bins.NUM_EDGES + 2, dtype=torch.float32, device=values.device)
    bounds[0], bounds[-1] = float("-inf"), float("nan")  # bounds[i] = EDGES[i - 1]; NaN compares false
    bounds[1:-1] = torch.tensor(bins.EDGES, dtype=torch.float32)
    count -= (bounds[count] > values).long()  # one too many: the edge below it lies above s
    count += (bounds[count + 1] <= values).long()  # one too few: the next edge is <= s
    count = count.masked_fill(unscored, bins.OVERFLOW_BUCKET)
    return torch.bincount(count, minlength=bins.NUM_BUCKETS).cpu().numpy()


def _watcher_state(watcher) -> dict:
    """A tenant watcher's view (with tenants, these decide every τ; the (model, task) figures above do not)."""
    record = watcher.record
    return {
        "stored_tau": watcher.tau,
        "source": None if record is None else record.source,
        "record_tenant": None if record is None else record.tenant,
        "redis_poll_failures": watcher.failures,
        "redis_last_error": watcher.last_error,
        "stored_record_error": watcher.unreadable,
    }


_link: CalibrationLink | None = None


def tenants_config():
    settings = KVzapSettings.from_env()
    return None if settings is None else settings.tenants_config()


def current() -> CalibrationLink | None:
    return _link


def start_after_pool_built(pool, configurator, *args, **kwargs):
    """AFTER ``KVCacheConfigurator._build_mha_kv_pool``: KVzap's runtime now exists; start sink and watcher."""
    global _link
    rt = runtime.current()
    settings = CalibrationSettings.from_env()
    if rt is None or settings is None or _link is not None:
        return None
    model_id = settings.model_id or default_model_id(configurator.model_config.model_path)
    _link = CalibrationLink.start(settings, model_id, rt.settings.threshold)
    _link.apply_tau(rt)
    return None


def sample_before_release(req, tree_cache, *args, **kwargs):
    """BEFORE ``release_kv_cache(req, tree_cache, *, checkpoint)``: the request's scores are still in its slots."""
    link, rt = _link, runtime.current()
    if link is not None and rt is not None:
        try:
            link.sample(req, tree_cache, rt)
        except Exception as error:  # noqa: BLE001 — sampling must never stop a release (that would leak cells)
            link.sample_errors += 1
            link.last_error = f"{type(error).__name__}: {error}"
            logger.warning("KVzap: could not sample request %s: %s", getattr(req, "rid", "?"), error)
    return None


def apply_tau_before_batch(*args, **kwargs):
    """BEFORE ``Scheduler.get_next_batch_to_run``: a τ seen by the watcher applies from this scheduler step on —
    to the admission's prefix matches (whose back-off reads the τ) as well as to the forward that follows."""
    link, rt = _link, runtime.current()
    if link is not None and rt is not None:
        link.apply_tau(rt)
        link.apply_tenant_taus(rt)
    return None


def add_internal_state(output, *args, **kwargs):
    """AFTER ``Scheduler.get_internal_state``: calibration state under ``"kvzap_calibration"``."""
    link, rt = _link, runtime.current()
    if link is not None:
        if rt is not None:
            link.apply_tau(rt)  # also between forwards: /server_info shows the τ the next forward uses
            link.apply_tenant_taus(rt)
        output.internal_state[META_KEY] = link.snapshot(rt)
    return None


# ---------------------------------------------------------------------------- registration


def register(HookRegistry, HookType) -> None:
    """Install the calibration flags/kwargs in every process, and the serving hooks where KVzap and a Redis URL are
    configured. Called once per process by ``kvzap_sglang.plugin.register`` after KVzap's own hooks (so these wrap
    them: the pool hook sees the installed runtime, the release hook runs before KVzap's release accounting)."""
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", check_cli_args, HookType.BEFORE)
    from sglang.srt.entrypoints import engine as engine_module

    if not hasattr(engine_module.Engine.server_args_class, "kvzap_calibration_wraps"):
        engine_module.Engine.server_args_class = staticmethod(
            wrap_server_args_factory(engine_module.Engine.server_args_class)
        )
    if read_at_plugin_load(KVzapSettings.from_env) is None or read_at_plugin_load(CalibrationSettings.from_env) is None:
        return
    register_serving_hooks(HookRegistry, HookType)


def register_serving_hooks(HookRegistry, HookType) -> None:
    """The scheduler-side sampler and τ watcher (processes where KVzap and a Redis URL are configured)."""
    configurator = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
    HookRegistry.register(f"{configurator}._build_mha_kv_pool", start_after_pool_built, HookType.AFTER)
    HookRegistry.register("sglang.srt.mem_cache.common.release_kv_cache", sample_before_release, HookType.BEFORE)
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run", apply_tau_before_batch, HookType.BEFORE
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state", add_internal_state, HookType.AFTER
    )
