"""Per-layer attention metadata over the head-granular store, with KV heads folded into the batch.

Each (request ``b``, KV head ``h``) is one sequence ``s = b·H + h`` with one KV head: its keys are the cells of
the request's token slots, in position order, whose ``slot_to_cell[slot, layer, h]`` is ≥ 0 (stream compaction;
pruned entries simply do not appear). Lengths differ per (layer, head), so the metadata is built per layer.

``HeadFoldedLayout`` (``bs`` requests, ``H`` KV heads, ``nnz`` kept entries):

* ``kv_indptr``   int32 ``[bs·H + 1]``  — sequence ``s`` owns ``kv_indices[kv_indptr[s]:kv_indptr[s+1]]``;
* ``kv_indices``  int32 ``[nnz]``       — cell ids (rows of ``k_cells`` / ``v_cells``), ascending position per sequence;
* ``kv_positions`` int32 ``[nnz]``      — absolute token position of each kept entry (for causal masks);
* ``kv_lens``     int32 ``[bs, H]``     — kept entries per (request, head).

FlashInfer mapping (page size 1, one plan per layer; implemented and verified by the GPU issue, #7):

* paged KV cache (NHD): ``(store.k_cells.view(N + 1, 1, 1, d), store.v_cells.view(N + 1, 1, 1, d))`` —
  ``[num_pages, page_size = 1, num_kv_heads = 1, head_dim]``, zero copy; a cell id is a page id;
* ``wrapper.plan(kv_indptr, kv_indices, kv_last_page_len = ones(bs·H), num_qo_heads = G, num_kv_heads = 1,
  head_dim = d, page_size = 1, ...)`` with ``G = H_q / H`` (GQA group; query head ``j`` reads KV head ``j // G``);
* queries (``fold_queries``): decode ``q [bs, H_q, d] → view [bs·H, G, d]``; extend: request ``b``'s ``n_b`` new
  tokens ``[n_b, H_q, d] → [n_b, H, G, d] → permute [H, n_b, G, d] → [H·n_b, G, d]`` with
  ``qo_indptr = cumsum(repeat_interleave(extend_lens, H))``; ``FoldedQueries.unfold`` puts outputs back.
* FlashInfer's causal mask aligns the queries with the *end* of each KV list. That is exact here when the new
  tokens' K/V are written (all heads hold a cell) before the layout is built: they are then the last ``n_b``
  entries of every (b, h) list, and every kept prefix entry precedes them. For SGLang's ragged extend (new
  tokens attended from the raw ``k, v`` and merged by LSE) build the layout over the prefix only
  (``seq_lens = extend_prefix_lens``) and plan it non-causal. The torch path (``attention.attend``) masks by
  ``kv_positions`` and needs neither assumption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzap_sglang.storage.cell_store import CellStore


@dataclass(frozen=True)
class HeadFoldedLayout:
    """Kept entries of one layer for a batch, one sequence per (request, KV head); see the module docstring."""

    kv_indptr: torch.Tensor  # int32 [bs*H + 1]
    kv_indices: torch.Tensor  # int32 [nnz] cell ids
    kv_positions: torch.Tensor  # int32 [nnz] absolute positions
    kv_lens: torch.Tensor  # int32 [bs, H]
    num_kv_heads: int

    @property
    def batch_size(self) -> int:
        return self.kv_lens.shape[0]

    @property
    def num_entries(self) -> int:
        return self.kv_indices.numel()

    @property
    def kv_last_page_len(self) -> torch.Tensor:
        """int32 ``[bs·H]`` of ones: every page holds one entry (FlashInfer's ``paged_kv_last_page_len``)."""
        return torch.ones(self.kv_lens.numel(), dtype=torch.int32, device=self.kv_lens.device)


@dataclass(frozen=True)
class QueryLayout:
    """Where each request's query rows are.

    * ``qo_indptr`` int64 ``[bs + 1]`` — request ``b``'s queries are rows ``qo_indptr[b]:qo_indptr[b+1]`` of ``q``;
    * ``q_positions`` int64 ``[num_tokens]`` — absolute position of each query token.
    """

    qo_indptr: torch.Tensor
    q_positions: torch.Tensor

    @classmethod
    def for_extend(cls, seq_lens: torch.Tensor, extend_lens: torch.Tensor) -> "QueryLayout":
        """New tokens at the end of each request: request ``b`` holds ``seq_lens[b]`` tokens after this forward,
        of which the last ``extend_lens[b]`` are queries (``extend_lens == 1`` is decode)."""
        seq_lens = seq_lens.to(torch.int64)
        extend_lens = extend_lens.to(torch.int64)
        if bool((extend_lens > seq_lens).any()) or bool((extend_lens < 0).any()):
            raise ValueError("need 0 <= extend_lens <= seq_lens")
        qo_indptr = torch.zeros(seq_lens.numel() + 1, dtype=torch.int64, device=seq_lens.device)
        torch.cumsum(extend_lens, dim=0, out=qo_indptr[1:])
        request = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=seq_lens.device), extend_lens)
        first = (seq_lens - extend_lens)[request]  # position of each request's first new token
        q_positions = first + torch.arange(int(qo_indptr[-1]), device=seq_lens.device) - qo_indptr[request]
        return cls(qo_indptr, q_positions)

    @classmethod
    def for_decode(cls, seq_lens: torch.Tensor) -> "QueryLayout":
        """One query per request, at position ``seq_lens[b] - 1``."""
        return cls.for_extend(seq_lens, torch.ones_like(seq_lens))


