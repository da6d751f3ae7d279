"""Attention over the head-granular cell store for SGLang's CPU path (registered as ``kvzap_torch``).

Per layer: write this forward's K/V into the tokens' cells, gather the layer's cells of the batch
(``storage.layer_cells``, over the ``BatchSlots`` built once per forward), then attend:

* nothing pruned in this layer for this batch → the very computation of SGLang's ``torch_native`` backend (one SDPA
  per request over the same bf16 K/V, gathered from cells), so KVzap with nothing removed gives SGLang's outputs bit
  for bit;
* otherwise → ``storage.attend`` over the head-folded layout of the kept entries (``layout_from_cells``: each
  (request, KV head) one sequence with its GQA group as query heads; causal by kept positions), the same metadata a
  FlashInfer plan uses (issue #7).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from torch.nn.functional import scaled_dot_product_attention

from kvzap_sglang.plugin import runtime, seams
from kvzap_sglang.plugin.cell_pool import KvzapCellPool
from kvzap_sglang.storage import (
    BatchSlots,
    QueryLayout,
    attend,
    holds_every_entry,
    layer_cells,
    layout_from_cells,
)


class KvzapTorchAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.pool: KvzapCellPool = model_runner.token_to_kv_pool
        if not isinstance(self.pool, KvzapCellPool):
            raise RuntimeError("the kvzap_torch attention backend needs KVzap's cell pool (start with --kvzap-threshold)")
        self.store = self.pool.store
        rt = runtime.current()
        if rt is not None:
            rt.track_windows(self.req_to_token_pool.req_to_token.shape[0])

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_idle():
            return
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        is_decode = forward_batch.forward_mode.is_decode()
        extend_lens = torch.ones_like(seq_lens) if is_decode else forward_batch.extend_seq_lens.to(torch.int64)
        max_len = int(seq_lens.max()) if seq_lens.numel() else 0
        token_slots = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, :max_len].to(torch.int64)
        view = runtime.BatchView(
            rows=forward_batch.req_pool_indices.to(torch.int64),
            token_slots=token_slots,
            seq_lens=seq_lens,
            prev_lens=seq_lens - extend_lens,
            queries=QueryLayout.for_extend(seq_lens, extend_lens),
            out_cache_loc=forward_batch.out_cache_loc.to(torch.int64),
            is_decode=is_decode,
        )
        rt = runtime.current()
        if rt is not None:
            rt.begin_forward(view)
        self.view = view
        self.slots = BatchSlots.of(token_slots, seq_lens, self.store.device)  # read by every layer of this forward

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache):
        """q ``[num_tokens, H_q·d]``, k/v ``[num_tokens, H·d]`` → ``[num_tokens, H_q·d]``."""
        if layer.is_cross_attention or layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError("KVzap supports self-attention with equal K/V head dims")
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        view = self.view
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        layer_idx = layer.layer_id - self.pool.start_layer
        # One gather of this layer's cells serves both paths: nothing pruned for this batch → the dense path reads
        # K/V through them; otherwise they are compacted into the layout. (Building the layout just to count its
        # entries, then gathering the cells again by advanced indexing, cost 3-4x more per layer on CPU.)
        cells = layer_cells(self.store, layer_idx, self.slots)
        if holds_every_entry(cells, self.slots):
            out = self._dense(q3, layer, cells, view)
        else:
            layout = layout_from_cells(cells, self.slots)
            out = attend(q3, self.store.k_cells, self.store.v_cells, layout, view.queries, scaling=layer.scaling)
        return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    def _dense(self, q, layer, cells, view):
        """SGLang torch_native's per-request SDPA (same op order and shapes) with K/V gathered from ``cells``
        (``[bs, T, H]``, every in-sequence entry held)."""
        out = torch.empty_like(q)
        query = q.movedim(0, 1)  # [H_q, num_tokens, d]
        use_gqa = layer.tp_q_head_num != layer.tp_k_head_num
        starts = view.queries.qo_indptr.tolist()
        num_heads, head_dim = cells.shape[2], self.store.k_cells.shape[1]
        for b, seq_len in enumerate(view.seq_lens.tolist()):
            start_q, end_q = starts[b], starts[b + 1]
            n_q = end_q - start_q
            flat = cells[b, :seq_len].reshape(-1).to(torch.int64)  # [L·H], position-major
            key = self.store.k_cells.index_select(0, flat).view(seq_len, num_heads, head_dim).movedim(0, 1)  # [H, L, d]
            value = self.store.v_cells.index_select(0, flat).view(seq_len, num_heads, -1).movedim(0, 1)
            per_req_query = query[:, start_q:end_q, :]
            if key.dtype != per_req_query.dtype:
                key, value = key.to(per_req_query.dtype), value.to(per_req_query.dtype)
            if view.is_decode:
                # torch_native decode: one query, is_causal=False
                attn = scaled_dot_product_attention(
                    per_req_query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                    enable_gqa=use_gqa, scale=layer.scaling, is_causal=False,
                )  # fmt: skip
                out[start_q:end_q] = attn.squeeze(0).movedim(1, 0)
                continue
            # torch_native extend: queries padded at the front to seq_len, causal, prefix rows dropped
            padded = torch.empty((query.shape[0], seq_len, query.shape[2]), dtype=query.dtype, device=query.device)
            padded[:, seq_len - n_q :, :] = per_req_query
            attn = scaled_dot_product_attention(
                padded.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                enable_gqa=use_gqa, scale=layer.scaling, is_causal=True,
            ).squeeze(0).movedim(1, 0)  # fmt: skip
            out[start_q:end_q] = attn[seq_len - n_q :]
        return out

    def support_triton(self):
        return False


def create_kvzap_torch_backend(model_runner) -> KvzapTorchAttnBackend:
    seams.verify_hooks_applied()  # every KVzap scheduler builds its backend before serving, whichever hooks failed
    return KvzapTorchAttnBackend(model_runner)
