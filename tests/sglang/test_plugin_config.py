"""Start-up surface of the KVzap plugin: flags, Engine kwargs, env config and fail-fast validation (no engine runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvzap_sglang.plugin import launch, reporting
from kvzap_sglang.plugin.settings import ENV_VARS, KVzapConfigError, KVzapSettings


@pytest.fixture(autouse=True)
def clean_kvzap_env():
    saved = {k: os.environ.pop(k) for k in ENV_VARS if k in os.environ}
    yield
    for key in ENV_VARS:
        os.environ.pop(key, None)
    os.environ.update(saved)


@pytest.fixture(scope="module")
def server_args_with_kvzap():
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()  # the real entry point, as SGLang runs it
    return launch.make_server_args_factory(ServerArgs)


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvzap"]
    assert ep.value == "kvzap_sglang.plugin:register"


def test_engine_kwargs_are_validated_exported_and_force_required_args(server_args_with_kvzap, smollm2_path, head0_surrogate):
    args = server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", attention_backend="torch_native",
                                  kvzap_threshold=-4, kvzap_surrogate=str(head0_surrogate), kvzap_window=16,
                                  kvzap_no_decode=True, kv_cache_dtype="bf16", tp_size=1)  # fmt: skip
    assert args.disable_overlap_schedule is True and args.kv_cache_dtype == "bf16"
    assert args.disable_radix_cache is False and args.radix_cache_backend == "kvzap"  # prefix sharing stays on
    assert KVzapSettings.from_env() == KVzapSettings(-4.0, str(head0_surrogate), 16, score_decode=False)


def test_disable_radix_cache_is_respected_and_other_tree_backends_refused(server_args_with_kvzap, smollm2_path):
    args = server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=-4,
                                  disable_radix_cache=True)  # fmt: skip
    assert args.disable_radix_cache is True and args.radix_cache_backend is None
    for kwargs, message in ((dict(radix_cache_backend="flexkv"), "its own prefix cache"),
                            (dict(enable_hierarchical_cache=True), "hierarchical")):  # fmt: skip
        with pytest.raises(KVzapConfigError, match=message):
            server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=-4, **kwargs)


def test_off_by_default_leaves_server_args_and_env_untouched(server_args_with_kvzap, smollm2_path):
    args = server_args_with_kvzap(model_path=str(smollm2_path), device="cpu")
    assert args.disable_radix_cache is False
    assert KVzapSettings.from_env() is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kvzap_threshold="abc"), "threshold must be a number"),
        (dict(kvzap_threshold=float("nan")), "finite"),
        (dict(kvzap_threshold=-4, kvzap_window=-1), "window must be an integer in"),
        (dict(kvzap_threshold=-4, kvzap_surrogate="quadratic"), "linear|mlp"),
        (dict(kvzap_threshold=-4, kvzap_surrogate="linear", page_size=16), "page-size 1"),
        (dict(kvzap_threshold=-4, attention_backend="flashinfer"), "torch_native"),
        (dict(kvzap_threshold=-4, enable_torch_compile=True), "enable-torch-compile"),
        (dict(kvzap_threshold=-4, tp_size=2), "single process in this version; got --tp-size 2"),
        (dict(kvzap_threshold=-4, pp_size=2), "got --pp-size 2"),
        (dict(kvzap_threshold=-4, dp_size=2), "got --dp-size 2"),
        (dict(kvzap_threshold=-4, enable_dp_attention=True), "enable-dp-attention"),
        (dict(kvzap_threshold=-4, disaggregation_mode="prefill"), "disaggregation-mode prefill"),
        (dict(kvzap_threshold=-4, kv_cache_dtype="fp8_e4m3"), "kv-cache-dtype fp8_e4m3"),
        (dict(kvzap_threshold=-4, dllm_algorithm="LowConfidence"), "dllm-algorithm"),
        (dict(kvzap_threshold=-4, is_embedding=True), "is-embedding"),
        (dict(kvzap_threshold=-4, enable_streaming_session=True, disable_radix_cache=True), "streaming-session"),
    ],
)
def test_invalid_engine_settings_fail_before_anything_starts(server_args_with_kvzap, smollm2_path, head0_surrogate, kwargs, message):
    kwargs.setdefault("kvzap_surrogate", str(head0_surrogate))
    with pytest.raises(KVzapConfigError, match=message):
        server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", **kwargs)
    assert KVzapSettings.from_env() is None  # nothing exported for a child to pick up


def test_kvzap_keywords_without_a_threshold_are_refused(server_args_with_kvzap, smollm2_path):
    with pytest.raises(KVzapConfigError, match="^kvzap_tenants only apply with KVzap on: add kvzap_threshold=TAU"):
        server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_tenants="configs/tenants.example.toml")
    args = server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=None)
    assert KVzapSettings.from_env() is None and args.radix_cache_backend is None  # explicitly off: stock


def test_a_kvzap_keyword_set_to_none_means_its_default(server_args_with_kvzap, smollm2_path):
    """As an absent CLI flag does; ``kvzap_window=None`` was refused ("must be an integer ..., got None"), which broke
    wrappers that pass every option through (review)."""
    server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=-4, kvzap_surrogate=None,
                           kvzap_window=None, kvzap_no_decode=None, kvzap_tenants=None)  # fmt: skip
    assert KVzapSettings.from_env() == KVzapSettings(-4.0, "mlp", 128, score_decode=True)


def test_a_surrogate_folder_whose_weights_are_missing_or_corrupt_is_refused(server_args_with_kvzap, smollm2_path,
                                                                           head0_surrogate, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((head0_surrogate / "config.json").read_text())
    with pytest.raises(KVzapConfigError, match="model.safetensors does not exist"):
        server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=-4, kvzap_surrogate=str(broken))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KVzapConfigError, match="not a readable safetensors file"):
        server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=-4, kvzap_surrogate=str(broken))


def test_surrogate_of_another_model_is_rejected_with_both_shapes(server_args_with_kvzap, smollm2_path, tmp_path,
                                                                surrogate_factory):
    other = surrogate_factory(tmp_path / "other", [0.0, 1.0], num_layers=12, hidden=512)
    with pytest.raises(KVzapConfigError, match=r"\(12, 512, 2\) but the model has \(30, 576, 3\)"):
        server_args_with_kvzap(model_path=str(smollm2_path), device="cpu", kvzap_threshold=-4, kvzap_surrogate=str(other))


def test_engine_constructor_fails_fast_on_a_bad_setting(smollm2_path):
    import sglang

    with pytest.raises(KVzapConfigError, match="window"):
        sglang.Engine(model_path=str(smollm2_path), device="cpu", attention_backend="torch_native",
                      kvzap_threshold=-4, kvzap_window=-3)  # fmt: skip


def _launch_server(*flags: str, model_path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--device", "cpu",
           "--attention-backend", "torch_native", "--port", "1", *flags]  # fmt: skip
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kvzap-threshold", "abc"], "kvzap threshold must be a number, got 'abc'"),
        (["--kvzap-threshold", "-4", "--kvzap-window", "-1"], "kvzap window must be an integer in [0, 2147483647]"),
        (["--kvzap-threshold", "-4", "--kvzap-redis-url", "redis://127.0.0.1:6379/0", "--kvzap-sample-rate", "often"],
         "kvzap sample rate (--kvzap-sample-rate) must be a number, got 'often'"),
    ],
)
def test_real_cli_rejects_a_malformed_kvzap_value_with_one_line_and_exit_2(smollm2_path, flags, message):
    """argparse's own error for a bad value (type=) came after SGLang's whole usage text, ~490 lines (review)."""
    malformed = _launch_server(*flags, model_path=smollm2_path)
    assert malformed.returncode == 2
    assert f"sglang: error: {message}" in malformed.stderr
    assert "usage:" not in malformed.stderr and len(malformed.stderr.splitlines()) < 40, malformed.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KVZAP_THRESHOLD": "abc"}, "kvzap threshold must be a number, got 'abc'"),
        # The README's command lacked it: the scheduler then died on a missing vllm module after start-up began.
        ({"KVZAP_THRESHOLD": "-4", "SGLANG_USE_CPU_ENGINE": "0"},
         "KVzap serves on SGLang's CPU engine in this version: start with SGLANG_USE_CPU_ENGINE=1"),
        ({"KVZAP_THRESHOLD": "-4", "KVZAP_REDIS_URL": "redis://127.0.0.1:6379/0", "KVZAP_SAMPLE_RATE": "often"},
         "kvzap sample rate must be a number, got 'often'"),
    ],
)
def test_a_malformed_environment_is_one_clean_error_without_a_plugin_traceback(smollm2_path, env, message):
    refused = _launch_server(model_path=smollm2_path, env=env)
    assert refused.returncode == 2
    assert f"sglang: error: {message}" in refused.stderr
    # SGLang's load_plugins logs what register() raises with a traceback, before the launcher's own error.
    assert "Traceback" not in refused.stderr and "Failed to execute general plugin" not in refused.stderr


def _parse(*flags: str, model_path):
    """What `python -m sglang.launch_server` does before starting anything: load_plugins() + prepare_server_args."""
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", str(model_path), "--device", "cpu", "--attention-backend",
                                "torch_native", *flags])  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kvzap-threshold", "-4", "--kvzap-window", "-1"], "window must be an integer in [0, 2147483647]"),
        (["--kvzap-threshold", "-4", "--kvzap-window", "100000000000000000000"], "window must be an integer in"),
        (["--kvzap-threshold", "inf"], "finite"),
        (["--kvzap-threshold", "1e308"], "finite float32"),
        (["--kvzap-threshold", "-4", "--kvzap-surrogate", "quadratic"], "linear|mlp"),
        # Without --kvzap-threshold, KVzap's other flags were dropped: the tenants' API keys went unchecked.
        (["--kvzap-tenants", "configs/tenants.example.toml"], "--kvzap-tenants only apply with KVzap on"),
        (["--kvzap-window", "5", "--kvzap-no-decode"], "--kvzap-window, --kvzap-no-decode only apply with KVzap on"),
    ],
)
def test_cli_parse_rejects_bad_flags_with_exit_2(server_args_with_kvzap, smollm2_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        _parse(*flags, model_path=smollm2_path)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert KVzapSettings.from_env() is None


def test_tenants_on_an_http_server_need_an_admin_key_of_their_own(server_args_with_kvzap, smollm2_path, capsys):
    """Without any SGLang key its admin routes are open, and --api-key is refused with tenants: an anonymous
    /abort_request aborted a tenant's request by id and /flush_cache emptied every tenant's cache (review)."""
    from pathlib import Path

    example = str(Path(__file__).parents[2] / "configs" / "tenants.example.toml")
    tenants = ["--kvzap-threshold", "-4", "--kvzap-surrogate", "linear", "--kvzap-tenants", example]
    for extra, message in [([], "--kvzap-tenants needs --admin-api-key KEY"),
                           (["--admin-api-key", "change-me-acme-0001"], "must differ from every tenant's api_key")]:
        with pytest.raises(SystemExit) as exit_info:
            _parse(*tenants, *extra, model_path=smollm2_path)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert KVzapSettings.from_env() is None
    args = _parse(*tenants, "--admin-api-key", "operator-key-0001", model_path=smollm2_path)
    assert args.admin_api_key == "operator-key-0001" and KVzapSettings.from_env().tenants == example


def test_the_start_up_log_line_shows_no_key(server_args_with_kvzap, smollm2_path):
    """Every launch logs ``server_args={...}`` at INFO (SGLang's ``_server_args_for_logging``); it printed
    ``admin_api_key`` and ``api_key`` in plain text. It now carries ``/server_info``'s redaction, whose launch command
    covers an Engine's keyword arguments too."""
    from sglang.srt.entrypoints import engine

    args = _parse("--kvzap-threshold", "-4", "--admin-api-key", "operator-key-0002", "--api-key", "client-key-0002",
                  model_path=smollm2_path)  # fmt: skip
    logged = str(engine._server_args_for_logging(args))
    assert "operator-key-0002" not in logged and "client-key-0002" not in logged
    assert "'admin_api_key': '<redacted>'" in logged and "'api_key': '<redacted>'" in logged
    kwargs = {"launch_command": "Engine(model_path='m', admin_api_key='operator-key-0002', api_key=\"it's-0002\")"}
    reporting.redact_server_info_secrets(kwargs)
    assert kwargs["launch_command"] == "Engine(model_path='m', admin_api_key='<redacted>', api_key='<redacted>')"


def test_an_engine_built_after_a_kvzap_engine_is_stock_again(server_args_with_kvzap, smollm2_path, monkeypatch):
    """``sglang.Engine(kvzap_...=...)`` exports KVZAP_* for the processes it spawns. A plain ``sglang.Engine(...)``
    built later in the same process read them as the documented environment config and served with KVzap and its
    calibration loop on (review: the second Engine's meta_info carried KVzap figures)."""
    from sglang.srt.entrypoints.engine import Engine

    from kvzap_sglang.plugin.settings import CalibrationSettings

    build = Engine.server_args_class  # what sglang.Engine(**kwargs) calls first, every layer of KVzap's included
    base = dict(model_path=str(smollm2_path), device="cpu", attention_backend="torch_native")
    try:
        args = build(**base, kvzap_threshold=-4, kvzap_redis_url="redis://127.0.0.1:6379/0")
        assert args.radix_cache_backend == "kvzap" and CalibrationSettings.from_env() is not None
        args = build(**base)
        assert args.radix_cache_backend != "kvzap" and args.disable_overlap_schedule is False
        assert KVzapSettings.from_env() is None and CalibrationSettings.from_env() is None
        # The user's own KVZAP_* stay theirs: kvzap_threshold=None switches KVzap off for that Engine only.
        monkeypatch.setenv("KVZAP_THRESHOLD", "-2")
        build(**base, kvzap_threshold=None)
        assert KVzapSettings.from_env() is None
        assert build(**base).radix_cache_backend == "kvzap" and KVzapSettings.from_env().threshold == -2.0
    finally:
        launch.undo_engine_exports()


def test_cli_flags_enable_kvzap_and_are_exported(server_args_with_kvzap, smollm2_path, head0_surrogate):
    args = _parse("--kvzap-threshold", "-3.5", "--kvzap-surrogate", str(head0_surrogate), "--kvzap-no-decode",
                  model_path=smollm2_path)  # fmt: skip
    assert args.radix_cache_backend == "kvzap" and not args.disable_radix_cache
    assert KVzapSettings.from_env() == KVzapSettings(-3.5, str(head0_surrogate), 128, score_decode=False)


def test_the_no_decode_switch_in_the_environment_is_read_strictly():
    base = {"KVZAP_THRESHOLD": "-4"}
    assert KVzapSettings.from_env({**base, "KVZAP_NO_DECODE": "yes"}).score_decode is False
    assert KVzapSettings.from_env({**base, "KVZAP_NO_DECODE": "0"}).score_decode is True
    assert KVzapSettings.from_env(base).score_decode is True
    with pytest.raises(KVzapConfigError, match="KVZAP_NO_DECODE must be"):
        KVzapSettings.from_env({**base, "KVZAP_NO_DECODE": "sometimes"})


def test_cli_without_kvzap_flags_is_stock(server_args_with_kvzap, smollm2_path):
    args = _parse(model_path=smollm2_path)
    assert args.disable_radix_cache is False and KVzapSettings.from_env() is None


def test_cli_reads_the_documented_env_config(server_args_with_kvzap, smollm2_path, head0_surrogate, capsys):
    os.environ.update({"KVZAP_THRESHOLD": "-2", "KVZAP_SURROGATE": str(head0_surrogate)})
    assert _parse(model_path=smollm2_path).radix_cache_backend == "kvzap"
    os.environ["KVZAP_WINDOW"] = "-1"
    with pytest.raises(SystemExit) as exit_info:
        _parse(model_path=smollm2_path)
    assert exit_info.value.code == 2 and "window" in capsys.readouterr().err
