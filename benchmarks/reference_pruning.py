"""Reference (Hugging Face transformers) path: answer a question from a pruned context cache.

What it reproduces (kvpress ``evaluate.py`` + ``DMSPress`` with ``decoding=False``; KVzap paper §3.3):

1. the context is prefilled **densely** (every context token attends to every earlier one);
2. a keep mask ``[L, H_kv, T_ctx]`` is chosen from scores of that prefill;
3. the question, the answer prefix and the generated tokens attend to the context **through the mask**: a
   pruned (layer, KV head, key) entry gets a ``-inf`` bias for every query head of its GQA group. The question
   and answer tokens themselves are never pruned (query-agnostic compression).

Masking instead of freeing is numerically the same as dropping the entries (softmax over the kept keys only);
the SGLang path frees them for real and is compared against this one.

The mask enters through a custom attention function registered with transformers' ``AttentionInterface``; it
reads ``module.layer_idx`` to pick its layer's mask. (kvpress overwrites masked keys in place instead; the bias
is exact and needs no hyperplane search.) One context prefill is reused for many masks: the cache is cropped
back to the context after every answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kvzap_sglang.hidden_states import AttentionInput, attention_input_hooks, decoder

ATTENTION_NAME = "kvzap_keep_mask"


class _ActiveMask:
    """The keep mask seen by the registered attention function; set only inside :func:`pruned_attention`."""

    keep: torch.Tensor | None = None  # [L, H_kv, T_ctx] bool, True = keep


def _masked_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA with the active keep mask applied to the first ``T_ctx`` keys of layer ``module.layer_idx``.

    ``query [B, H_q, q, d]``, ``key/value [B, H_kv, kv, d]``, ``attention_mask`` bool ``[B, 1, q, kv]`` (True =
    attend), float additive, or None (plain causal); returns what ``sdpa_attention_forward`` returns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    keep = _ActiveMask.keep
    if keep is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer_keep = keep[module.layer_idx]  # [H_kv, T_ctx]
    num_ctx = layer_keep.shape[-1]
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len < num_ctx:
        raise RuntimeError(f"attention over {kv_len} keys but the keep mask covers {num_ctx} context tokens")
    if attention_mask is None:  # queries are the last q_len positions of the kv sequence
        positions = torch.arange(kv_len)
        attention_mask = (positions[None, :] <= positions[kv_len - q_len :, None]).view(1, 1, q_len, kv_len)
    group = query.shape[1] // layer_keep.shape[0]
    head_keep = layer_keep.repeat_interleave(group, dim=0).to(query.device)  # query head h*G+g reads KV head h
    allowed = torch.ones(1, query.shape[1], 1, kv_len, dtype=torch.bool, device=query.device)
    allowed[..., :num_ctx] = head_keep[None, :, None, :]
    if attention_mask.dtype == torch.bool:
        combined = attention_mask & allowed
    else:
        combined = attention_mask + torch.zeros_like(allowed, dtype=attention_mask.dtype).masked_fill(
            ~allowed, torch.finfo(attention_mask.dtype).min
        )
    return sdpa_attention_forward(module, query, key, value, combined, **kwargs)


def install(model: nn.Module) -> None:
    """Register the masked attention (idempotent) and switch ``model`` to it; unmasked it is plain SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _masked_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # same boolean masks as SDPA
    model.set_attn_implementation(ATTENTION_NAME)


@contextmanager
def pruned_attention(keep: torch.Tensor | None) -> Iterator[None]:
    """Within the block, attention to the context goes through ``keep [L, H_kv, T_ctx]`` (None = full cache)."""
    if keep is not None and keep.dtype != torch.bool:
        raise TypeError(f"keep mask must be bool, got {keep.dtype}")
    previous, _ActiveMask.keep = _ActiveMask.keep, keep
    try:
        yield
    finally:
        _ActiveMask.keep = previous


@dataclass
class ContextPrefill:
    """A densely prefilled context: its KV cache and what the scorers need from the same forward.

    ``attention_inputs[l]``: ``[T_ctx, D]`` post-norm attention input of layer ``l`` (model dtype), for KVzap.
    ``keys(l)``: ``[H_kv, T_ctx, d]`` cached (post-RoPE) keys, for KNorm.
    """

    input_ids: torch.Tensor  # [T_ctx]
    cache: object  # transformers DynamicCache holding exactly the context
    attention_inputs: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def keys(self, layer_idx: int) -> torch.Tensor:
        return self.cache.layers[layer_idx].keys[0, :, : self.num_tokens]


def prefill_context(model: nn.Module, context_ids: torch.Tensor) -> ContextPrefill:
    """Dense prefill of ``context_ids [T_ctx]`` (no mask active), capturing each layer's attention input."""
    from transformers import DynamicCache

    inputs: dict[int, torch.Tensor] = {}

    def keep_input(inp: AttentionInput) -> None:
        inputs[inp.layer_idx] = inp.hidden_states[0].detach()

    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), pruned_attention(None), attention_input_hooks(model, keep_input):
        decoder(model)(input_ids=context_ids.view(1, -1), past_key_values=cache, use_cache=True)
    return ContextPrefill(context_ids, cache, [inputs[i] for i in sorted(inputs)])


KeepRule = torch.Tensor | Callable[[int], torch.Tensor] | None


def answer(
    model: nn.Module,
    prefill: ContextPrefill,
    question_ids: torch.Tensor,
    keep: KeepRule,
    max_new_tokens: int,
    stop_ids: set[int],
    finished: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy answer to ``question_ids [q]`` from the context cache seen through ``keep [L, H_kv, T_ctx]``.

    ``keep`` may also be a function of the cache length before each forward, returning that forward's mask
    (the server's delayed eviction: context tokens keep leaving the window while the answer grows); ``None`` is
    the full cache. Returns the generated token ids (a stop id ends generation and is not returned).
    ``finished(tokens)`` may end generation early (the benchmark stops once every gold string appeared:
    substring scoring cannot change after that), so the result is a prefix of plain greedy generation. The
    cache is cropped back to the context afterwards, so the same prefill serves the next mask.
    """
    generated: list[int] = []
    try:
        with torch.inference_mode():
            step_ids = question_ids.view(1, -1)
            for _ in range(max_new_tokens):
                token = _greedy_step(model, prefill, step_ids, keep)
                if token in stop_ids:
                    break
                generated.append(token)
                if finished is not None and finished(generated):
                    break
                step_ids = torch.tensor([[token]])
    finally:
        extra = prefill.cache.get_seq_length() - prefill.num_tokens
        if extra > 0:
            prefill.cache.crop(-extra)  # transformers 5: a negative count removes that many trailing tokens
    return generated


def _greedy_step(model: nn.Module, prefill: ContextPrefill, step_ids: torch.Tensor, keep: KeepRule) -> int:
    mask = keep(prefill.cache.get_seq_length()) if callable(keep) else keep
    if mask is not None and mask.shape[-1] != prefill.num_tokens:
        raise ValueError(f"keep mask covers {mask.shape[-1]} tokens, the context has {prefill.num_tokens}")
    with pruned_attention(mask):
        out = model(input_ids=step_ids, past_key_values=prefill.cache, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax())
