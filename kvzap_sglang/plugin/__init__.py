"""The SGLang adapter: the only package of kvzap-sglang that imports SGLang.

``register()`` is the ``sglang.srt.plugins`` entry point ``kvzap``; SGLang runs it in every process it starts
(launcher, scheduler, detokenizer), before building ``ServerArgs`` and models. It always installs the start-up
surface (``--kvzap-*`` flags, ``sglang.Engine(kvzap_...=...)``, the ``meta_info`` unwrapping), which does nothing
while KVzap is off. The serving hooks (cell pool, scoring, attention backend, per-request figures) are installed
only in processes whose environment says KVzap is on (``settings.KVzapSettings.from_env``), so a server without
``--kvzap-threshold`` runs stock SGLang code paths.

Modules: ``settings`` (flags/env/validation), ``launch`` (CLI + Engine + fail-fast checks), ``cell_pool`` (KV pool
and slot allocator on the cell store), ``runtime`` (per-process state, scoring + DMS decisions), ``hooks`` (pool
builder and attention-layer seams), ``attention_backend`` (torch attention over cells), ``radix_cache`` (prefix
sharing of pruned KV, radix-cache backend ``kvzap``), ``reporting`` (meta_info, /server_info, /metrics), ``seams``
(a scheduler refuses to serve when SGLang did not apply one of KVzap's hooks).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Entry point of group ``sglang.srt.plugins`` (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from kvzap_sglang.plugin import launch
    from kvzap_sglang.plugin.settings import KVzapSettings, read_at_plugin_load

    if "kvzap_torch" not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append("kvzap_torch")  # add_attention_backend_choices; once per process
    _register_startup_hooks(HookRegistry, HookType)
    # Imported here, not looked up: load_plugins() may run before the first Engine is built (then the Engine's own
    # load_plugins() call is a no-op and could not patch it any more).
    from sglang.srt.entrypoints import engine as engine_module

    if not hasattr(engine_module.Engine.server_args_class, "kvzap_wraps"):
        # Engine's documented override point for its ServerArgs class; accepts the kvzap_* keyword arguments.
        engine_module.Engine.server_args_class = staticmethod(
            launch.make_server_args_factory(engine_module.Engine.server_args_class)
        )

    settings = read_at_plugin_load(KVzapSettings.from_env)
    if settings is not None:
        try:
            _register_serving_hooks(HookRegistry, HookType)
        except Exception as error:  # SGLang's load_plugins logs and goes on; the scheduler must not (plugin.seams)
            from kvzap_sglang.plugin import seams

            seams.record_registration_error(error)
            raise
    from kvzap_sglang.plugin import calibration  # last: its hooks wrap KVzap's (calibration.register docstring)

    calibration.register(HookRegistry, HookType)
    if not hasattr(engine_module.Engine.server_args_class, "kvzap_env_scope_wraps"):
        # Outermost: an earlier Engine's exported KVZAP_* must be undone before any layer reads the environment.
        engine_module.Engine.server_args_class = staticmethod(
            launch.scope_engine_env(engine_module.Engine.server_args_class)
        )


def _register_startup_hooks(HookRegistry, HookType) -> None:
    """The start-up surface, in every process: ``--kvzap-*`` flags, the ``meta_info`` unwrapping and the prompt
    checks of the HTTP process."""
    from kvzap_sglang.plugin import launch, prompt_checks, reporting

    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", launch.add_cli_args, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", launch.from_cli_args, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
        reporting.unwrap_meta_info,
        HookType.AROUND,
    )
    HookRegistry.register(  # HTTP process: /server_info never shows SGLang's keys while KVzap is on
        "sglang.srt.utils.common.build_server_info", reporting.redact_server_info_secrets, HookType.AFTER
    )
    HookRegistry.register(  # the launch's INFO line ``server_args={...}`` printed admin_api_key in plain text
        "sglang.srt.entrypoints.engine._server_args_for_logging", reporting.redact_server_info_secrets, HookType.AFTER
    )
    HookRegistry.register(  # HTTP process; checks only while KVzap is on (the launcher exports its settings)
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        prompt_checks.refuse_crashing_prompts,
        HookType.AROUND,
    )
    HookRegistry.register(  # ... as it was when this server or Engine was built
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__",
        prompt_checks.remember_whether_kvzap_is_on,
        HookType.AFTER,
    )


def _register_serving_hooks(HookRegistry, HookType) -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from kvzap_sglang.plugin import hooks, reporting, tenants
    from kvzap_sglang.plugin.attention_backend import create_kvzap_torch_backend

    configurator = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
    HookRegistry.register(f"{configurator}._build_mha_kv_pool", hooks.build_mha_kv_pool, HookType.AROUND)
    HookRegistry.register(f"{configurator}._build_token_to_kv_pool_allocator", hooks.build_allocator, HookType.AROUND)
    for target in hooks.ATTENTION_MODULES:
        HookRegistry.register(target, hooks.score_after_attention, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.common.release_kv_cache", hooks.release, HookType.AROUND)
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer",
        reporting.KvzapOutputStreamer,
        HookType.REPLACE,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state", reporting.add_internal_state, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.send_abort_output", reporting.count_scheduler_abort, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", hooks.admission, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens", tenants.cap_to_budget, HookType.AROUND
    )
    # KVzap on + CPU: the torch_native choice (required at launch) is served by the cell-store backend.
    register_attention_backend("kvzap_torch")(create_kvzap_torch_backend)
    register_attention_backend("torch_native")(create_kvzap_torch_backend)
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from kvzap_sglang.plugin.radix_cache import BACKEND_NAME, create_kvzap_radix_cache

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, create_kvzap_radix_cache)
