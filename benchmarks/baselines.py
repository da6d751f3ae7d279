"""Scorers and keep-mask rules of the compared methods, all over one prefilled context ``[L, H_kv, T_ctx]``.

Two families, compared at matched **measured** removed fraction (``kvzap_sglang.policy.removed_fraction``):

* **threshold** — KVzap linear / MLP: surrogate log-scores and the DMS rule (``policy.keep_mask``: drop
  ``score < τ`` outside the last ``window`` context tokens); τ is swept, the removed fraction is what it is.
* **ratio** — a target fraction of all ``L · H · T_ctx`` entries is removed:

  - ``oracle`` (KVzip+, the ceiling): global bottom-k of the KVzip+ log-scores over all layers and heads, as
    kvpress's ``KVzipPress`` budgets by default;
  - ``knorm``: kvpress ``KnormPress`` scores ``-‖k‖`` (a high key norm is *less* important, so high-norm keys
    go first); kvpress's ``ScorerPress`` removes the same number of tokens from every (layer, head), so the
    bottom-k here is per (layer, head) too. The norm is RoPE-invariant, so cached post-RoPE keys serve;
  - ``random``: uniform random entries (seeded), global;
  - ``streaming_llm``: 4 sink tokens + the most recent tokens are kept, the same tokens in every head
    (kvpress ``StreamingLLMPress``: the pruned block starts right after the sinks).

Choice: the score-based ratio baselines (oracle, KNorm, random) protect the same last ``window`` (128) context
tokens as KVzap, so every method sees the same recent context; their reachable removed fraction is then
capped at ``1 - window / T_ctx`` (0.875 at 1k tokens) and the measured value is what gets plotted.
"""

from __future__ import annotations

import torch
from torch import nn

from kvzap_sglang.oracle import REPEAT_INSTRUCTION, RepeatPrompt, kvzip_plus_scores
from kvzap_sglang.policy import DEFAULT_WINDOW
from kvzap_sglang.surrogate import KVzapSurrogate

THRESHOLD_METHODS = ("kvzap_linear", "kvzap_mlp")
RATIO_METHODS = ("oracle", "streaming_llm", "random", "knorm")
METHODS = ("full", *THRESHOLD_METHODS, *RATIO_METHODS)
STREAMING_SINKS = 4


def kvzap_scores(surrogate: KVzapSurrogate, attention_inputs: list[torch.Tensor]) -> torch.Tensor:
    """KVzap log-scores ``[L, H_kv, T]`` from each layer's attention input ``[T, D]`` (scored in its dtype)."""
    return torch.stack([surrogate.score(x, idx).float().T for idx, x in enumerate(attention_inputs)])


def knorm_scores(keys_per_layer: list[torch.Tensor]) -> torch.Tensor:
    """``-‖k‖`` scores ``[L, H_kv, T]`` from each layer's keys ``[H_kv, T, d]`` (kvpress ``KnormPress``)."""
    return torch.stack([-keys.float().norm(dim=-1) for keys in keys_per_layer])


def random_scores(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Uniform scores ``[L, H_kv, T]``; bottom-k of them is a uniformly random set of entries."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def oracle_repeat_prompt(tokenizer, context_ids: list[int]) -> RepeatPrompt:
    """KVzip+'s repeat prompt built on the exact context token ids (so scores align token for token).

    ``context_ids`` = chat-template opening + the context text. The repeat input is those ids, the repeat
    instruction and the assistant turn opening, then a teacher-forced copy of the context text's ids (paper
    §2.1; kvpress ``repeat_prompt_tokenization`` renders the same layout from text). Every context token,
    the template opening included, is a scored key; the copy's tokens are the queries.
    """
    opening, between = _template_pieces(tokenizer)
    if context_ids[: len(opening)] != opening:
        raise ValueError("context ids do not start with the chat template's user-turn opening")
    copy = context_ids[len(opening) :]
    ids = context_ids + _ids(tokenizer, REPEAT_INSTRUCTION + between) + copy
    return RepeatPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        prompt=slice(0, len(context_ids)),
        copy=slice(len(ids) - len(copy), len(ids)),
    )


def oracle_scores(model: nn.Module, tokenizer, context_ids: list[int]) -> torch.Tensor:
    """KVzip+ log-scores ``[L, H_kv, T_ctx]`` of every context token (one extra forward of ~2 T_ctx tokens)."""
    return kvzip_plus_scores(model, oracle_repeat_prompt(tokenizer, context_ids)).scores


def keep_lowest_removed(
    scores: torch.Tensor, ratio: float, window: int = DEFAULT_WINDOW, per_head: bool = False
) -> torch.Tensor:
    """Remove the ``ratio`` share of all entries with the lowest scores, never touching the last ``window`` tokens.

    ``scores``: ``[L, H_kv, T]``. ``per_head``: remove ``ratio · T`` tokens from every (layer, head) instead of
    a global bottom-k. Returns the keep mask ``[L, H_kv, T]`` (True = keep).
    """
    _check_ratio(ratio)
    num_layers, num_heads, num_tokens = scores.shape
    prunable = max(num_tokens - window, 0)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prunable == 0:
        return keep
    candidates = scores[..., :prunable]
    if per_head:
        count = min(round(ratio * num_tokens), prunable)
        lowest = candidates.argsort(dim=-1, stable=True)[..., :count]
        keep[..., :prunable].scatter_(-1, lowest, False)
        return keep
    count = min(round(ratio * scores.numel()), candidates.numel())
    flat_keep = keep[..., :prunable].reshape(-1)  # a copy (non-contiguous slice): written back below
    flat_keep[candidates.reshape(-1).argsort(stable=True)[:count]] = False
    keep[..., :prunable] = flat_keep.view(num_layers, num_heads, prunable)
    return keep


def streaming_llm_keep(shape: tuple[int, int, int], ratio: float, sinks: int = STREAMING_SINKS) -> torch.Tensor:
    """StreamingLLM keep mask ``[L, H_kv, T]``: ``ratio · T`` tokens right after the sinks are removed."""
    _check_ratio(ratio)
    num_tokens = shape[-1]
    count = min(round(ratio * num_tokens), max(num_tokens - sinks, 0))
    keep = torch.ones(shape, dtype=torch.bool)
    keep[..., sinks : sinks + count] = False
    return keep


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"removed-fraction target must be in [0, 1), got {ratio}")


def _template_pieces(tokenizer) -> tuple[list[int], str]:
    """(ids of the chat template before the user content, text between user content and assistant content)."""
    first, second = "\x00KVZAP-USER\x00", "\x00KVZAP-ASSISTANT\x00"
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": second}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    before, rest = text.split(first)
    return _ids(tokenizer, before), rest.split(second)[0]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
