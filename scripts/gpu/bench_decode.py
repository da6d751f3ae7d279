"""Decode attention micro-benchmark on a GPU: FlashInfer over the pruned cell store vs FlashInfer on the dense cache.

For every (batch, context) a ``CellStore`` holds ``batch × context`` tokens with every (layer, KV head) entry, and a
dense SGLang-layout copy of the same K/V (per layer ``[tokens, H, d]``, one sequence per request, ``num_kv_heads = H``)
is the baseline. Entries outside each request's last ``window`` positions are then pruned in nested random sets
(0 % → 50 % → 75 % of them by default; the figure reported is the measured removed fraction of *all* entries).

One decode step = attention of one new token per request in all ``layers`` layers (no MLP, no sampling):

* dense:  one ``plan`` per step (all layers share lengths, as in SGLang), then ``layers`` runs;
* pruned: per layer ``build_layout`` + ``plan`` + ``run`` (lengths differ per layer and head).

Reported per configuration: tokens/s of the whole step (metadata + plan + kernels) and of the kernels alone
(pre-planned wrappers, one per layer), the speed-up over dense, microseconds per layer of layout / plan / run, KV
bytes held, tokens/s per KV byte held (pruned ÷ dense; the literal metric of issue #7) and the effective KV
bandwidth ratio (tokens/s × bytes held, pruned ÷ dense: 1.0 when time scales exactly with the bytes kept), and the
relative error of layer 0's pruned output vs ``attention.attend`` (and vs dense at 0 %).

Usage (GPU machine, FlashInfer importable; scripts/gpu/check.sh does this)::

    python scripts/gpu/bench_decode.py --json $OUT/bench_decode.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

from kvzap_sglang.storage import CellStore, CellStoreConfig, QueryLayout, attend, build_layout
from kvzap_sglang.storage import flashinfer_attention as fia

DEVICE = "cuda"


@dataclass
class Row:
    batch: int
    context: int
    target_pruned: float
    removed_fraction: float
    dense_step_tok_s: float
    pruned_step_tok_s: float
    step_speedup: float
    dense_kernel_tok_s: float
    pruned_kernel_tok_s: float
    kernel_speedup: float
    layout_us_per_layer: float
    plan_us_per_layer: float
    run_us_per_layer: float
    dense_plan_us_per_step: float
    dense_kv_bytes: int
    pruned_kv_bytes: int
    tok_s_per_byte_ratio: float
    bandwidth_ratio: float
    rel_err_vs_attend: float
    rel_err_vs_dense: float | None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--pruned", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                   help="nested fractions of the entries outside the window to prune (ascending)")
    p.add_argument("--layers", type=int, default=30, help="SmolLM2-135M: 30")
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per configuration (after 2 warm-up)")
    p.add_argument("--json", default=None, help="write the rows and the device description here")
    args = p.parse_args(argv)
    if args.pruned != sorted(args.pruned) or not all(0 <= f < 1 for f in args.pruned):
        p.error("--pruned must be ascending fractions in [0, 1)")
    if args.q_heads % args.kv_heads:
        p.error("--q-heads must be a multiple of --kv-heads")
    return args


def timed(fn, steps: int) -> float:
    """Mean wall seconds of ``fn()`` over ``steps`` calls after 2 warm-ups, device synchronised."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


