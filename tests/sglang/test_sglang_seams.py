"""KVzap's seams against the installed SGLang, without starting it: what an SGLang version bump must pass first.

SGLang skips, with a logged error, a hook whose target is gone and a plugin that raises, so a renamed function would
otherwise show up only as KVzap silently half-installed. Checked here: every hook target exists and the parameters
each hook uses bind to the target's; every method KVzap's subclasses override exists in SGLang's base class with
parameters ours accept (so an override never becomes dead code after a rename); at most one AROUND hook per target;
and a KVzap scheduler refuses to serve when a hook was not applied (``plugin.seams``).
"""

from __future__ import annotations

import inspect
import pkgutil
from collections import Counter
from pathlib import Path

import pytest
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from kvzap_sglang.plugin import _register_serving_hooks, _register_startup_hooks, calibration, seams
from kvzap_sglang.plugin.attention_backend import KvzapTorchAttnBackend
from kvzap_sglang.plugin.cell_pool import KvzapCellPool, KvzapSlotAllocator
from kvzap_sglang.plugin.flashinfer_backend import KvzapFlashInferAttnBackend
from kvzap_sglang.plugin.radix_cache import KvzapRadixCache
from kvzap_sglang.plugin.reporting import KvzapOutputStreamer

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """Stands in for ``HookRegistry`` while KVzap registers: records (target, hook, type) and patches nothing."""

    def __init__(self) -> None:
        self.hooks: list[tuple[str, object, HookType]] = []

    def register(self, target, hook, hook_type=HookType.AFTER, **_):
        self.hooks.append((target, hook, hook_type))


@pytest.fixture(scope="module")
def registered() -> list[tuple[str, object, HookType]]:
    """Every hook KVzap registers in a serving process with calibration on (the most it ever registers)."""
    recorder = Recorder()
    _register_startup_hooks(recorder, HookType)
    _register_serving_hooks(recorder, HookType)
    calibration.register(recorder, HookType)  # KVzap off in this process: the start-up part only
    calibration.register_serving_hooks(recorder, HookType)
    return recorder.hooks


def _call_parameters(hook, hook_type: HookType) -> list[inspect.Parameter]:
    """The hook's parameters that stand for the target's (AROUND hooks get ``original`` first, AFTER the result)."""
    params = list(inspect.signature(hook).parameters.values())
    return params[1:] if hook_type in (HookType.AROUND, HookType.AFTER) else params


