"""Scheduler-side seams: where the cell pool is built and where each layer's tokens are scored and pruned.

* ``build_mha_kv_pool`` — AROUND ``KVCacheConfigurator._build_mha_kv_pool``: the configurator passes the pool class
  as a keyword, so KVzap swaps in ``KvzapCellPool`` with every other argument as SGLang computed it, then installs
  the runtime (loads and checks the surrogate against the model: a mismatch fails start-up).
* ``build_allocator`` — AROUND ``KVCacheConfigurator._build_token_to_kv_pool_allocator``: the slot allocator of
  the cell pool.
* ``score_after_attention`` — AROUND ``{Llama,Qwen2,Qwen3}Attention.forward``: after the layer's attention (this
  forward's K/V are in the cells), score the layer's post-norm inputs and prune window exits.
* ``release`` — AROUND ``release_kv_cache``: a request that gives its row back (finished, aborted, retracted)
  has its cell figures recorded for ``meta_info`` (``reporting.record_release``), then stops protecting the slots
  of its window. One hook for both: SGLang warns about several AROUND hooks on one target.
* ``admission`` — AROUND ``Scheduler.get_new_batch_prefill``: SGLang closes admission after a failed try until a
  request leaves; pruning frees cells without any request leaving, so KVzap reopens it when cells came back. With
  ``--kvzap-tenants`` it then applies the tenants' KV budgets (``tenants.admit_within_budgets``).
* (in ``tenants``) ``cap_to_budget`` — AROUND ``Scheduler.init_req_max_new_tokens``: under ``--kvzap-tenants``, a
  request's ``max_new_tokens`` is clipped to its tenant's budget and a prompt that cannot fit it is refused, as
  SGLang does for the whole pool.
"""

from __future__ import annotations

from kvzap_sglang.plugin import reporting, runtime, seams
from kvzap_sglang.plugin.cell_pool import KvzapCellPool, KvzapSlotAllocator
from kvzap_sglang.plugin.settings import KVzapSettings
from kvzap_sglang.plugin.tenants import admit_within_budgets

METRICS_REFRESH_S = 1.0  # the kvzap_* gauges between request ends, from the scheduler loop

ATTENTION_MODULES = (
    "sglang.srt.models.llama.LlamaAttention.forward",
    "sglang.srt.models.qwen2.Qwen2Attention.forward",
    "sglang.srt.models.qwen3.Qwen3Attention.forward",
)


def build_mha_kv_pool(original, self, *args, mha_pool_class=None, **kwargs):
    settings = KVzapSettings.from_env()
    if settings is None:
        return original(self, *args, mha_pool_class=mha_pool_class, **kwargs)
    seams.verify_hooks_applied()  # before anything is allocated: KVzap serves whole or not at all
    pool = original(self, *args, mha_pool_class=KvzapCellPool, **kwargs)
    runtime.install(settings, pool.store, self.model_config.hf_config, pool.dtype, start_layer=pool.start_layer)
    return pool


def build_allocator(original, self, *args, sizes=None, token_to_kv_pool=None, **kwargs):
    if not isinstance(token_to_kv_pool, KvzapCellPool):
        return original(self, *args, sizes=sizes, token_to_kv_pool=token_to_kv_pool, **kwargs)
    return KvzapSlotAllocator(
        sizes.max_total_num_tokens,
        dtype=self.kv_cache_dtype,
        device=self.device,
        kvcache=token_to_kv_pool,
        need_sort=False,
    )


def score_after_attention(original, self, positions=None, hidden_states=None, forward_batch=None, **kwargs):
    out = original(self, positions=positions, hidden_states=hidden_states, forward_batch=forward_batch, **kwargs)
    rt = runtime.current()
    if rt is not None and forward_batch is not None and not forward_batch.forward_mode.is_idle():
        rt.after_attention(self.attn.layer_id, hidden_states)
    return out


def release(original, req, tree_cache, *args, **kwargs):
    rt = runtime.current()
    kv = getattr(req, "kv", None)
    holds_row = rt is not None and kv is not None and kv.holds_kv and kv.req_pool_idx is not None
    if holds_row:
        reporting.record_release(rt, req, tree_cache)  # first: figures of the cells as the request held them
        rt.release_row(kv.req_pool_idx, tree_cache.req_to_token_pool.req_to_token[kv.req_pool_idx])
    result = original(req, tree_cache, *args, **kwargs)
    if holds_row:
        # With the radix cache the request's cells go to the tree, not back to the pool: no free refreshes the
        # gauges, so /metrics showed no kvzap_* line at all (review).
        runtime.notify_cells_released()
    return result


def admission(original, scheduler, running_batch, *args, **kwargs):
    """Reopen admission (clear ``running_batch.batch_is_full``) once pruning has made room for a waiting request,
    then run SGLang's admission (with the tenants' budgets under ``--kvzap-tenants``).

    SGLang sets the mark when an admission fails for lack of memory and clears it only when a request finishes or
    is retracted (``scheduler.py``). With KVzap, forwards free cells of running requests, so a waiting request may
    fit long before anyone leaves; without this, measured capacity stopped at 7 requests with room for an 8th
    (benchmarks/README.md, "Capacity"). A retry costs one pass of SGLang's own ``PrefillAdder`` over the queue, so
    it is tried only when cells came back since the mark was set and free + evictable memory covers the shortest
    waiting prompt (a necessary condition; SGLang's adder still decides).
    """
    rt = runtime.current()
    if rt is not None:
        reporting.metrics.update_at_most_every(rt, METRICS_REFRESH_S)  # pruning in long decodes frees no slot
    if rt is not None and running_batch.batch_is_full and _room_for_a_waiting_request(rt, scheduler):
        running_batch.batch_is_full = False
        rt.admissions_reopened += 1
    was_full = running_batch.batch_is_full
    if rt is not None and rt.tenants is not None:
        plan = admit_within_budgets(original, scheduler, running_batch, *args, **kwargs)
    else:
        plan = original(scheduler, running_batch, *args, **kwargs)
    if rt is not None and not was_full and plan.running_batch.batch_is_full:
        rt.admission_closed_at_free_cells = rt.store.free_cells()
    return plan


def _room_for_a_waiting_request(rt: runtime.KvzapRuntime, scheduler) -> bool:
    closed_at = rt.admission_closed_at_free_cells
    free = rt.store.free_cells()
    if closed_at is None or free < closed_at + rt.store.config.entries_per_token or not scheduler.waiting_queue:
        return False
    tree = scheduler.tree_cache
    evictable = tree.evictable_size() if tree is not None and not getattr(tree, "disable", True) else 0
    shortest = min(len(req.origin_input_ids) for req in scheduler.waiting_queue)
    return scheduler.token_to_kv_pool_allocator.available_size() + evictable >= shortest  # SGLang's admission figure
