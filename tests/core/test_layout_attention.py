"""Head-folded layout + torch attention over the pruned store == dense attention with an explicit keep-mask.

The reference keeps its own dense copy of every request's K/V and its own boolean keep-mask ``[H, T]`` (not read
back from the store), and runs torch SDPA with causal ∧ keep masks per request; a query that sees no key is
defined to output zeros.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvzap_sglang.storage import (
    BatchSlots,
    CellStore,
    CellStoreConfig,
    QueryLayout,
    attend,
    build_layout,
    fold_queries,
    holds_every_entry,
    layer_cells,
    pad_slot_lists,
)

LAYERS, H, G, D = 2, 3, 3, 16  # SmolLM2-like GQA: 9 query heads over 3 KV heads
LAYER = 1  # attention is checked on layer 1; layer 0 is written and pruned differently to catch mix-ups
FP32_TOL, BF16_TOL = 1e-5, 1e-2


class Batch:
    """Requests in a store, mirrored by a dense model: per request slots [T], K/V [T, H, D] and keep [H, T]."""

    def __init__(self, dtype: torch.dtype, seed: int = 0, num_slots: int = 400, num_cells: int = 6000) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        cfg = CellStoreConfig(
            num_slots=num_slots, num_cells=num_cells, num_layers=LAYERS, num_kv_heads=H, head_dim=D, dtype=dtype
        )
        self.store = CellStore(cfg)
        # Slots are handed out in a shuffled order so that a request's slots are neither contiguous nor sorted.
        self.free_slots = (torch.randperm(num_slots, generator=self.gen) + 1).tolist()
        self.slots: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.keep: list[torch.Tensor] = []

    def add_request(self) -> int:
        self.slots.append(torch.zeros(0, dtype=torch.int64))
        self.k.append(torch.zeros(0, H, D))
        self.v.append(torch.zeros(0, H, D))
        self.keep.append(torch.zeros(H, 0, dtype=torch.bool))
        return len(self.slots) - 1

    def grow(self, req: int, n: int) -> None:
        """Write ``n`` new tokens to both layers (all heads kept)."""
        new = torch.tensor([self.free_slots.pop() for _ in range(n)], dtype=torch.int64)
        k, v = (torch.randn(n, H, D, generator=self.gen) for _ in range(2))
        self.store.write(LAYER, new, k, v)
        self.store.write(0, new, torch.randn(n, H, D, generator=self.gen), torch.randn(n, H, D, generator=self.gen))
        # The reference uses the values as stored (bf16-rounded when the store is bf16).
        self.k[req] = torch.cat([self.k[req], k.to(self.dtype).float()])
        self.v[req] = torch.cat([self.v[req], v.to(self.dtype).float()])
        self.slots[req] = torch.cat([self.slots[req], new])
        self.keep[req] = torch.cat([self.keep[req], torch.ones(H, n, dtype=torch.bool)], dim=1)

    def prune(self, req: int, drop: torch.Tensor) -> None:
        """Drop entries ``drop`` ``[H, T]`` of layer LAYER (and a different pattern in layer 0)."""
        self.store.prune_mask(LAYER, self.slots[req], drop.T)
        self.store.prune_mask(0, self.slots[req], ~drop.T)
        self.keep[req] &= ~drop

    def prune_random(self, req: int, fraction: float, protect_last: int = 0) -> None:
        drop = torch.rand(self.keep[req].shape, generator=self.gen) < fraction
        if protect_last:
            drop[:, -protect_last:] = False
        self.prune(req, drop)

    def queries(self, extend_lens: list[int]) -> tuple[torch.Tensor, QueryLayout]:
        seq_lens = torch.tensor([s.numel() for s in self.slots])
        qo = QueryLayout.for_extend(seq_lens, torch.tensor(extend_lens))
        q = torch.randn(sum(extend_lens), H * G, D, generator=self.gen).to(self.dtype)
        return q, qo

    def store_attention(self, q: torch.Tensor, qo: QueryLayout, **kw) -> torch.Tensor:
        token_slots, seq_lens = pad_slot_lists(self.slots)
        layout = build_layout(self.store, LAYER, token_slots, seq_lens)
        return attend(q, self.store.k_cells, self.store.v_cells, layout, qo, **kw)

    def reference(self, q: torch.Tensor, qo: QueryLayout) -> torch.Tensor:
        out = []
        for b in range(len(self.slots)):
            rows = slice(int(qo.qo_indptr[b]), int(qo.qo_indptr[b + 1]))
            qb = q[rows].float().transpose(0, 1)  # [H_q, n, D]
            q_pos = qo.q_positions[rows]
            num_keys = self.slots[b].numel()
            causal = torch.arange(num_keys)[None, :] <= q_pos[:, None]  # [n, T]
            mask = (causal[None] & self.keep[b][:, None, :]).repeat_interleave(G, dim=0)  # [H_q, n, T]
            k = self.k[b].transpose(0, 1).repeat_interleave(G, dim=0)  # [H_q, T, D]
            v = self.v[b].transpose(0, 1).repeat_interleave(G, dim=0)
            ref = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask)
            ref = torch.where(mask.any(-1, keepdim=True), ref.nan_to_num(0.0), 0.0)  # no key -> zeros (defined)
            out.append(ref.transpose(0, 1))
        return torch.cat(out)

    def check(self, extend_lens: list[int], **kw) -> torch.Tensor:
        q, qo = self.queries(extend_lens)
        got = self.store_attention(q, qo, **kw)
        ref = self.reference(q, qo)
        assert got.dtype == q.dtype and got.shape == q.shape
        tol = FP32_TOL if self.dtype == torch.float32 else BF16_TOL
        err = (got.float() - ref).norm() / ref.norm().clamp_min(1e-30)
        assert err < tol, f"relative error {err:.3g} >= {tol}"
        self.store.check_invariants()
        return got


DTYPES = [torch.float32, torch.bfloat16]


def test_layout_matches_a_python_compaction_and_ignores_stale_slots():
    batch = Batch(torch.float32)
    for n in (9, 1, 14):
        req = batch.add_request()
        batch.grow(req, n)
        batch.prune_random(req, 0.5)
    token_slots, seq_lens = pad_slot_lists(batch.slots)
    # Stale entries past seq_len (req_to_token rows are never cleared) point at a live slot: must be ignored.
    token_slots = torch.cat([token_slots, token_slots[:, :1].expand(-1, 3)], dim=1)
    token_slots[1, 1:] = batch.slots[2][0]
    layout = build_layout(batch.store, LAYER, token_slots, seq_lens)
    assert layout.kv_indptr.dtype == layout.kv_indices.dtype == torch.int32
    assert layout.kv_indptr.tolist()[1:] == torch.cumsum(layout.kv_lens.flatten(), 0).tolist()
    for b, slots in enumerate(batch.slots):
        for h in range(H):
            s = b * H + h
            span = slice(int(layout.kv_indptr[s]), int(layout.kv_indptr[s + 1]))
            expect_pos = [p for p in range(slots.numel()) if batch.keep[b][h, p]]
            expect_cells = [int(batch.store.slot_to_cell[slots[p], LAYER, h]) for p in expect_pos]
            assert layout.kv_positions[span].tolist() == expect_pos
            assert layout.kv_indices[span].tolist() == expect_cells
            assert int(layout.kv_lens[b, h]) == len(expect_pos)


def test_the_density_check_sees_one_pruned_entry_and_ignores_padding_and_stale_slots():
    """``holds_every_entry`` picks the backend's dense path: true only while no in-sequence entry of the layer is
    pruned; padding (slot 0) and stale slots past seq_len never count."""
    batch = Batch(torch.float32)
    for n in (9, 14):
        batch.grow(batch.add_request(), n)
    token_slots, seq_lens = pad_slot_lists(batch.slots)
    token_slots = torch.cat([token_slots, token_slots[:, :1].expand(-1, 3)], dim=1)  # stale entries past seq_len
    slots = BatchSlots.of(token_slots, seq_lens, batch.store.device)
    cells = layer_cells(batch.store, LAYER, slots)
    assert cells.shape == (2, 17, H) and bool((cells[0, 9:] == -1).all())  # padding reads slot 0: no cell
    assert holds_every_entry(cells, slots)
    drop = torch.zeros(H, 14, dtype=torch.bool)
    drop[2, 13] = True
    batch.prune(1, drop)  # layer 0 loses every other entry (Batch.prune): only LAYER is asked about
    assert not holds_every_entry(layer_cells(batch.store, LAYER, slots), slots)
    shorter = BatchSlots.of(token_slots, seq_lens - 1, batch.store.device)  # the pruned entry is past seq_len now
    assert holds_every_entry(layer_cells(batch.store, LAYER, shorter), shorter)


def test_metadata_is_flashinfer_shaped():
    batch = Batch(torch.bfloat16)
    for n in (5, 8):
        batch.grow(batch.add_request(), n)
    batch.prune_random(0, 0.5)
    layout = build_layout(batch.store, LAYER, *pad_slot_lists(batch.slots))
    assert layout.kv_indptr.shape == (2 * H + 1,) and int(layout.kv_indptr[-1]) == layout.num_entries
    assert layout.kv_last_page_len.tolist() == [1] * (2 * H)
    assert int(layout.kv_indices.min()) >= 1 and int(layout.kv_indices.max()) <= batch.store.config.num_cells
    pages = batch.store.k_cells.view(-1, 1, 1, D)  # [num_pages, page_size=1, num_kv_heads=1, head_dim], no copy
    assert pages.data_ptr() == batch.store.k_cells.data_ptr()


def test_new_tokens_are_the_tail_of_every_sequence():
    """What makes FlashInfer's end-aligned causal mask exact on this layout (layout.py docstring)."""
    batch = Batch(torch.float32)
    req = batch.add_request()
    batch.grow(req, 20)
    batch.prune_random(req, 0.7)
    batch.grow(req, 6)
    layout = build_layout(batch.store, LAYER, *pad_slot_lists(batch.slots))
    for h in range(H):
        tail = layout.kv_positions[int(layout.kv_indptr[h + 1]) - 6 : int(layout.kv_indptr[h + 1])]
        assert tail.tolist() == list(range(20, 26))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_extend_with_cached_pruned_prefix(dtype, fraction):
    batch = Batch(dtype, seed=int(fraction * 10))
    for prefix, new in ((30, 7), (3, 12), (17, 1)):
        req = batch.add_request()
        batch.grow(req, prefix)
        batch.prune_random(req, fraction)
        batch.grow(req, new)
    batch.check([7, 12, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_prefill_with_pruned_entries_inside_the_extend(dtype):
    """No cached prefix; entries pruned among the queried tokens themselves (positions matter, not list order)."""
    batch = Batch(dtype, seed=3)
    for n in (16, 5):
        req = batch.add_request()
        batch.grow(req, n)
        batch.prune_random(req, 0.5)
    batch.check([16, 5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_heads_output_zeros_and_leave_other_heads_exact(dtype):
    batch = Batch(dtype, seed=4)
    req = batch.add_request()
    batch.grow(req, 12)
    drop = torch.zeros(H, 12, dtype=torch.bool)
    drop[1] = True  # KV head 1 holds nothing
    batch.prune(req, drop)
    empty = batch.add_request()  # a request with every entry of every head pruned
    batch.grow(empty, 4)
    batch.prune(empty, torch.ones(H, 4, dtype=torch.bool))
    out = batch.check([4, 4])
    assert (out[:4, G : 2 * G] == 0).all() and (out[4:] == 0).all()
    assert (out[:4, :G] != 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_only_heads(dtype):
    batch = Batch(dtype, seed=5)
    window = 4
    for n in (25, 10):
        req = batch.add_request()
        batch.grow(req, n)
        drop = torch.ones(H, n, dtype=torch.bool)
        drop[:, -window:] = False
        drop[0] = torch.rand(n, generator=batch.gen) < 0.5  # head 0: random, the others window-only
        drop[0, -window:] = False
        batch.prune(req, drop)
    batch.check([window, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_then_decode_with_pruning_between_steps(dtype):
    batch = Batch(dtype, seed=6)
    req = batch.add_request()
    for chunk in (9, 7, 11, 1, 1, 1):
        batch.grow(req, chunk)
        batch.check([chunk])
        batch.prune_random(req, 0.4, protect_last=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_of_mixed_lengths(dtype):
    batch = Batch(dtype, seed=7)
    for n in (40, 2, 17, 64):
        req = batch.add_request()
        batch.grow(req, n)
        batch.prune_random(req, 0.6)
    for _ in range(3):
        for req in range(4):
            batch.grow(req, 1)
        batch.check([1, 1, 1, 1])
        for req in range(4):
            batch.prune_random(req, 0.2, protect_last=2)


def test_mixed_extend_and_decode_in_one_batch():
    batch = Batch(torch.float32, seed=8)
    for prefix, new in ((20, 1), (0, 9), (11, 1), (5, 6)):
        req = batch.add_request()
        if prefix:
            batch.grow(req, prefix)
            batch.prune_random(req, 0.5)
        batch.grow(req, new)
    batch.check([1, 9, 1, 6])


def test_small_score_budget_splits_work_without_changing_results():
    batch = Batch(torch.float32, seed=9)
    for n in (33, 8, 21):
        req = batch.add_request()
        batch.grow(req, n)
        batch.prune_random(req, 0.3)
    q, qo = batch.queries([33, 3, 21])
    whole = batch.store_attention(q, qo)
    split = batch.store_attention(q, qo, max_score_elems=200)  # forces query blocks and one request per group
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, batch.reference(q, qo), rtol=1e-5, atol=1e-5)


def test_custom_scaling_is_applied():
    batch = Batch(torch.float32, seed=10)
    batch.grow(batch.add_request(), 6)
    q, qo = batch.queries([6])
    got = batch.store_attention(q, qo, scaling=0.5)
    ref = batch.reference(q * (0.5 * math.sqrt(D)), qo)  # SDPA scales by 1/sqrt(D)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected():
    batch = Batch(torch.float32)
    batch.grow(batch.add_request(), 4)
    layout = build_layout(batch.store, LAYER, *pad_slot_lists(batch.slots))
    qo = QueryLayout.for_decode(torch.tensor([4]))
    with pytest.raises(ValueError, match="multiple"):
        attend(torch.zeros(1, H * G + 1, D), batch.store.k_cells, batch.store.v_cells, layout, qo)
    with pytest.raises(ValueError, match="requests"):
        attend(torch.zeros(2, H * G, D), batch.store.k_cells, batch.store.v_cells, layout,
               QueryLayout.for_decode(torch.tensor([4, 4])))
    with pytest.raises(ValueError, match="exceed"):
        build_layout(batch.store, LAYER, torch.ones(1, 3, dtype=torch.int64), torch.tensor([4]))
    with pytest.raises(ValueError):
        QueryLayout.for_extend(torch.tensor([3]), torch.tensor([4]))


# ---------------------------------------------------------------------------------------------------------------
# FlashInfer conventions, emulated in torch (CPU part of issue #7): the metadata, fed to a kernel that knows only
# indptr/indices (page size 1, one KV head per sequence) and FlashInfer's end-aligned causal mask, must give the
# same output as ``attend``. The GPU check swaps this emulation for the real wrappers.


def _sequence_attention(q, k, v, mask, scaling):
    """q [n, G, d], k/v [m, d], mask [n, m] -> (out [n, G, d] fp32, lse [n, G]; -inf and zeros where no key)."""
    scores = torch.einsum("ngd,md->ngm", q.float(), k.float()) * scaling
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [n, G]
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("ngm,md->ngd", weights, v.float()), lse


def _paged_plan_emulation(store, layout, folded, causal, scaling):
    """BatchPrefill/DecodeWithPagedKVCache over (kv_indptr, kv_indices), page size 1, num_kv_heads 1."""
    outs, lses = [], []
    for s in range(layout.kv_indptr.numel() - 1):
        cells = layout.kv_indices[int(layout.kv_indptr[s]) : int(layout.kv_indptr[s + 1])].long()
        q = folded.q[int(folded.qo_indptr[s]) : int(folded.qo_indptr[s + 1])]
        n, m = q.shape[0], cells.numel()
        if causal:  # FlashInfer aligns the queries with the end of the KV list
            mask = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
        else:
            mask = torch.ones(n, m, dtype=torch.bool)
        out, lse = _sequence_attention(q, store.k_cells[cells], store.v_cells[cells], mask, scaling)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _merge_by_lse(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return out_a * wa + out_b * wb


def _scenarios(dtype):
    """Batches whose last extend is still to be attended: (batch, extend_lens)."""
    batch = Batch(dtype, seed=11)
    for prefix, new, how in ((24, 5, "random"), (10, 3, "empty-prefix-head"), (30, 1, "window-only"), (0, 7, "-")):
        req = batch.add_request()
        if prefix:
            batch.grow(req, prefix)
            drop = torch.rand(H, prefix, generator=batch.gen) < 0.6
            if how == "empty-prefix-head":
                drop[2] = True
            if how == "window-only":
                drop[:] = True
                drop[:, -4:] = False
            batch.prune(req, drop)
        batch.grow(req, new)
    yield batch, [5, 3, 1, 7]
    chunked = Batch(dtype, seed=12)  # chunked prefill then decode, pruning between steps
    req = chunked.add_request()
    for step in (13, 9, 1):
        chunked.grow(req, step)
        yield chunked, [step]
        chunked.prune_random(req, 0.5, protect_last=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flashinfer_paged_causal_convention_matches_attend(dtype):
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for batch, extend_lens in _scenarios(dtype):
        q, qo = batch.queries(extend_lens)
        ours = batch.store_attention(q, qo).float()
        layout = build_layout(batch.store, LAYER, *pad_slot_lists(batch.slots))
        folded = fold_queries(q, qo, H)
        assert folded.qo_indptr.tolist()[-1] == q.shape[0] * H
        out, _ = _paged_plan_emulation(batch.store, layout, folded, causal=True, scaling=1 / math.sqrt(D))
        emulated = folded.unfold(out, q.shape[0])
        err = (emulated - ours).norm() / ours.norm()
        assert err < tol, f"relative error {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_flashinfer_ragged_plus_paged_prefix_convention_matches_attend(dtype):
    """SGLang's default FlashInfer extend: prefix via a non-causal paged plan over the kept prefix, new tokens via
    a causal ragged pass on the raw K/V, merged by LSE (empty prefix heads have LSE -inf)."""
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    scaling = 1 / math.sqrt(D)
    for batch, extend_lens in _scenarios(dtype):
        q, qo = batch.queries(extend_lens)
        ours = batch.store_attention(q, qo).float()
        token_slots, seq_lens = pad_slot_lists(batch.slots)
        prefix_lens = seq_lens - torch.tensor(extend_lens)
        prefix_layout = build_layout(batch.store, LAYER, token_slots, prefix_lens)
        folded = fold_queries(q, qo, H)
        out_prefix, lse_prefix = _paged_plan_emulation(batch.store, prefix_layout, folded, causal=False,
                                                       scaling=scaling)
        ragged_out, ragged_lse = [], []
        for b, n in enumerate(extend_lens):  # folded order: request b, head h, its n new tokens
            for h in range(H):
                s = b * H + h
                qs = folded.q[int(folded.qo_indptr[s]) : int(folded.qo_indptr[s + 1])]
                k_new = batch.k[b][-n:, h].to(dtype)
                v_new = batch.v[b][-n:, h].to(dtype)
                causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
                o, lse = _sequence_attention(qs, k_new, v_new, causal, scaling)
                ragged_out.append(o)
                ragged_lse.append(lse)
        merged = _merge_by_lse(out_prefix, lse_prefix, torch.cat(ragged_out), torch.cat(ragged_lse))
        emulated = folded.unfold(merged, q.shape[0])
        err = (emulated - ours).norm() / ours.norm()
        assert err < tol, f"relative error {err:.3g}"


def test_fold_queries_round_trip_and_decode_is_a_plain_view():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(9, H * G, D, generator=gen)
    qo = QueryLayout.for_extend(torch.tensor([10, 4, 6]), torch.tensor([5, 1, 3]))
    folded = fold_queries(q, qo, H)
    assert folded.q.shape == (9 * H, G, D)
    # sequence (request 0, head 1): request 0's 5 tokens, query heads G..2G-1
    s = 1
    torch.testing.assert_close(folded.q[int(folded.qo_indptr[s]) : int(folded.qo_indptr[s + 1])], q[:5, G : 2 * G])
    torch.testing.assert_close(folded.unfold(folded.q, 9), q)
    dq = torch.randn(4, H * G, D, generator=gen)
    decode = fold_queries(dq, QueryLayout.for_decode(torch.tensor([3, 8, 1, 2])), H)
    torch.testing.assert_close(decode.q, dq.view(4 * H, G, D))
