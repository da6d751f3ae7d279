"""FlashInfer attention over the pruned, head-granular store (the GPU path; ``attention.attend`` is its reference).

Same metadata as the torch path (``layout.py``): a layer's ``HeadFoldedLayout`` makes every (request ``b``, KV head
``h``) one sequence ``s = b·H + h`` with ``num_kv_heads = 1`` and the GQA group (``G = H_q / H`` query heads) as its
query heads, over a paged KV cache of page size 1 whose pages are the store's cells
(``k_cells.view(N + 1, 1, 1, d)``, zero copy). Lengths differ per (layer, head), so every layer is planned on its
own: ``plan`` (host-side scheduling; FlashInfer copies the indptr arrays to the host, a device sync) then ``run``.
``PhaseTimes`` keeps the two apart so that the per-layer planning cost stays visible.

Three ways to attend, all equal to ``attend`` (tests/core/test_flashinfer_attention.py; on CUDA with the real
kernels, scripts/gpu/check.sh):

* ``decode``   — one query per request: ``BatchDecodeWithPagedKVCacheWrapper`` over the whole layout (every kept
  entry precedes the query, so no mask); ``q [bs, H_q, d]`` is a plain view ``[bs·H, G, d]``.
* ``extend``   — one causal ``BatchPrefillWithPagedKVCacheWrapper`` call over the layout that already holds this
  forward's tokens. FlashInfer aligns the queries with the *end* of each KV list, which is exact iff each
  sequence's last ``n_b`` entries are the request's ``n_b`` new tokens (true once they are written, before any is
  pruned: what the SGLang adapter guarantees). ``new_tokens_are_tails`` checks it; ``extend`` refuses otherwise.
* ``extend_ragged`` — SGLang's default FlashInfer extend: the new tokens attend to their own raw K/V through
  ``BatchPrefillWithRaggedKVCacheWrapper`` (causal, per request, ``num_kv_heads = H``, no folding), the kept
  cached prefix through a non-causal paged plan over the prefix-only layout (folded), and the two partial results
  are merged by their log-sum-exp (``merge_state``). An emptied prefix head gets output 0 and an LSE of about
  −5e4 (FlashInfer's finite "−inf", ``math.cuh``), so it drops out of the merge.

FlashInfer is imported lazily (``require_flashinfer``): the core imports on machines without it, and every kernel
needs a CUDA device (../shared/notes/environment.md §8). The plan-argument builders (``decode_plan_args``,
``paged_prefill_plan_args``, ``ragged_plan_args``) are pure torch and are what the CPU tests check.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kvzap_sglang.storage.layout import FoldedQueries, HeadFoldedLayout, QueryLayout, fold_queries

# FlashInfer's recommended float workspace (split-k partial results); SGLang uses the same default.
DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024
# GQA group sizes FlashInfer's CUDA-core decode kernel is compiled for (DISPATCH_GQA_GROUP_SIZE); other groups
# go through the tensor-core (prefill) decode kernel.
CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4, 8)
PAGE_SIZE = 1  # a cell is a page: pruning frees single entries, so pages cannot hold several tokens


class FlashInferUnavailable(ImportError):
    """FlashInfer is not installed (it is not a dependency of the CPU environment; see scripts/gpu/README.md)."""


def require_flashinfer():
    """Import and return the ``flashinfer`` module, or raise ``FlashInferUnavailable`` saying how to get it."""
    try:
        import flashinfer
    except ImportError as error:
        raise FlashInferUnavailable(
            "kvzap's GPU attention path needs FlashInfer (flashinfer-python 0.6.15.post1 for torch 2.11 / CUDA 13, "
            "0.7.2 with SGLang 0.5.23's torch 2.14.1); it is not installed: "
            f"{error}. See scripts/gpu/README.md."
        ) from error
    return flashinfer


# ---------------------------------------------------------------------------------------------- plan arguments


def paged_kv_cache(k_cells: torch.Tensor, v_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's cells ``[N + 1, d]`` as FlashInfer's NHD paged cache ``[num_pages, page_size=1, num_kv_heads=1, d]``
    (views: no copy; cell id = page id)."""
    return k_cells.view(-1, 1, 1, k_cells.shape[-1]), v_cells.view(-1, 1, 1, v_cells.shape[-1])


