"""SGLang attention backend ``kvzap_flashinfer``: FlashInfer kernels over KVzap's cell store on CUDA (issue #7).

Same seams and per-forward metadata as the CPU backend (``attention_backend.KvzapTorchAttnBackend``, whose
``init_forward_metadata`` and pool checks it inherits); only the per-layer attention differs:

1. write this forward's K/V into the tokens' cells (``set_kv_buffer``; cells were reserved at slot allocation);
2. the layer's head-folded layout (``layout_from_cells`` over the forward's ``BatchSlots``: kept cells per
   (request, KV head), heads folded into the batch);
3. ``FlashInferCellAttention.decode`` (decode wrapper) or ``.extend`` (one causal paged-prefill call: the new tokens
   were just written and are pruned only after this layer's attention, so they end every list — checked).

One FlashInfer plan per layer (lengths differ per layer and head), so this backend is not CUDA-graph capturable:
it stays behind SGLang's ``torch_native`` name on KVzap servers, for which SGLang switches CUDA graphs off by
itself (``arg_groups/attention_hook.py``). ``register()`` makes that name pick this backend on CUDA and the torch
backend elsewhere, and also registers the explicit name ``kvzap_flashinfer``.

Per-step planning cost: with ``KVZAP_FLASHINFER_TIMING=1`` every plan and run is timed (device syncs around each)
and the running averages are logged every ``LOG_EVERY`` forwards.
"""

from __future__ import annotations

import logging
import os

import torch

from kvzap_sglang.plugin import seams
from kvzap_sglang.plugin.attention_backend import KvzapTorchAttnBackend, create_kvzap_torch_backend
from kvzap_sglang.storage import layer_cells, layout_from_cells
from kvzap_sglang.storage.flashinfer_attention import FlashInferCellAttention

logger = logging.getLogger(__name__)

BACKEND_NAME = "kvzap_flashinfer"
SERVED_NAME = "torch_native"  # the name KVzap's launch sets (CUDA graphs off); dispatched on the runner's device
TIMING_ENV = "KVZAP_FLASHINFER_TIMING"
LOG_EVERY = 200


class KvzapFlashInferAttnBackend(KvzapTorchAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        if torch.device(self.device).type != "cuda":
            raise RuntimeError(f"the {BACKEND_NAME} attention backend needs a CUDA device, got {self.device!r}")
        self.attention = FlashInferCellAttention(self.device, measure=os.environ.get(TIMING_ENV) == "1")
        self.forwards = 0

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.forwards += 1
        if self.attention.measure and self.forwards % LOG_EVERY == 0:
            t = self.attention.times
            logger.info(
                "kvzap_flashinfer: %d forwards, plan %.1f us/call (%d calls), run %.1f us/call (%d calls)",
                self.forwards, 1e6 * t.plan_s / max(t.plans, 1), t.plans, 1e6 * t.run_s / max(t.runs, 1), t.runs,
            )  # fmt: skip

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache):
        """q ``[num_tokens, H_q·d]``, k/v ``[num_tokens, H·d]`` → ``[num_tokens, H_q·d]``."""
        if layer.is_cross_attention or layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError("KVzap supports self-attention with equal K/V head dims")
        if getattr(layer, "logit_cap", 0) or getattr(layer, "sliding_window_size", -1) not in (None, -1):
            raise NotImplementedError("kvzap_flashinfer plans neither logit soft-capping nor sliding windows")
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        view = self.view
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        cells = layer_cells(self.store, layer.layer_id - self.pool.start_layer, self.slots)
        layout = layout_from_cells(cells, self.slots)
        cells = (self.store.k_cells, self.store.v_cells)
        if view.is_decode:
            out = self.attention.decode(q3, *cells, layout, scaling=layer.scaling)
        else:
            out = self.attention.extend(q3, *cells, layout, view.queries, scaling=layer.scaling)
        return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)

    def support_triton(self):
        return False


def create_kvzap_flashinfer_backend(model_runner) -> KvzapFlashInferAttnBackend:
    seams.verify_hooks_applied()
    return KvzapFlashInferAttnBackend(model_runner)


def backend_factory_for(device: str | torch.device):
    """The KVzap backend factory for a model runner's device: FlashInfer on CUDA, torch elsewhere."""
    return create_kvzap_flashinfer_backend if torch.device(device).type == "cuda" else create_kvzap_torch_backend


def create_kvzap_backend(model_runner):
    return backend_factory_for(model_runner.device)(model_runner)


def register() -> None:
    """Register ``kvzap_flashinfer`` and make KVzap's served backend name pick it on CUDA.

    Call in processes where KVzap is on, after the ``kvzap_torch`` registration (this replaces the ``torch_native``
    factory with the device dispatch ``create_kvzap_backend``). Idempotent.
    """
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append(BACKEND_NAME)
    register_attention_backend(BACKEND_NAME)(create_kvzap_flashinfer_backend)
    register_attention_backend(SERVED_NAME)(create_kvzap_backend)
