"""CPU cost of ``KvzapRadixCache.evict_tenant``, the step a tenant's held request runs in every admission round.

Builds the real radix cache over the real cell pool (no engine) holding ``--documents`` cached documents of other
tenants, each with a binary tree of continuations ``--depth`` levels deep (2**depth leaves a document, depth + 1
nodes from a leaf to the document's root), and times ``evict_tenant`` for a tenant that holds nothing in it: the
whole scan, nothing evicted — what a tenant whose budget is held by running requests pays each round. Prints the
median over ``--repeats`` calls.

    .venv/bin/python benchmarks/evict_tenant.py [--documents 16] [--depth 6] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from array import array

import torch

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

LAYERS, HEADS, DIM = 2, 3, 4


def build_tree(num_slots: int):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from kvzap_sglang.plugin.cell_pool import KvzapCellPool, KvzapSlotAllocator
    from kvzap_sglang.plugin.radix_cache import KvzapRadixCache

    pool = KvzapCellPool(num_slots, page_size=1, dtype=torch.bfloat16, head_num=HEADS, head_dim=DIM,
                         layer_num=LAYERS, device="cpu", enable_memory_saver=False)  # fmt: skip
    allocator = KvzapSlotAllocator(num_slots, dtype=torch.bfloat16, device="cpu", kvcache=pool, need_sort=False)
    return KvzapRadixCache(CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(4, 64, "cpu", False),
                                           token_to_kv_pool_allocator=allocator, page_size=1))  # fmt: skip


def cache(tree, tokens: list[int], tenant: int) -> None:
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    slots = tree.token_to_kv_pool_allocator.alloc(len(tokens))
    prefix = tree.insert(InsertParams(key=RadixKey(array("q", tokens)), value=slots)).prefix_len
    tree.token_to_kv_pool_allocator.free(slots[:prefix])
    tree.store.set_tenant(slots[prefix:], tenant)


def populate(tree, documents: int, depth: int) -> int:
    """Each document: 32 tokens, then one token per level choosing a branch (0/1); returns the leaves cached."""
    for d in range(documents):
        document = [100_000 + d * 64 + i for i in range(32)]
        for leaf in range(2**depth):
            branch = [2 * level + (leaf >> level & 1) for level in range(depth)]
            cache(tree, document + branch, tenant=2 + d % 3)
    return documents * 2**depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    slots = args.documents * (32 + 2 ** (args.depth + 1)) + 64
    tree = build_tree(slots)
    leaves = populate(tree, args.documents, args.depth)
    assert len(tree.evictable_leaves) == leaves
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        freed = tree.evict_tenant(1, 1)
        times.append(time.perf_counter() - start)
        assert freed == 0 and len(tree.evictable_leaves) == leaves  # tenant 1 holds nothing: nothing evicted
    print(f"evict_tenant over {leaves} leaves ({args.documents} documents x 2^{args.depth}, depth {args.depth + 1} "
          f"from a leaf): median {statistics.median(times) * 1e3:.2f} ms a call ({args.repeats} calls)")


if __name__ == "__main__":
    main()