def decode_plan_args(layout: HeadFoldedLayout, group_size: int, head_dim: int) -> dict[str, Any]:
    """Positional-by-name arguments of ``BatchDecodeWithPagedKVCacheWrapper.plan`` for one layer.

    ``bs·H`` sequences: ``indptr`` int32 ``[bs·H + 1]``, ``indices`` int32 ``[nnz]`` cell ids,
    ``last_page_len`` int32 ``[bs·H]`` of ones (a page holds one entry, so a sequence of length 0 has none).
    """
    return {
        "indptr": layout.kv_indptr,
        "indices": layout.kv_indices,
        "last_page_len": layout.kv_last_page_len,
        "num_qo_heads": group_size,
        "num_kv_heads": 1,
        "head_dim": head_dim,
        "page_size": PAGE_SIZE,
    }


def paged_prefill_plan_args(
    layout: HeadFoldedLayout, folded: FoldedQueries, group_size: int, head_dim: int, causal: bool
) -> dict[str, Any]:
    """Arguments of ``BatchPrefillWithPagedKVCacheWrapper.plan`` for one layer: the decode arguments plus the folded
    queries' ``qo_indptr`` int32 ``[bs·H + 1]`` and the causal flag."""
    if folded.qo_indptr.numel() != layout.kv_indptr.numel():
        raise ValueError(f"{folded.qo_indptr.numel() - 1} query sequences but {layout.kv_indptr.numel() - 1} KV sequences")
    return {
        "qo_indptr": folded.qo_indptr,
        "paged_kv_indptr": layout.kv_indptr,
        "paged_kv_indices": layout.kv_indices,
        "paged_kv_last_page_len": layout.kv_last_page_len,
        "num_qo_heads": group_size,
        "num_kv_heads": 1,
        "head_dim_qk": head_dim,
        "page_size": PAGE_SIZE,
        "causal": causal,
    }


