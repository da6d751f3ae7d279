"""kvzap-sglang: KVzap KV-cache pruning that frees real memory inside SGLang.

The core (this package minus ``kvzap_sglang.plugin``) knows nothing of SGLang: data flows
hidden states -> surrogate scores -> pruning policy -> head-granular storage -> attention.
"""

__version__ = "0.1.0"