@dataclass(frozen=True)
class BatchSlots:
    """A batch's token slots by position with padding masked, shared by every layer of one forward.

    * ``flat`` int64 ``[bs·T]`` — slot ids, row-major; positions ``p >= seq_lens[b]`` read slot 0 (it has no cells);
    * ``in_seq`` bool ``[bs, T]`` — which positions belong to their request;
    * ``num_in_seq`` — how many do (``sum(seq_lens)``).
    """

    flat: torch.Tensor
    in_seq: torch.Tensor
    num_in_seq: int

    @classmethod
    def of(cls, token_slots: torch.Tensor, seq_lens: torch.Tensor, device) -> "BatchSlots":
        """``token_slots`` integer ``[bs, T]`` with ``T >= max(seq_lens)`` (SGLang: ``req_to_token[req_pool_indices,
        :T]``); ``seq_lens`` integer ``[bs]`` tokens per request to read (including this forward's when written)."""
        bs, max_len = token_slots.shape
        seq_lens = seq_lens.to(device=device, dtype=torch.int64)
        if seq_lens.numel() != bs:
            raise ValueError(f"token_slots has {bs} rows but seq_lens has {seq_lens.numel()} entries")
        if bs and int(seq_lens.max()) > max_len:
            raise ValueError(f"seq_lens up to {int(seq_lens.max())} exceed token_slots width {max_len}")
        in_seq = torch.arange(max_len, device=device)[None, :] < seq_lens[:, None]
        flat = torch.where(in_seq, token_slots.to(device=device, dtype=torch.int64), 0).reshape(-1)
        return cls(flat, in_seq, int(seq_lens.sum()))


def layer_cells(store: CellStore, layer: int, slots: BatchSlots) -> torch.Tensor:
    """int32 ``[bs, T, H]``: the cell of every (request, position, KV head) entry of layer ``layer``, -1 where pruned,
    not written yet, or padding."""
    # Gather only this layer's H columns with index_select: advanced indexing over the whole [S+1, L, H] map was
    # 10-100x slower on a loaded 2-core CPU (measured).
    bs, max_len = slots.in_seq.shape
    return store.slot_to_cell[:, layer].index_select(0, slots.flat).view(bs, max_len, store.config.num_kv_heads)


def holds_every_entry(cells: torch.Tensor, slots: BatchSlots) -> bool:
    """Whether nothing of the batch is pruned in this layer (``cells`` from ``layer_cells``)."""
    # Padding positions read slot 0, which never maps to a cell, so counting held entries is enough (two ops a
    # layer instead of masking the padding out).
    return int((cells >= 0).sum()) == slots.num_in_seq * cells.shape[2]


def layout_from_cells(cells: torch.Tensor, slots: BatchSlots) -> HeadFoldedLayout:
    """Compact one layer's kept entries (``cells`` from ``layer_cells``) into the head-folded layout."""
    bs, max_len, num_heads = cells.shape
    cells = cells.transpose(1, 2).contiguous()  # [bs, H, T]; slot 0 (padding) maps to -1
    keep = (cells >= 0) & slots.in_seq[:, None, :]
    kv_lens = keep.sum(dim=-1, dtype=torch.int32)  # [bs, H]
    kv_indptr = torch.zeros(bs * num_heads + 1, dtype=torch.int32, device=cells.device)
    torch.cumsum(kv_lens.reshape(-1), dim=0, out=kv_indptr[1:])
    # Flat (b, h, t) row-major order: sequences in s = b·H + h order, positions ascending within each.
    kept_at = keep.reshape(-1).nonzero().squeeze(1)
    kv_indices = cells.reshape(-1).index_select(0, kept_at)
    kv_positions = (kept_at % max(max_len, 1)).to(torch.int32)
    return HeadFoldedLayout(kv_indptr, kv_indices, kv_positions, kv_lens, num_heads)


