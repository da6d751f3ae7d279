"""Refuse to serve with KVzap half-installed.

SGLang's ``load_plugins`` logs and skips a plugin that raises, and ``HookRegistry.apply_hooks`` logs and skips a hook
whose target it cannot wrap (a function an SGLang release renamed or moved). Either way the server would start with
KVzap partly in place: a stock KV pool under KVzap's attention, or tenants without budgets. The scheduler therefore
checks, when it builds KVzap's KV pool and attention backend (which every KVzap server does, before serving
anything), that every hook KVzap registered was applied and that registering them raised nothing, and stops with the
list of what is missing.

``tests/sglang/test_sglang_seams.py`` checks the same seams against the installed SGLang without starting a server
(targets exist, hooks' parameters bind to theirs, subclasses override only methods SGLang has), which is what a
version bump has to pass first.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_SGLANG = "0.5.23"


class SeamError(RuntimeError):
    """KVzap is on, but SGLang did not take some of its hooks."""


_registration_errors: list[str] = []  # what raised while this process registered KVzap's serving hooks


def record_registration_error(error: BaseException) -> None:
    """Remember an error raised while registering the serving hooks (``load_plugins`` only logs it)."""
    _registration_errors.append(f"{type(error).__name__}: {error}")


def _is_kvzap(hook) -> bool:
    return (getattr(hook, "__module__", "") or "").startswith("kvzap_sglang")


def unapplied_hooks() -> list[str]:
    """Targets holding a KVzap hook that ``HookRegistry.apply_hooks`` did not wrap (it logged why)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return sorted(
        target
        for target, hooks in HookRegistry._hooks.items()
        if target not in HookRegistry._patched and any(_is_kvzap(hook) for _, hook, _ in hooks)
    )


def verify_hooks_applied() -> None:
    """Raise ``SeamError`` naming every KVzap hook SGLang failed to apply and any error raised while registering
    them; nothing when all are in place."""
    problems = []
    if missing := unapplied_hooks():
        problems.append(f"SGLang did not apply its hooks on {', '.join(missing)} (the 'Failed to apply hooks' error "
                        f"logged earlier says why)")  # fmt: skip
    if _registration_errors:
        problems.append(f"registering its serving hooks raised {'; '.join(_registration_errors)}")
    if not problems:
        return
    try:
        installed = version("sglang")
    except PackageNotFoundError:
        installed = "unknown"
    raise SeamError(
        f"KVzap is on but {'; and '.join(problems)}. kvzap-sglang is built for sglang=={SUPPORTED_SGLANG}; "
        f"installed: {installed}. Serving would run with KVzap half-installed, so the server stops here."
    )
