"""Start-up side of the plugin: the ``--kvzap-*`` flags, ``sglang.Engine(kvzap_...=...)`` and fail-fast validation.

Runs in the launching process only. Whatever the entry point, ``prepare_launch`` validates the settings against the
served model (surrogate dims) and the server configuration KVzap supports, exports them for the spawned scheduler
(``settings.KVzapSettings.export``) and returns the ``ServerArgs`` values KVzap needs:

* ``radix_cache_backend="kvzap"`` — the prefix cache over pruned KV (``radix_cache.KvzapRadixCache``), unless the
  user switched the radix cache off (``--disable-radix-cache``); another radix-cache backend is refused;
* ``disable_overlap_schedule=True`` — with overlap, the scheduler frees finished requests' cells while the next
  forward writes and prunes cells in another thread; the cell store is single-threaded by design.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from kvzap_sglang.plugin.settings import (
    CALIBRATION_ENV_VARS,
    DEFAULT_SURROGATE,
    ENV_VARS,
    KVzapConfigError,
    KVzapSettings,
    ModelDims,
    clear_env,
    parse_threshold,
    parse_window,
    resolve_surrogate,
)
from kvzap_sglang.policy import DEFAULT_WINDOW

logger = logging.getLogger(__name__)

ENGINE_KWARGS = ("kvzap_threshold", "kvzap_surrogate", "kvzap_window", "kvzap_no_decode", "kvzap_tenants")
REQUIRED_SERVER_ARGS = {"disable_overlap_schedule": True}
RADIX_CACHE_BACKEND = "kvzap"  # radix_cache.BACKEND_NAME (not imported: that module imports SGLang's tree)


def prepare_launch(settings: KVzapSettings, server_values: dict[str, Any],
                   serves_http: bool = False) -> dict[str, Any]:
    """Validate ``settings`` for a server configured with ``server_values`` (ServerArgs field → value), export them,
    and return the ServerArgs overrides KVzap needs. ``serves_http``: the CLI's HTTP server (``sglang.Engine`` is
    not one), whose admin routes tenants need guarded (``refuse_open_admin_routes``).

    Raises:
        KVzapConfigError: with the reason, before any process is started.
    """
    device = server_values.get("device")
    if device not in (None, "cpu"):
        raise KVzapConfigError(f"KVzap's attention path runs on CPU in this version (device={device!r}); GPU: issue #7")
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        # SGLang 0.5.23 reads it when its modules load; without it the scheduler died on "No module named 'vllm'"
        # after the start-up had begun (review: the README's command, as written, did that).
        raise KVzapConfigError("KVzap serves on SGLang's CPU engine in this version: start with "
                               "SGLANG_USE_CPU_ENGINE=1 in the environment (SGLang reads it as it loads)")
    if server_values.get("attention_backend") not in (None, "torch_native"):
        raise KVzapConfigError(
            f"KVzap replaces the torch_native attention backend; got --attention-backend "
            f"{server_values.get('attention_backend')!r}"
        )
    if int(server_values.get("page_size") or 1) != 1:
        raise KVzapConfigError("KVzap frees single token entries and needs --page-size 1")
    if server_values.get("speculative_algorithm"):
        raise KVzapConfigError("KVzap does not support speculative decoding")
    if server_values.get("radix_cache_backend") not in (None, RADIX_CACHE_BACKEND):
        raise KVzapConfigError(
            f"KVzap brings its own prefix cache (--radix-cache-backend {RADIX_CACHE_BACKEND}); got "
            f"--radix-cache-backend {server_values.get('radix_cache_backend')!r}"
        )
    if server_values.get("enable_torch_compile"):
        # On CPU this flag turns on SGLang's CPU graph capture, which replays decode batches padded with request
        # row 0 through the attention backend: KVzap's per-request windows and compaction are not graph-safe.
        raise KVzapConfigError("KVzap does not support --enable-torch-compile (decode graph capture)")
    if server_values.get("enable_hierarchical_cache"):
        raise KVzapConfigError("KVzap does not support --enable-hierarchical-cache (HiCache reloads give new slot ids)")
    if server_values.get("dllm_algorithm"):
        # Diffusion LMs are admitted by SGLang's get_new_batch_dllm, past KVzap's admission (budgets, reopening).
        raise KVzapConfigError("KVzap does not support diffusion language models (--dllm-algorithm)")
    if server_values.get("is_embedding"):
        # One forward and no decode: nothing to prune for, and embedding requests skip init_req_max_new_tokens,
        # where tenants' budgets cap a request.
        raise KVzapConfigError("KVzap prunes the KV cache of generation; an embedding server (--is-embedding) has none")
    if server_values.get("enable_streaming_session"):
        # A streaming session keeps a finished turn's request row and its cells for the next turn (SGLang's
        # claim_kv_row, reachable with --disable-radix-cache): cells neither free nor held by the prefix cache, which
        # the idle check counts as a leak (measured: the scheduler stopped after one turn).
        raise KVzapConfigError("KVzap does not support --enable-streaming-session (session rows keep cells between "
                               "turns outside the prefix cache)")
    _refuse_unsupported_layouts(server_values)
    dims = ModelDims.from_model_path(server_values["model_path"]) if server_values.get("model_path") else None
    resolve_surrogate(settings.surrogate, dims)  # raises on unknown kind / mismatch
    tenants = settings.tenants_config()
    if tenants is not None and server_values.get("api_key"):
        raise KVzapConfigError("--kvzap-tenants brings per-tenant API keys; drop --api-key")
    if tenants is not None and serves_http:
        refuse_open_admin_routes(tenants, server_values.get("admin_api_key"))
    overrides = {**REQUIRED_SERVER_ARGS, "attention_backend": "torch_native"}
    if not server_values.get("disable_radix_cache"):
        overrides["radix_cache_backend"] = RADIX_CACHE_BACKEND
    logger.info("KVzap on (%s): setting %s", settings, overrides)
    settings.export()
    if tenants is not None:
        from kvzap_sglang.plugin.tenants import install_http_middleware

        # Tenant identity on the HTTP edge (an Engine's app never serves: its callers use engine_requests.generate_as);
        # the admin key unlocks per-tenant figures.
        install_http_middleware(tenants, server_values.get("admin_api_key"))
    return overrides


# Parallel layouts shard the KV heads, layers or requests over processes; KVzap's cell store, its runtime and the
# surrogate's per-(layer, KV head) scores are per process and unsharded. Checked before start-up: otherwise each rank
# would fail at its first forward (or prune the wrong heads).
PARALLEL_SIZES = {"tp_size": "--tp-size", "pp_size": "--pp-size", "dp_size": "--dp-size",
                  "attn_cp_size": "--attn-cp-size", "nnodes": "--nnodes"}  # fmt: skip
# KV dtypes the cells can hold as they are: quantised caches need per-cell scales the cell store does not keep.
PLAIN_KV_DTYPES = (None, "auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def _refuse_unsupported_layouts(server_values: dict[str, Any]) -> None:
    for field, flag in PARALLEL_SIZES.items():
        size = server_values.get(field)
        if size is not None and int(size) != 1:
            raise KVzapConfigError(f"KVzap runs on a single process in this version; got {flag} {size} "
                                   "(the cell store and its scores are not sharded)")  # fmt: skip
    if server_values.get("enable_dp_attention"):
        raise KVzapConfigError("KVzap does not support --enable-dp-attention (the cell store is not sharded)")
    if server_values.get("disaggregation_mode") not in (None, "null"):
        raise KVzapConfigError(
            f"KVzap does not support prefill/decode disaggregation (--disaggregation-mode "
            f"{server_values['disaggregation_mode']}): the transfer sends whole token slots, not cells"
        )
    if server_values.get("kv_cache_dtype") not in PLAIN_KV_DTYPES:
        raise KVzapConfigError(
            f"KVzap keeps K/V in the model's dtype; --kv-cache-dtype {server_values['kv_cache_dtype']} (a quantised "
            "cache) is not supported in this version"
        )


# ---------------------------------------------------------------------------- CLI (python -m sglang.launch_server)


def add_cli_args(original, parser: argparse.ArgumentParser):
    """AROUND ``ServerArgs.add_cli_args``: SGLang's flags, then KVzap's. Their values are read in ``from_cli_args``
    (one ``sglang: error:`` line); argparse's own error for a ``type=`` came after SGLang's ~490-line usage."""
    result = original(parser)
    group = parser.add_argument_group("KVzap (kvzap-sglang plugin)")
    group.add_argument("--kvzap-threshold", default=None, metavar="TAU",
                       help="Enable KVzap: drop KV entries whose surrogate log-score is < TAU outside the window.")
    group.add_argument("--kvzap-surrogate", default=None, metavar="linear|mlp|PATH",
                       help=f"Surrogate: the bundled linear/mlp checkpoint for the served model, or a folder "
                            f"(default {DEFAULT_SURROGATE}).")
    group.add_argument("--kvzap-window", default=None, metavar="N",
                       help=f"Most recent tokens per request that are never pruned (default {DEFAULT_WINDOW}).")
    group.add_argument("--kvzap-no-decode", action="store_true",
                       help="Do not score tokens generated during decode (they are kept).")
    group.add_argument("--kvzap-tenants", default=None, metavar="FILE",
                       help="Multi-tenant serving: per-tenant τ, window, KV budget and API keys (TOML).")  # fmt: skip
    return result


def refuse_flags_without_threshold(given: dict[str, Any], engine: bool = False) -> None:
    """KVzap's settings given without ``--kvzap-threshold`` (which switches it on) are a mistake, not something to
    drop: a tenants file whose API keys were silently ignored served every request unchecked. ``engine``: name them
    as ``sglang.Engine`` keyword arguments."""
    spell = (lambda key: f"kvzap_{key}") if engine else (lambda key: f"--kvzap-{key.replace('_', '-')}")
    names = [spell(key) for key, value in given.items() if value is not None]
    if names:
        fix = "kvzap_threshold=TAU" if engine else "--kvzap-threshold TAU"
        raise KVzapConfigError(f"{', '.join(names)} only apply with KVzap on: add {fix}")


def refuse_open_admin_routes(tenants, admin_key: str | None) -> None:
    """An HTTP server with tenants needs ``--admin-api-key``. Without any key SGLang serves its admin routes
    (``/abort_request``, ``/flush_cache``, ``/pause_generation``, weight and LoRA updates, ...) to every client, so
    one tenant could abort another's requests by id or flush every tenant's cached prefixes; ``--api-key`` is refused
    with tenants (their keys replace it), which left nothing guarding those routes. With an admin key they ask for
    ``Authorization: Bearer ADMIN_KEY`` and the generation routes stay the tenants'. (``sglang.Engine`` serves no
    HTTP: not checked there.) ``tenants``: the parsed tenants file."""
    if not admin_key:
        raise KVzapConfigError(
            "--kvzap-tenants needs --admin-api-key KEY: without one SGLang serves its admin routes (/abort_request, "
            "/flush_cache, /pause_generation, weight updates, ...) to every client, so a tenant could abort another "
            "tenant's requests or flush every tenant's cache"
        )
    if any(spec.api_key == admin_key for spec in tenants.specs().values()):
        raise KVzapConfigError("--admin-api-key must differ from every tenant's api_key (that tenant would be admin)")


def from_cli_args(original, cls, args: argparse.Namespace):
    """AROUND ``ServerArgs.from_cli_args``: validate and export the KVzap flags, apply KVzap's required values."""
    threshold = getattr(args, "kvzap_threshold", None)
    try:
        threshold = None if threshold is None else parse_threshold(threshold)
        window = None if args.kvzap_window is None else parse_window(args.kvzap_window)
        if threshold is None:  # no flag: the KVZAP_* environment (the documented config) decides
            refuse_flags_without_threshold({"surrogate": args.kvzap_surrogate, "window": window,
                                            "no_decode": args.kvzap_no_decode or None,
                                            "tenants": args.kvzap_tenants})  # fmt: skip
            settings = KVzapSettings.from_env()
            if settings is None:
                return original(cls, args)
        else:
            settings = KVzapSettings(threshold, args.kvzap_surrogate or DEFAULT_SURROGATE,
                                     DEFAULT_WINDOW if window is None else window,
                                     not args.kvzap_no_decode, args.kvzap_tenants)  # fmt: skip
        overrides = prepare_launch(settings, vars(args), serves_http=True)
    except KVzapConfigError as error:
        print(f"sglang: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for key, value in overrides.items():
        setattr(args, key, value)
    return original(cls, args)


# ---------------------------------------------------------------------------- sglang.Engine(**kwargs)


def make_server_args_factory(server_args_class):
    """A drop-in for ``Engine.server_args_class`` that accepts the ``kvzap_*`` keyword arguments.

    Without kvzap kwargs, the ``KVZAP_*`` environment decides (the documented config). ``kvzap_threshold=None``
    explicitly switches KVzap off.
    """

    def server_args_with_kvzap(**kwargs):
        given = {key: kwargs.pop(key) for key in ENGINE_KWARGS if key in kwargs}
        if given and given.get("kvzap_threshold") is None:
            refuse_flags_without_threshold({key.removeprefix("kvzap_"): value for key, value in given.items()
                                            if key != "kvzap_threshold" and value not in (None, False)},
                                           engine=True)  # fmt: skip
            clear_env()
            return server_args_class(**kwargs)
        if given:
            given = {key: value for key, value in given.items() if value is not None}  # None: unset, as a CLI flag
            settings = KVzapSettings(
                threshold=given["kvzap_threshold"],
                surrogate=given.get("kvzap_surrogate", DEFAULT_SURROGATE),
                window=given.get("kvzap_window", DEFAULT_WINDOW),
                score_decode=not given.get("kvzap_no_decode", False),
                tenants=given.get("kvzap_tenants"),
            )
        else:
            settings = KVzapSettings.from_env()
        if settings is not None:
            kwargs.update(prepare_launch(settings, kwargs))
        return server_args_class(**kwargs)

    server_args_with_kvzap.kvzap_wraps = server_args_class
    return server_args_with_kvzap


# KVZAP_* values the last Engine built with kvzap_* keywords wrote to os.environ: variable → (value before, value it
# set; None = absent). The environment is how an Engine's settings reach the processes it spawns.
_engine_exports: dict[str, tuple[str | None, str | None]] = {}


def scope_engine_env(server_args_factory):
    """The outermost ``Engine.server_args_class`` layer. What an Engine's ``kvzap_*`` keywords exported is that
    Engine's setting, not the process's environment: the next Engine built in this process first undoes it (each
    variable still holding the value the Engine set), so a plain ``sglang.Engine(...)`` after a KVzap one is stock
    again, and one after ``kvzap_threshold=None`` sees the user's own ``KVZAP_*`` again. An Engine still running
    keeps its settings: its processes read them when they were spawned, and its request checks when it was built
    (``prompt_checks.remember_whether_kvzap_is_on``)."""

    def server_args_in_engine_scope(**kwargs):
        undo_engine_exports()
        names = (*ENV_VARS, *CALIBRATION_ENV_VARS)
        before = {name: os.environ.get(name) for name in names}
        try:
            server_args = server_args_factory(**kwargs)
        except BaseException:
            _set_env(before)  # a constructor that failed starts nothing: its exports go with it
            raise
        if any(key.startswith("kvzap_") for key in kwargs):  # without them the user's environment config applied
            _engine_exports.update({name: (before[name], os.environ.get(name)) for name in names
                                    if os.environ.get(name) != before[name]})  # fmt: skip
        return server_args

    server_args_in_engine_scope.kvzap_env_scope_wraps = server_args_factory
    return server_args_in_engine_scope


def undo_engine_exports() -> None:
    """Put back the KVZAP_* variables an earlier Engine of this process exported (those nobody changed since)."""
    # A variable changed since holds the user's value now, and stays.
    _set_env({name: before for name, (before, exported) in _engine_exports.items() if os.environ.get(name) == exported})
    _engine_exports.clear()


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