def ragged_plan_args(queries: QueryLayout, num_q_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Arguments of ``BatchPrefillWithRaggedKVCacheWrapper.plan`` for the new tokens attending to themselves.

    Not folded: one sequence per request with its own ``H`` KV heads (the new tokens' K/V are never pruned before
    this forward's attention), queries and keys both at ``qo_indptr`` (int32 ``[bs + 1]``), causal.
    """
    indptr = queries.qo_indptr.to(torch.int32)
    return {
        "qo_indptr": indptr,
        "kv_indptr": indptr,
        "num_qo_heads": num_q_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim_qk": head_dim,
        "causal": True,
    }


def new_tokens_are_tails(layout: HeadFoldedLayout, folded: FoldedQueries, queries: QueryLayout) -> bool:
    """Whether FlashInfer's end-aligned causal mask is exact on ``layout``: for every sequence ``s = b·H + h``, its last
    ``n_b`` kept entries are at the positions of request ``b``'s ``n_b`` query tokens, in order.

    Vectorised (one device sync): folded row ``r`` of sequence ``s`` (``j = r − qo_indptr[s]``) must meet the KV entry
    ``kv_indptr[s + 1] − n_b + j`` at its own token's position.
    """
    num_rows = folded.q.shape[0]
    if num_rows == 0:
        return True
    q_lens = (folded.qo_indptr[1:] - folded.qo_indptr[:-1]).to(torch.int64)  # [bs·H]
    kv_lens = layout.kv_lens.reshape(-1).to(torch.int64)
    if bool((kv_lens < q_lens).any()):
        return False
    seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=q_lens.device), q_lens)  # [R]
    offset = torch.arange(num_rows, device=seq.device) - folded.qo_indptr[seq].to(torch.int64)
    at = layout.kv_indptr[seq + 1].to(torch.int64) - q_lens[seq] + offset
    token = folded.rows // layout.num_kv_heads  # folded.rows = token·H + h
    return bool((layout.kv_positions[at].to(torch.int64) == queries.q_positions[token]).all())


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class PhaseTimes:
    """Seconds spent in FlashInfer ``plan`` (host scheduling + indptr copy) vs ``run`` (kernels), when measured.

    Measuring synchronises the device around each phase (so the figures add up to wall time); leave it off in
    serving. ``plans``/``runs`` count calls either way.
    """

    plan_s: float = 0.0
    run_s: float = 0.0
    plans: int = 0
    runs: int = 0

    def reset(self) -> None:
        self.plan_s = self.run_s = 0.0
        self.plans = self.runs = 0


# ---------------------------------------------------------------------------------------------- executor


class FlashInferCellAttention:
    """FlashInfer wrappers planned per layer over a ``CellStore``'s cells (see the module docstring).

    One instance per device/process; wrappers share one float workspace as in SGLang (their runs are sequential on
    the current stream). Not CUDA-graph safe: ``plan`` runs on the host every layer.

    Args:
        device: a CUDA device.
        workspace_bytes: float workspace size.
        backend: FlashInfer prefill backend, ``"fa2"`` by default (what SGLang's FlashInfer backend plans paged
            prefill and decode with; it handles empty sequences: output 0, LSE −inf).
        measure: accumulate ``times`` with device syncs around every plan and run.
    """

    def __init__(
        self,
        device: torch.device | str,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        backend: str = "fa2",
        measure: bool = False,
    ) -> None:
        self.fi = require_flashinfer()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"FlashInfer kernels need a CUDA device, got {self.device}")
        self.backend = backend
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self.paged = self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=backend)
        self.ragged = self.fi.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD", backend=backend)
        self._decoders: dict[bool, Any] = {}  # use_tensor_cores -> wrapper (built on first use)
        self.measure = measure
        self.times = PhaseTimes()

    # -------------------------------------------------------------- public API

    def decode(
        self,
        q: torch.Tensor,
        k_cells: torch.Tensor,
        v_cells: torch.Tensor,
        layout: HeadFoldedLayout,
        scaling: float | None = None,
    ) -> torch.Tensor:
        """One query per request over its kept entries (the query's own token included when written).

        Args:
            q: ``[bs, H_q, d]``; ``k_cells``, ``v_cells``: ``[N + 1, d]``; ``layout``: this layer's, over ``seq_lens``.

        Returns:
            ``[bs, H_q, d]`` in ``q.dtype``; zeros where a (request, KV head) holds no entry.
        """
        bs, num_q_heads, head_dim = q.shape
        group = self._group_size(num_q_heads, layout)
        if bs != layout.batch_size:
            raise ValueError(f"{bs} decode queries but {layout.batch_size} requests in the layout")
        if bs == 0:
            return torch.empty_like(q)
        wrapper = self._decoder(group)
        with self._phase("plan"):
            wrapper.plan(
                **decode_plan_args(layout, group, head_dim),
                q_data_type=q.dtype,
                kv_data_type=k_cells.dtype,
                sm_scale=_scale(scaling, head_dim),
            )
        folded = q.reshape(bs * layout.num_kv_heads, group, head_dim)  # decode folding is a plain view
        with self._phase("run"):
            out = wrapper.run(folded, paged_kv_cache(k_cells, v_cells))
        return out.view(bs, num_q_heads, head_dim)

    def extend(
        self,
        q: torch.Tensor,
        k_cells: torch.Tensor,
        v_cells: torch.Tensor,
        layout: HeadFoldedLayout,
        queries: QueryLayout,
        scaling: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of this forward's tokens in one paged call; their K/V must be in the cells already.

        Args:
            q: ``[num_tokens, H_q, d]`` grouped by request as in ``queries``; ``layout`` over ``seq_lens`` (new
                tokens included).

        Raises:
            ValueError: some sequence's last entries are not its new tokens (``new_tokens_are_tails``), e.g. a new
                token was pruned or not written; use ``extend_ragged`` then.
        """
        num_tokens, num_q_heads, head_dim = q.shape
        group = self._group_size(num_q_heads, layout)
        folded = fold_queries(q, queries, layout.num_kv_heads)
        if not new_tokens_are_tails(layout, folded, queries):
            raise ValueError(
                "paged causal extend needs every (request, KV head) list to end with the request's new tokens"
            )
        if num_tokens == 0:
            return torch.empty_like(q)
        out = self._paged_prefill(folded, k_cells, v_cells, layout, group, head_dim, scaling, causal=True)
        return folded.unfold(out, num_tokens)

    def extend_ragged(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cells: torch.Tensor,
        v_cells: torch.Tensor,
        prefix_layout: HeadFoldedLayout,
        queries: QueryLayout,
        scaling: float | None = None,
    ) -> torch.Tensor:
        """SGLang-style extend: new tokens on their raw K/V (ragged, causal) ⊕ the kept cached prefix (paged).

        Args:
            q: ``[num_tokens, H_q, d]``; ``k_new``, ``v_new``: ``[num_tokens, H, d]`` this forward's K/V, rows
                aligned with ``q``.
            prefix_layout: this layer's layout over the cached prefix only (``seq_lens − extend_lens``).

        Returns:
            ``[num_tokens, H_q, d]`` in ``q.dtype``.
        """
        num_tokens, num_q_heads, head_dim = q.shape
        num_heads = prefix_layout.num_kv_heads
        group = self._group_size(num_q_heads, prefix_layout)
        if k_new.shape != (num_tokens, num_heads, head_dim) or v_new.shape != k_new.shape:
            raise ValueError(f"k_new/v_new must be [{num_tokens}, {num_heads}, {head_dim}], got {tuple(k_new.shape)}")
        if num_tokens == 0:
            return torch.empty_like(q)
        scale = _scale(scaling, head_dim)
        with self._phase("plan"):
            self.ragged.plan(
                **ragged_plan_args(queries, num_q_heads, num_heads, head_dim),
                q_data_type=q.dtype,
                kv_data_type=k_new.dtype,
                sm_scale=scale,
            )
        with self._phase("run"):
            new_out, new_lse = self.ragged.run(q, k_new, v_new, return_lse=True)  # [n, H_q, d], [n, H_q]
        if prefix_layout.num_entries == 0:  # no kept prefix anywhere in the batch: nothing to merge
            return new_out
        folded = fold_queries(q, queries, num_heads)
        prefix_out, prefix_lse = self._paged_prefill(
            folded, k_cells, v_cells, prefix_layout, group, head_dim, scaling, causal=False, return_lse=True
        )
        prefix_out = folded.unfold(prefix_out, num_tokens)
        prefix_lse = folded.unfold(prefix_lse.unsqueeze(-1), num_tokens).squeeze(-1)  # [n, H_q]
        with self._phase("run"):
            out, _ = self.fi.merge_state(prefix_out, prefix_lse, new_out, new_lse)
        return out

    # -------------------------------------------------------------- helpers

    def _paged_prefill(self, folded, k_cells, v_cells, layout, group, head_dim, scaling, causal, return_lse=False):
        with self._phase("plan"):
            self.paged.plan(
                **paged_prefill_plan_args(layout, folded, group, head_dim, causal),
                q_data_type=folded.q.dtype,
                kv_data_type=k_cells.dtype,
                sm_scale=_scale(scaling, head_dim),
            )
        with self._phase("run"):
            return self.paged.run(folded.q, paged_kv_cache(k_cells, v_cells), return_lse=return_lse)

    def _decoder(self, group: int):
        tensor_cores = group not in CUDA_CORE_DECODE_GROUPS
        if tensor_cores not in self._decoders:
            self._decoders[tensor_cores] = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=tensor_cores, backend=self.backend
            )
        return self._decoders[tensor_cores]

    @staticmethod
    def _group_size(num_q_heads: int, layout: HeadFoldedLayout) -> int:
        if num_q_heads % layout.num_kv_heads:
            raise ValueError(f"H_q ({num_q_heads}) is not a multiple of H ({layout.num_kv_heads})")
        return num_q_heads // layout.num_kv_heads

    @contextmanager
    def _phase(self, name: str):
        if self.measure:
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
        try:
            yield
        finally:
            if self.measure:
                torch.cuda.synchronize(self.device)
                setattr(self.times, f"{name}_s", getattr(self.times, f"{name}_s") + time.perf_counter() - start)
            setattr(self.times, f"{name}s", getattr(self.times, f"{name}s") + 1)


def _scale(scaling: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scaling is None else float(scaling)