def build_layout(store: CellStore, layer: int, token_slots: torch.Tensor, seq_lens: torch.Tensor) -> HeadFoldedLayout:
    """Compact layer ``layer``'s kept entries of a batch (``token_slots``, ``seq_lens`` as in ``BatchSlots.of``;
    entries at ``p >= seq_lens[b]`` are ignored). A caller reading several layers of one batch builds
    ``BatchSlots`` once and calls ``layout_from_cells(layer_cells(...))`` per layer.

    Returns:
        ``HeadFoldedLayout`` (vectorised; cost O(bs·T·H)).
    """
    slots = BatchSlots.of(token_slots, seq_lens, store.device)
    return layout_from_cells(layer_cells(store, layer, slots), slots)


def pad_slot_lists(slot_lists: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-request slot lists ``[T_b]`` into ``token_slots [bs, max T_b]`` (padded with slot 0) and
    ``seq_lens [bs]`` — the ``build_layout`` inputs for callers without a ``req_to_token`` table."""
    seq_lens = torch.tensor([s.numel() for s in slot_lists], dtype=torch.int64)
    if not slot_lists:
        return torch.zeros(0, 0, dtype=torch.int64), seq_lens
    token_slots = torch.nn.utils.rnn.pad_sequence(
        [s.reshape(-1).to(torch.int64) for s in slot_lists], batch_first=True, padding_value=0
    )
    return token_slots, seq_lens


@dataclass(frozen=True)
class FoldedQueries:
    """Queries regrouped per (request, KV head) sequence, as FlashInfer's folded batch takes them.

    * ``q``         ``[R, G, d]`` — rows of sequence ``s = b·H + h`` are ``q[qo_indptr[s]:qo_indptr[s+1]]``, in
      token order, each with the ``G`` query heads of KV head ``h``;
    * ``qo_indptr`` int32 ``[bs·H + 1]``;
    * ``rows``      int64 ``[R]`` — row of ``q_unfolded.view(num_tokens·H, G, d)`` each folded row came from.
    """

    q: torch.Tensor
    qo_indptr: torch.Tensor
    rows: torch.Tensor

    def unfold(self, out: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Folded outputs ``[R, G, d]`` → ``[num_tokens, H·G, d]`` in the original token order."""
        group, dim = out.shape[1:]
        full = out.new_zeros(num_tokens * (self.rows.numel() // max(num_tokens, 1)), group, dim)
        full.index_copy_(0, self.rows, out)
        return full.view(num_tokens, -1, dim)


def fold_queries(q: torch.Tensor, queries: QueryLayout, num_kv_heads: int) -> FoldedQueries:
    """Fold ``q`` ``[num_tokens, H_q, d]`` (rows grouped by request as in ``queries``) into ``bs·H`` sequences.

    Decode is the special case ``[bs, H_q, d] → [bs·H, G, d]`` (a plain view); extend moves each request's
    ``[n_b, H, G, d]`` block to ``[H, n_b, G, d]``.
    """
    num_tokens, num_q_heads, dim = q.shape
    group = num_q_heads // num_kv_heads
    q_lens = queries.qo_indptr[1:] - queries.qo_indptr[:-1]  # [bs]
    seq_lens = q_lens.repeat_interleave(num_kv_heads)  # [bs·H]: every head of request b has n_b query rows
    qo_indptr = torch.zeros(seq_lens.numel() + 1, dtype=torch.int64, device=q.device)
    torch.cumsum(seq_lens, dim=0, out=qo_indptr[1:])
    seq = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=q.device), seq_lens)  # [R]
    token = queries.qo_indptr[seq // num_kv_heads] + torch.arange(seq.numel(), device=q.device) - qo_indptr[seq]
    rows = token * num_kv_heads + seq % num_kv_heads
    folded = q.reshape(num_tokens * num_kv_heads, group, dim).index_select(0, rows)
    return FoldedQueries(folded, qo_indptr.to(torch.int32), rows)