class Setup:
    """Store + dense copy for one (batch, context); request ``b`` owns slots ``b·T + 1 .. (b+1)·T``."""

    def __init__(self, args, batch: int, context: int) -> None:
        self.args, self.batch, self.context = args, batch, context
        L, H, d = args.layers, args.kv_heads, args.head_dim
        tokens = batch * context
        self.store = CellStore(CellStoreConfig(num_slots=tokens, num_cells=tokens * L * H, num_layers=L,
                                               num_kv_heads=H, head_dim=d, device=DEVICE))  # fmt: skip
        self.slots = torch.arange(1, tokens + 1, device=DEVICE)
        self.store.reserve(self.slots)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        for cells in (self.store.k_cells, self.store.v_cells):
            cells.normal_(generator=gen)
        # Dense SGLang layout: per layer [tokens + 1, H, d] (row 0 = padding slot), gathered through the map so it
        # holds exactly the cells' values (FlashInfer on it at 0 % pruned must match the cell path).
        self.k_dense, self.v_dense = (torch.zeros(L, tokens + 1, H, d, dtype=self.store.config.dtype, device=DEVICE)
                                      for _ in range(2))  # fmt: skip
        for layer in range(L):
            cell_ids = self.store.slot_to_cell[1:, layer].long()  # [tokens, H]
            self.k_dense[layer, 1:] = self.store.k_cells[cell_ids]
            self.v_dense[layer, 1:] = self.store.v_cells[cell_ids]
        self.token_slots = self.slots.view(batch, context)
        self.seq_lens = torch.full((batch,), context, device=DEVICE)
        gen_q = torch.Generator(device=DEVICE).manual_seed(1)
        self.q = torch.randn(batch, args.q_heads, d, generator=gen_q, device=DEVICE).to(torch.bfloat16)
        self.pruned_so_far = 0.0

    def prune_to(self, fraction: float) -> None:
        """Nested: entry (slot, layer, head) outside the window is pruned iff its fixed uniform draw < fraction."""
        T, window = self.context, self.args.window
        outside = (torch.arange(T, device=DEVICE) < T - window).repeat(self.batch)  # [tokens]
        for layer in range(self.args.layers):
            gen = torch.Generator(device=DEVICE).manual_seed(1000 + layer)
            draw = torch.rand(self.slots.numel(), self.args.kv_heads, generator=gen, device=DEVICE)
            drop = (draw >= self.pruned_so_far) & (draw < fraction) & outside[:, None]
            self.store.prune_mask(layer, self.slots, drop)
        self.pruned_so_far = fraction

    def kv_bytes(self, entries: int) -> int:
        return entries * 2 * self.args.head_dim * self.store.k_cells.element_size()


def dense_decode(setup: Setup, fi, workspace) -> tuple[float, float, float, torch.Tensor]:
    """(step seconds, kernel seconds, plan seconds) of FlashInfer on the dense cache, and layer 0's output."""
    a, bs, T = setup.args, setup.batch, setup.context
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    indptr = torch.arange(bs + 1, dtype=torch.int32, device=DEVICE) * T
    indices = setup.slots.to(torch.int32)  # req_to_token rows: request b's slots in position order
    last = torch.ones(bs, dtype=torch.int32, device=DEVICE)

    def plan():
        wrapper.plan(indptr, indices, last, a.q_heads, a.kv_heads, a.head_dim, 1,
                     q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)  # fmt: skip

    def runs():
        for layer in range(a.layers):
            wrapper.run(setup.q, (setup.k_dense[layer].unsqueeze(1), setup.v_dense[layer].unsqueeze(1)))

    step = timed(lambda: (plan(), runs()), a.steps)
    plan_s = timed(plan, a.steps)
    plan()
    kernels = timed(runs, a.steps)
    out0 = wrapper.run(setup.q, (setup.k_dense[0].unsqueeze(1), setup.v_dense[0].unsqueeze(1)))
    return step, kernels, plan_s, out0


def pruned_decode(setup: Setup, fi, attention: fia.FlashInferCellAttention):
    """(step s, kernel s, per-layer layout/plan/run s, layer 0 output, layer 0 layout) over the cell store."""
    a, store = setup.args, setup.store
    cells = (store.k_cells, store.v_cells)

    def step():
        for layer in range(a.layers):
            layout = build_layout(store, layer, setup.token_slots, setup.seq_lens)
            attention.decode(setup.q, *cells, layout)

    step_s = timed(step, a.steps)
    # Phase split (synchronised around each phase: adds up to more than step_s).
    attention.measure, attention.times = True, fia.PhaseTimes()
    layout_s = 0.0
    for _ in range(a.steps):
        for layer in range(a.layers):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            layout = build_layout(store, layer, setup.token_slots, setup.seq_lens)
            torch.cuda.synchronize()
            layout_s += time.perf_counter() - t0
            attention.decode(setup.q, *cells, layout)
    attention.measure = False
    n = a.steps * a.layers
    phases = (layout_s / n, attention.times.plan_s / n, attention.times.run_s / n)

    # Kernels alone: one pre-planned wrapper per layer.
    group = a.q_heads // a.kv_heads
    layouts = [build_layout(store, layer, setup.token_slots, setup.seq_lens) for layer in range(a.layers)]
    wrappers = []
    for layout in layouts:
        w = fi.BatchDecodeWithPagedKVCacheWrapper(attention.workspace, "NHD", backend="fa2")
        w.plan(**fia.decode_plan_args(layout, group, a.head_dim), q_data_type=torch.bfloat16,
               kv_data_type=torch.bfloat16)  # fmt: skip
        wrappers.append(w)
    folded = setup.q.view(setup.batch * a.kv_heads, group, a.head_dim)
    pages = fia.paged_kv_cache(*cells)
    kernels = timed(lambda: [w.run(folded, pages) for w in wrappers], a.steps)
    out0 = attention.decode(setup.q, *cells, layouts[0])
    return step_s, kernels, phases, out0, layouts[0]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def write_json(args, rows: list[Row], fi) -> None:
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flashinfer": fi.__version__,
            "python": platform.python_version(), "args": vars(args)}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)


