"""CPU cost of attention over the head-granular store vs SGLang's dense torch_native path, side by side.

For one layer with SmolLM2-135M's attention shape (3 KV heads, 9 query heads, head_dim 64, bf16 cache) it times

* ``layout``: ``build_layout`` (stream compaction of the slot → cell map),
* ``attend``: ``attend`` over the kept cells,
* ``dense``: what SGLang's torch_native backend does per layer — per request, gather ``k_cache[req_to_token[row,
  :seq_len]]`` from a dense ``[slots, H, d]`` pool and run ``scaled_dot_product_attention`` (GQA, causal),

for decode and prefill batches at 0 % and 50 % pruned entries, and prints the ratio (layout + attend) / dense.
Runs are interleaved and the median is kept, so background load affects both sides alike.

    .venv/bin/python benchmarks/store_overhead.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvzap_sglang.storage import CellStore, CellStoreConfig, QueryLayout, attend, build_layout

H, G, D = 3, 3, 64
DTYPE = torch.bfloat16
CASES = [  # (name, batch size, context length, new tokens per request)
    ("decode", 1, 2048, 1),
    ("decode", 8, 2048, 1),
    ("decode", 32, 512, 1),
    ("prefill", 1, 512, 512),
    ("prefill", 1, 2048, 2048),
    ("extend", 2, 2048, 256),
]


def setup(bs: int, ctx: int, pruned: float, gen: torch.Generator):
    num_tokens = bs * ctx
    store = CellStore(
        CellStoreConfig(num_slots=num_tokens, num_cells=num_tokens * H, num_layers=1, num_kv_heads=H, head_dim=D,
                        dtype=DTYPE)
    )
    slots = (torch.randperm(num_tokens, generator=gen) + 1).view(bs, ctx)  # scattered, like a busy server
    k = torch.randn(num_tokens, H, D, generator=gen).to(DTYPE)
    v = torch.randn(num_tokens, H, D, generator=gen).to(DTYPE)
    store.write(0, slots.reshape(-1), k, v)
    dense_k = torch.zeros(num_tokens + 1, H, D, dtype=DTYPE)
    dense_v = torch.zeros(num_tokens + 1, H, D, dtype=DTYPE)
    dense_k[slots.reshape(-1)], dense_v[slots.reshape(-1)] = k, v
    if pruned:
        drop = torch.rand(bs, ctx, H, generator=gen) < pruned
        drop[:, -128:] = False  # DMS window
        store.prune_mask(0, slots.reshape(-1), drop.reshape(-1, H))
    return store, slots, dense_k, dense_v


def dense_torch_native(q, dense_k, dense_v, slots, seq_lens, extend_lens):
    """SGLang torch_native per-request loop (gather + SDPA with the queries aligned to the end)."""
    out = torch.empty_like(q)
    start = 0
    for row, (seq_len, ext) in enumerate(zip(seq_lens.tolist(), extend_lens.tolist())):
        k = dense_k[slots[row, :seq_len]].transpose(0, 1)  # [H, T, d]
        v = dense_v[slots[row, :seq_len]].transpose(0, 1)
        qr = q[start : start + ext].transpose(0, 1)  # [H_q, n, d]
        mask = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - ext, seq_len)[:, None]
        o = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, enable_gqa=True)
        out[start : start + ext] = o.transpose(0, 1)
        start += ext
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads={args.threads} repeats={args.repeats} H={H} H_q={H * G} d={D} dtype={DTYPE}")
    print(f"{'case':>8} {'bs':>3} {'ctx':>5} {'new':>5} {'pruned':>6} {'layout ms':>9} {'attend ms':>9} "
          f"{'dense ms':>8} {'(layout+attend)/dense':>22} {'rel.err vs dense':>16}")
    for name, bs, ctx, new in CASES:
        for pruned in (0.0, 0.5):
            store, slots, dense_k, dense_v = setup(bs, ctx, pruned, gen)
            seq_lens = torch.full((bs,), ctx)
            extend_lens = torch.full((bs,), new)
            qo = QueryLayout.for_extend(seq_lens, extend_lens)
            q = torch.randn(bs * new, H * G, D, generator=gen).to(DTYPE)
            layout = build_layout(store, 0, slots, seq_lens)
            t_layout, t_attend, t_dense = [], [], []
            for _ in range(args.repeats):
                t_layout.append(timed(lambda: build_layout(store, 0, slots, seq_lens)))
                t_attend.append(timed(lambda: attend(q, store.k_cells, store.v_cells, layout, qo)))
                t_dense.append(timed(lambda: dense_torch_native(q, dense_k, dense_v, slots, seq_lens, extend_lens)))
            lay, att, den = (statistics.median(t) * 1e3 for t in (t_layout, t_attend, t_dense))
            err = "-"
            if not pruned:  # same keys: the two paths must agree
                ours = attend(q, store.k_cells, store.v_cells, layout, qo).float()
                ref = dense_torch_native(q, dense_k, dense_v, slots, seq_lens, extend_lens).float()
                err = f"{((ours - ref).norm() / ref.norm()).item():.2e}"
            print(f"{name:>8} {bs:>3} {ctx:>5} {new:>5} {pruned:>6.0%} {lay:>9.2f} {att:>9.2f} {den:>8.2f} "
                  f"{(lay + att) / den:>22.2f} {err:>16}")


if __name__ == "__main__":
    main()
