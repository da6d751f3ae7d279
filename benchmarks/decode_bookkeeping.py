"""CPU cost of the cell store's per-layer bookkeeping in one decode step, next to the stock pool's.

Every layer of every forward, the KVzap path writes the new tokens' K/V into their cells (``CellStore.write``, the
pool's ``set_kv_buffer``), gathers the layer's cells of the batch and checks whether anything is pruned
(``layer_cells`` + ``holds_every_entry``) before reading K/V through them, stores the surrogate's scores
(``set_scores``) and applies the DMS rule to the slots leaving the window (``prune_decided``). Stock SGLang's pool
does one indexed copy per layer (``k_buffer[loc] = k``) and torch_native gathers each request's K/V by token slot.

This times each piece (not the attention arithmetic: the same SDPA in both) for decode batches of SmolLM2-135M's
shape (30 layers, 3 KV heads, head_dim 64, bf16) over a store sized like the benchmarks' servers (8,192 tokens, or
the batch's tokens when more), the slots scattered as on a busy server and reserved at allocation as
``KvzapSlotAllocator`` does. Medians of repeats; µs per layer, and ms per decode step (x 30 layers), for a step
whose leaving tokens all score above τ (the common case of a decode step; freeing adds the allocator's checks).

To compare two versions of the store, run it from each checkout (``PYTHONPATH=<checkout>``): the figures are of the
``kvzap_sglang`` that is imported, whose commit the first line prints.

    .venv/bin/python benchmarks/decode_bookkeeping.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: a PYTHONPATH checkout keeps precedence
from benchmarks.provenance import header, provenance  # noqa: E402
from kvzap_sglang.storage import (  # noqa: E402
    BatchSlots,
    CellStore,
    CellStoreConfig,
    holds_every_entry,
    layer_cells,
    prune_decided,
)

LAYERS, H, D = 30, 3, 64
DTYPE = torch.bfloat16
POOL_TOKENS = 8192
CASES = [(1, 512), (1, 2048), (8, 2048), (32, 512)]  # (batch size, context)


def setup(bs: int, ctx: int, gen: torch.Generator):
    tokens = max(POOL_TOKENS, bs * ctx)
    num_slots = 4 * tokens
    store = CellStore(CellStoreConfig(num_slots=num_slots, num_cells=tokens * LAYERS * H, num_layers=LAYERS,
                                      num_kv_heads=H, head_dim=D, dtype=DTYPE))  # fmt: skip
    slots = (torch.randperm(num_slots, generator=gen)[: bs * ctx] + 1).view(bs, ctx)
    store.reserve(slots.reshape(-1))
    scores = torch.randn(bs * ctx, H, generator=gen)
    for layer in range(LAYERS):
        store.set_scores(layer, slots.reshape(-1), scores)
    dense = tuple(torch.zeros(num_slots + 1, H, D, dtype=DTYPE) for _ in range(2))  # the stock pool's K and V
    return store, slots, dense


def median_us(fn, calls: int, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - began) / calls * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed repeat")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(header(provenance()))
    print(f"threads={args.threads} repeats={args.repeats} calls={args.calls}; layers={LAYERS} H={H} d={D} {DTYPE}")
    print("| bs | ctx | stock write + read | KVzap write | KVzap read | set_scores | prune_decided "
          "| per step, ms: stock / KVzap |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for bs, ctx in CASES:
        store, slots, (dense_k, dense_v) = setup(bs, ctx, gen)
        loc = slots[:, -1].contiguous()  # this step's new token per request
        leaving = slots[:, 0].contiguous()  # the token leaving each request's window
        k = torch.randn(bs, H, D, generator=gen).to(DTYPE)
        v = torch.randn(bs, H, D, generator=gen).to(DTYPE)
        step_scores = torch.randn(bs, H, generator=gen)
        batch = BatchSlots.of(slots, torch.full((bs,), ctx), store.device)

        def stock():  # MHATokenToKVPool.set_kv_buffer, then torch_native's per-request K/V gather
            dense_k[loc] = k
            dense_v[loc] = v
            for row in slots:
                dense_k[row], dense_v[row]

        def kvzap_read():  # the kvzap_torch backend's path when nothing is pruned: cells, check, per-request gather
            cells = layer_cells(store, 5, batch)
            holds_every_entry(cells, batch)
            for b in range(bs):
                flat = cells[b].reshape(-1).to(torch.int64)
                store.k_cells.index_select(0, flat), store.v_cells.index_select(0, flat)

        pieces = {
            "stock": stock,
            "write": lambda: store.write(5, loc, k, v),
            "read": kvzap_read,
            "scores": lambda: store.set_scores(5, loc, step_scores),
            "prune": lambda: prune_decided(store, 5, leaving, -1e9),
        }
        us = {name: median_us(fn, args.calls, args.repeats) for name, fn in pieces.items()}
        store.check_invariants()
        kvzap = us["write"] + us["read"] + us["scores"] + us["prune"]
        print(f"| {bs} | {ctx} | {us['stock']:.0f} µs | {us['write']:.0f} µs | {us['read']:.0f} µs | "
              f"{us['scores']:.0f} µs | {us['prune']:.0f} µs | "
              f"{us['stock'] * LAYERS / 1e3:.2f} / {kvzap * LAYERS / 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