def run(args) -> list[Row]:
    fi = fia.require_flashinfer()
    attention = fia.FlashInferCellAttention(DEVICE)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            setup = Setup(args, batch, context)
            total_entries = batch * context * args.layers * args.kv_heads
            dense_step, dense_kern, dense_plan, dense_out0 = dense_decode(setup, fi, attention.workspace)
            for fraction in args.pruned:
                setup.prune_to(fraction)
                held = setup.store.used_cells()
                step, kern, (lay, plan, run_), out0, layout0 = pruned_decode(setup, fi, attention)
                ref = attend(setup.q, setup.store.k_cells, setup.store.v_cells, layout0,
                             QueryLayout.for_decode(setup.seq_lens))  # fmt: skip
                dense_bytes, pruned_bytes = setup.kv_bytes(total_entries), setup.kv_bytes(held)
                row = Row(
                    batch=batch, context=context, target_pruned=fraction,
                    removed_fraction=1 - held / total_entries,
                    dense_step_tok_s=batch / dense_step, pruned_step_tok_s=batch / step,
                    step_speedup=dense_step / step,
                    dense_kernel_tok_s=batch / dense_kern, pruned_kernel_tok_s=batch / kern,
                    kernel_speedup=dense_kern / kern,
                    layout_us_per_layer=1e6 * lay, plan_us_per_layer=1e6 * plan, run_us_per_layer=1e6 * run_,
                    dense_plan_us_per_step=1e6 * dense_plan,
                    dense_kv_bytes=dense_bytes, pruned_kv_bytes=pruned_bytes,
                    tok_s_per_byte_ratio=(batch / step / pruned_bytes) / (batch / dense_step / dense_bytes),
                    bandwidth_ratio=(pruned_bytes / step) / (dense_bytes / dense_step),
                    rel_err_vs_attend=rel_err(out0, ref),
                    rel_err_vs_dense=rel_err(out0, dense_out0) if fraction == 0 else None,
                )  # fmt: skip
                rows.append(row)
                print_row(row, first=len(rows) == 1)
                if args.json:  # after every row: a run stopped by a timeout still leaves its figures
                    write_json(args, rows, fi)
            del setup
            torch.cuda.empty_cache()
    return rows


HEADER = (f"{'bs':>3} {'ctx':>6} {'removed':>7} | {'dense tok/s':>11} {'pruned tok/s':>12} {'speedup':>7} | "
          f"{'kern dense':>10} {'kern pruned':>11} {'speedup':>7} | {'layout':>6} {'plan':>6} {'run':>6} us/layer | "
          f"{'tok/s/B':>7} {'BW':>5} | {'err/attend':>10} {'err/dense':>9}")  # fmt: skip


def print_row(r: Row, first: bool) -> None:
    if first:
        print(HEADER)
    dense_err = "-" if r.rel_err_vs_dense is None else f"{r.rel_err_vs_dense:.1e}"
    print(f"{r.batch:>3} {r.context:>6} {r.removed_fraction:>7.1%} | {r.dense_step_tok_s:>11.0f} "
          f"{r.pruned_step_tok_s:>12.0f} {r.step_speedup:>6.2f}x | {r.dense_kernel_tok_s:>10.0f} "
          f"{r.pruned_kernel_tok_s:>11.0f} {r.kernel_speedup:>6.2f}x | {r.layout_us_per_layer:>6.0f} "
          f"{r.plan_us_per_layer:>6.0f} {r.run_us_per_layer:>6.0f}          | {r.tok_s_per_byte_ratio:>6.2f}x "
          f"{r.bandwidth_ratio:>5.2f} | {r.rel_err_vs_attend:>10.1e} {dense_err:>9}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA device", file=sys.stderr)
        return 2
    fi = fia.require_flashinfer()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, flashinfer {fi.__version__}; "
          f"{args.layers} layers, H_q={args.q_heads}, H={args.kv_heads}, d={args.head_dim}, bf16, window {args.window}")
    rows = run(args)
    if args.json:
        print(f"wrote {args.json}")
    bad = [r for r in rows if not math.isfinite(r.rel_err_vs_attend) or r.rel_err_vs_attend > 1e-2]
    if bad:
        print(f"bench_decode: {len(bad)} configurations differ from attend by more than 1e-2", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
