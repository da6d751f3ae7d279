"""Tenants file and request identity rules (kvzap_sglang.tenants): who a request runs as, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvzap_sglang.tenants import (
    DEFAULT_TENANT,
    TenantAuthError,
    TenantsConfig,
    TenantsConfigError,
    cache_namespace,
    extra_key_for,
    tenant_of_extra_key,
)

EXAMPLE = Path(__file__).parents[2] / "configs" / "tenants.example.toml"


def test_the_example_file_loads_with_default_first():
    config = TenantsConfig.load(EXAMPLE)
    assert config.names() == [DEFAULT_TENANT, "acme", "globex"]
    assert config.tenants["globex"].threshold == -4.0 and config.keys_configured


@pytest.mark.parametrize(
    "text, message",
    [
        ("[tenants.acme]\nkv_budget_tokens = 0\n", "greater than or equal to 1"),
        ("[tenants.acme]\nwindow = -1\n", "greater than or equal to 0"),
        ("[tenants.acme]\nthreshold = nan\n", "finite"),
        ('[tenants."bad name"]\n', "must match"),
        ("[tenants.default]\n", "must match"),
        ("[tenants.acme]\nbudget = 3\n", "Extra inputs"),
        ('[tenants.a]\napi_key = "same-key-1"\n[tenants.b]\napi_key = "same-key-1"\n', "share an api_key"),
        ("[tenants.acme\n", "tenants file"),
        ("[tenants.acme]\nkv_budget_tokens = 9\nthreshold_range = [1.0, 0.0]\n", "min <= max"),
        ("[tenants.acme]\nkv_budget_tokens = 9\nthreshold_range = [0.0, inf]\n", "finite"),
        ("[tenants.acme]\nthreshold_range = [-4.0, -2.0]\n", "needs a kv_budget_tokens"),
        ("[tenants.acme]\nkv_budget_tokens = 9\nthreshold = -5.0\nthreshold_range = [-4.0, -2.0]\n", "outside"),
        ("[tenants.acme]\nkv_budget_tokens = 9\nthreshold_range = [-4.0]\n", "threshold_range"),
        ('[tenants.acme]\nprefix_cache_group = "no spaces"\n', "should match pattern"),
        # Strict types: a string, boolean or quoted number is a mistake in the file, not a value to coerce.
        ('[tenants.acme]\nthreshold = "-4"\n', "valid number"),
        ("[tenants.acme]\nthreshold = true\n", "valid number"),
        ("[tenants.acme]\nwindow = true\n", "valid integer"),
        ('[tenants.acme]\nkv_budget_tokens = "4096"\n', "valid integer"),
        ("[tenants.acme]\nkv_budget_tokens = 9\nthreshold_range = [-4.0, true]\n", "valid number"),
        ("[tenants.acme]\napi_key = 12345678\n", "valid string"),
        # Values that passed and then failed at the first forward or could never match (review, 2026-12-06).
        ("[tenants.acme]\nwindow = 100000000000000000000\n", "window"),
        ("[tenants.acme]\nthreshold = 1e39\n", "finite float32"),
        ("[tenants.acme]\nkv_budget_tokens = 9\nthreshold_range = [-1e39, 0.0]\n", "finite"),
        ('[tenants.acme]\napi_key = "acme key with spaces"\n', "should match pattern"),
        ('[tenants.acme]\napi_key = "clé-secrète-ü"\n', "should match pattern"),
        ("# only a comment\n", "configures nothing"),
        ("", "configures nothing"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    with pytest.raises(TenantsConfigError, match=message):
        TenantsConfig.load(path)


def test_errors_are_one_line_naming_each_key_and_never_show_an_api_key(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.acme]\napi_key = "secret key 42"\nwindow = -1\n'
                    '[tenants.b]\napi_key = "other-secret-1"\nkv_budget_tokens = 9\nthreshold = 5.0\n'
                    "threshold_range = [-4.0, -2.0]\n")
    with pytest.raises(TenantsConfigError) as error:
        TenantsConfig.load(path)
    message = str(error.value)
    assert "\n" not in message
    assert "tenants.acme.window: Input should be greater than or equal to 0 (got -1)" in message
    assert "tenants.acme.api_key: String should match pattern" in message
    assert "tenants.b: threshold 5.0 lies outside threshold_range [-4.0, -2.0]" in message
    assert "secret key 42" not in message and "other-secret-1" not in message


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(TenantsConfigError, match="does not exist"):
        TenantsConfig.load(tmp_path / "nope.toml")


def test_a_directory_or_binary_file_is_refused_with_the_reason(tmp_path):
    with pytest.raises(TenantsConfigError, match="cannot be read as TOML text"):
        TenantsConfig.load(tmp_path)
    binary = tmp_path / "tenants.toml"
    binary.write_bytes(b"[tenants.acme]\nwindow = 4\n\xff\xfe")
    with pytest.raises(TenantsConfigError, match="cannot be read as TOML text"):
        TenantsConfig.load(binary)


def test_integers_are_accepted_where_numbers_are_asked_for(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text("[tenants.acme]\nthreshold = -3\nkv_budget_tokens = 9\nthreshold_range = [-4, -2]\n")
    spec = TenantsConfig.load(path).tenants["acme"]
    assert spec.threshold == -3.0 and spec.threshold_range == (-4.0, -2.0)


def test_with_keys_the_key_decides_and_no_one_claims_another_tenant():
    config = TenantsConfig.load(EXAMPLE)
    assert config.resolve("change-me-acme-0001", None) == "acme"
    assert config.resolve("change-me-acme-0001", "acme") == "acme"
    assert config.resolve(None, None) == DEFAULT_TENANT
    assert config.resolve(None, "nobody") == DEFAULT_TENANT  # unknown tenant: the default tenant's limits
    cases = [("change-me-acme-0001", "globex", 403), ("wrong-key-000", None, 401), (None, "globex", 401)]
    for key, claimed, status in cases:
        with pytest.raises(TenantAuthError) as error:
            config.resolve(key, claimed)
        assert error.value.status == status


def test_without_keys_the_header_names_the_tenant():
    config = TenantsConfig.model_validate({"tenants": {"a": {}, "b": {"kv_budget_tokens": 10}}})
    assert config.resolve(None, "b") == "b"
    assert config.resolve("anything", "a") == "a"
    assert config.resolve(None, "zzz") == DEFAULT_TENANT


def test_extra_key_round_trip_keeps_the_clients_salt():
    assert tenant_of_extra_key(extra_key_for("acme")) == "acme"
    assert extra_key_for("acme", "user-7") == "kvzap-tenant:acme|user-7"
    assert extra_key_for("acme") == "kvzap-tenant:acme|"  # the name ends at "|" even without a salt (LoRA ids follow)
    assert tenant_of_extra_key("kvzap-tenant:acme|user-7") == "acme"
    assert tenant_of_extra_key("user-7") == DEFAULT_TENANT and tenant_of_extra_key(None) == DEFAULT_TENANT


def test_a_threshold_range_clamps_the_tenants_tau():
    config = TenantsConfig.model_validate(
        {"tenants": {"acme": {"kv_budget_tokens": 100, "threshold_range": [-4.0, -2.0]}}}
    )
    spec = config.tenants["acme"]
    assert spec.threshold_range == (-4.0, -2.0)
    assert [spec.clamp_threshold(t) for t in (-9.0, -3.0, 5.0)] == [-4.0, -3.0, -2.0]
    assert config.default.clamp_threshold(-9.0) == -9.0  # no range: unchanged


def test_only_tenants_of_one_prefix_cache_group_share_a_cache_namespace():
    config = TenantsConfig.model_validate({"tenants": {"a": {"prefix_cache_group": "docs"},
                                                       "b": {"prefix_cache_group": "docs"}, "c": {}}})  # fmt: skip
    groups = config.prefix_cache_groups()
    assert groups == {"a": "docs", "b": "docs"}
    a, b, c = (cache_namespace(extra_key_for(t), groups) for t in "abc")
    assert a == b == "kvzap-group:docs|" and c == extra_key_for("c")
    # The client's own salt still separates caches inside the group; keys that name no tenant are left alone.
    assert cache_namespace(extra_key_for("a", "s1"), groups) == "kvzap-group:docs|s1" != cache_namespace(
        extra_key_for("b", "s2"), groups)
    assert cache_namespace(None, groups) is None and cache_namespace("plain", groups) == "plain"
    # The tenant itself is still read from the request's extra_key, not from the namespace.
    assert tenant_of_extra_key(extra_key_for("b", "s2")) == "b"
