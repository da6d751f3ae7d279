"""kvzap-sglang: KVzap KV-cache pruning that frees real memory inside SGLang.

The core (this package minus ``kvzap_sglang.plugin``) knows nothing of SGLang: data flows
hidden states -> surrogate scores -> pruning policy -> head-granular storage -> attention.
"""

__version__ = "0.1.0"
__all__ = ["KVzapSurrogate"]


def __getattr__(name: str):
    # Lazy: `import kvzap_sglang` stays cheap (no torch import) for the CLI and the service.
    if name == "KVzapSurrogate":
        from kvzap_sglang.surrogate import KVzapSurrogate

        return KVzapSurrogate
    raise AttributeError(f"module 'kvzap_sglang' has no attribute {name!r}")