def _binding_problems(target_fn, hook, hook_type: HookType) -> list[str]:
    target = list(inspect.signature(target_fn).parameters.values())
    names = {p.name: i for i, p in enumerate(target) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    positional = [p for p in target if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    any_positional = any(p.kind == p.VAR_POSITIONAL for p in target)
    any_keyword = any(p.kind == p.VAR_KEYWORD for p in target)
    problems = []
    for i, p in enumerate(_call_parameters(hook, hook_type)):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.KEYWORD_ONLY or p.default is not p.empty:  # the hook reads or passes it by name
            if p.name not in names and not any_keyword:
                problems.append(f"no parameter {p.name!r}")
            elif p.kind != p.KEYWORD_ONLY and names.get(p.name, i) != i:
                problems.append(f"{p.name!r} is at position {names[p.name]}, the hook expects {i}")
        elif i >= len(positional) and not any_positional:
            problems.append(f"no positional parameter {i} ({p.name!r})")
    return problems


def _unbound(target: str, resolved):
    """The function a hook wraps: a class- or staticmethod's own function, as ``HookRegistry`` takes it."""
    owner_path, attr = target.rsplit(".", 1)
    raw = inspect.getattr_static(pkgutil.resolve_name(owner_path), attr)
    return raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else resolved


def test_every_hook_target_exists_and_each_hooks_parameters_bind_to_it(registered):
    assert len(registered) >= 17
    problems = {}
    for target, hook, hook_type in registered:
        try:
            resolved = pkgutil.resolve_name(target)
        except (ImportError, AttributeError) as error:
            problems[target] = f"not found in this SGLang: {error}"
            continue
        if isinstance(hook, type):  # class REPLACE: a subclass keeps every caller's view of the original
            assert hook_type == HookType.REPLACE and issubclass(hook, inspect.unwrap(resolved)), target
            continue
        if found := _binding_problems(_unbound(target, resolved), hook, hook_type):
            problems[f"{target} <- {hook.__module__}.{hook.__qualname__}"] = found
    assert not problems, problems


# Methods the subclasses add (everything else they define must override a method SGLang's base class has).
OWN_METHODS = {
    KvzapRadixCache: {"usable_prefix_len", "_insertable_len", "_namespaced", "_path_nodes", "_tag", "evict_slots",
                      "evict_tenant", "_evict_until"},  # fmt: skip
    KvzapCellPool: {"_layer", "_dense_buffers_absent"},
    KvzapSlotAllocator: {"free_slot_count", "reclaimable_tokens", "evictable_tokens", "_deep_check"},
    KvzapOutputStreamer: set(),
    KvzapTorchAttnBackend: {"__init__", "_forward", "_dense"},  # AttentionBackend has no constructor of its own
    KvzapFlashInferAttnBackend: set(),
}


def _defined_methods(cls) -> dict[str, object]:
    return {name: attr for name, attr in vars(cls).items()
            if callable(attr) and (not name.startswith("__") or name == "__init__")}  # fmt: skip


def _accepts_every_parameter_of(ours, base) -> list[str]:
    """What a call that binds to ``base`` could pass and ``ours`` would refuse, and what ours requires that such a
    call need not pass. Optional parameters are taken to come by name (SGLang passes them as keywords)."""
    mine, theirs = inspect.signature(ours).parameters, inspect.signature(base).parameters
    var_positional = any(p.kind == p.VAR_POSITIONAL for p in mine.values())
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in mine.values())
    my_positional = [n for n, p in mine.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    their_positional = [n for n, p in theirs.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    for name, p in theirs.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        by_name = p.kind != p.POSITIONAL_ONLY and (name in mine or var_keyword)
        by_position = name in their_positional and (their_positional.index(name) < len(my_positional) or var_positional)
        if not (by_name if p.default is not p.empty else by_name or by_position):
            problems.append(f"does not accept {name!r}")
    for name, p in mine.items():
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            at = my_positional.index(name) if name in my_positional else None
            if name not in theirs and (at is None or at >= len(their_positional)):
                problems.append(f"requires {name!r}, which the base does not take")
    return problems


@pytest.mark.parametrize("cls", list(OWN_METHODS), ids=lambda cls: cls.__name__)
def test_subclass_overrides_are_methods_of_sglangs_base_with_compatible_parameters(cls):
    added, problems = set(), {}
    for name, ours in _defined_methods(cls).items():
        base_cls = next((b for b in cls.__mro__[1:] if b is not object and name in vars(b)), None)
        if base_cls is None:
            added.add(name)
            continue
        if found := _accepts_every_parameter_of(ours, getattr(base_cls, name)):
            problems[f"{cls.__name__}.{name} vs {base_cls.__name__}"] = found
    assert added == OWN_METHODS[cls], "an override whose base method is gone, or a new method to list here"
    assert not problems, problems


def test_at_most_one_around_hook_on_each_target(registered):
    """SGLang warns about several AROUND hooks on one target (an inner one is skipped if an outer one never calls
    through); KVzap and its calibration sampler must not add such a pair."""
    around = Counter(target for target, _, hook_type in registered if hook_type == HookType.AROUND)
    assert around["sglang.srt.mem_cache.common.release_kv_cache"] == 1
    assert max(around.values()) == 1, around


def test_the_supported_sglang_is_the_installed_and_pinned_one():
    """The set-up installs SGLang itself (--no-deps: its full pin set pulls CUDA kernels a CPU host cannot use)."""
    from importlib.metadata import version

    assert f"sglang=={seams.SUPPORTED_SGLANG}" in (ROOT / "scripts" / "setup-env.sh").read_text()
    assert version("sglang") == seams.SUPPORTED_SGLANG


def test_our_pins_agree_with_sglangs():
    """``pip install kvzap-sglang`` next to SGLang must not move a package SGLang pins: every package both declare
    has a version both accept (our transformers pin was 5.23.0 against SGLang's 5.19.0)."""
    import tomllib
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = {r.name.lower(): r for r in map(Requirement, [*project["dependencies"],
                                                         *sum(project["optional-dependencies"].values(), [])])}
    theirs = [r for r in map(Requirement, requires("sglang")) if r.marker is None and r.name.lower() in ours]
    assert theirs, "SGLang declares none of our dependencies: the check would pass vacuously"
    for sglang_req in theirs:
        our_req = ours[sglang_req.name.lower()]
        pinned = [spec.version for req in (sglang_req, our_req) for spec in req.specifier if spec.operator == "=="]
        for version in pinned:  # a pin on either side must satisfy the other side's specifier
            assert sglang_req.specifier.contains(version, prereleases=True), (sglang_req, our_req)
            assert our_req.specifier.contains(version, prereleases=True), (sglang_req, our_req)


def test_a_hook_sglang_could_not_apply_stops_a_kvzap_scheduler(monkeypatch):
    """A KVzap hook on a target this SGLang lacks (as after a rename): ``apply_hooks`` only logs it, and the checks
    the pool builder and the attention-backend factories run first refuse to serve, naming the target and both
    versions, before anything is allocated."""
    from kvzap_sglang.plugin import hooks
    from kvzap_sglang.plugin.attention_backend import create_kvzap_torch_backend
    from kvzap_sglang.plugin.settings import KVzapSettings

    def never_called(*args, **kwargs):
        raise AssertionError("the pool was built although a hook is missing")

    target = "sglang.srt.managers.scheduler.Scheduler.renamed_in_a_later_release"
    seams.verify_hooks_applied()  # this process's own KVzap hooks (start-up surface) are all in place
    HookRegistry.register(target, calibration.apply_tau_before_batch, HookType.BEFORE)
    try:
        HookRegistry.apply_hooks()  # logs "Failed to apply hooks to ..." and goes on, as at SGLang start-up
        assert seams.unapplied_hooks() == [target]
        expected = r"renamed_in_a_later_release.*sglang==0\.5\.23; installed: 0\.5\.23"
        with pytest.raises(seams.SeamError, match=expected):
            create_kvzap_torch_backend(model_runner=None)
        monkeypatch.setattr(KVzapSettings, "from_env", classmethod(lambda cls: object()))  # KVzap on
        with pytest.raises(seams.SeamError, match=expected):
            hooks.build_mha_kv_pool(never_called, None)
    finally:
        del HookRegistry._hooks[target]
    seams.verify_hooks_applied()


def test_an_error_while_registering_the_serving_hooks_stops_a_kvzap_scheduler(monkeypatch):
    """``load_plugins`` logs a plugin that raises and goes on; the error is kept and the scheduler's check names it."""
    from collections import defaultdict

    import kvzap_sglang.plugin as plugin
    from kvzap_sglang.plugin.settings import KVzapSettings

    def failing(registry, hook_type):
        raise ImportError("cannot import name 'register_radix_cache_backend'")

    monkeypatch.setattr(seams, "_registration_errors", [])
    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))  # this test's registrations go nowhere
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "_register_serving_hooks", failing)
    monkeypatch.setattr(KVzapSettings, "from_env", classmethod(lambda cls: object()))  # KVzap on
    with pytest.raises(ImportError):
        plugin.register()  # what load_plugins() calls, and logs
    with pytest.raises(seams.SeamError, match=r"ImportError: cannot import name 'register_radix_cache_backend'"):
        seams.verify_hooks_applied()
