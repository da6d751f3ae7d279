"""KVzip+ oracle: the per (layer, KV head, token) importance log-scores that KVzap learns to predict.

Paper §2.1 eq. 3 and kvpress ``kvzap/data.py``: the prompt is followed by a request to repeat it and a
teacher-forced copy; a prompt token ``i`` matters as much as the copy's queries ``j`` use it::

    s+[l, h, i] = max_{g in group(h)} max_{j in copy} softmax_j(q_j^(h,g) . k_i^(h) / sqrt(d))
                                                       * ||v_i^(h) W_O^(h,g)||_2 / ||x_j||_2
    y[l, h, i] = ln s+[l, h, i]

``x_j`` is the post-input_layernorm attention input (method notes §8.1); the value-norm factor is taken per
query head before the max over the GQA group; the softmax denominator is the full causal prefix of ``j``.

Memory: the reference keeps eager ``[H_q, T, T]`` attention maps of every layer (5.95 GB peak for SmolLM2 at
2k tokens, environment notes §4). Here each layer is reduced inside a pre-hook, recomputing q/k/v from the
layer's own projections, and only the copy's query rows are materialised, ``query_chunk`` rows at a time; the
model's own forward keeps its fast attention. Peak extra memory is one ``[H_q, query_chunk, T]`` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvzap_sglang.hidden_states import AttentionInput, AttentionShape, attention_input_hooks, run_decoder

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
DEFAULT_QUERY_CHUNK = 256


@dataclass(frozen=True)
class RepeatPrompt:
    """A prompt rendered as ``user: prompt + instruction / assistant: prompt`` and tokenised.

    ``input_ids``: ``[T]``. ``prompt`` / ``copy``: token spans of the prompt and of its teacher-forced copy.
    """

    input_ids: torch.Tensor
    prompt: slice
    copy: slice

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt.stop - self.prompt.start


def build_repeat_prompt(tokenizer, prompt: str) -> RepeatPrompt:
    """Render and tokenise the repeat prompt exactly as kvpress ``repeat_prompt_tokenization`` does.

    The prompt is stripped; tokenisation keeps the default ``add_special_tokens=True`` on the templated text
    (a doubled BOS for some Llama templates is part of the reference, method notes §2.2). A span starts at the
    first token whose character offset reaches the span's first character.
    """
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("the prompt is empty")
    messages = [
        {"role": "user", "content": prompt + REPEAT_INSTRUCTION},
        {"role": "assistant", "content": prompt},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    first = text.find(prompt)
    second = text.find(prompt, first + len(prompt))
    if first < 0 or second < 0:
        raise ValueError("the chat template altered the prompt text: cannot locate its two copies")
    encoded = tokenizer(text, return_offsets_mapping=True)
    starts = torch.tensor([start for start, _ in encoded["offset_mapping"]] + [len(text)])

    def token_at(char: int) -> int:
        return int(torch.nonzero(starts >= char)[0, 0])

    return RepeatPrompt(
        input_ids=torch.tensor(encoded["input_ids"], dtype=torch.long),
        prompt=slice(token_at(first), token_at(first + len(prompt))),
        copy=slice(token_at(second), token_at(second + len(prompt))),
    )


@dataclass(frozen=True)
class OracleResult:
    """``scores``: ``[L, H_kv, n_prompt]`` natural-log KVzip+ scores (fp32) of the prompt's tokens (first copy).

    ``hidden_states``: ``[n, L, D]`` attention inputs (model dtype) at the requested prompt-relative positions,
    or None. They come from the same forward, so they are exactly the surrogate's inputs for those scores.
    """

    scores: torch.Tensor
    hidden_states: torch.Tensor | None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [heads, T, d]`` by the rotate-half RoPE convention of Llama/Qwen (``cos, sin [T, d]``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(proj: nn.Module, norm: nn.Module | None, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Project ``x [T, D]`` to ``[heads, T, head_dim]`` with the layer's own weights (and per-head norm: Qwen3)."""
    states = proj(x).view(x.shape[0], -1, head_dim)
    if norm is not None:
        states = norm(states)
    return states.transpose(0, 1)


def layer_kvzip_plus(
    inp: AttentionInput, shape: AttentionShape, prompt: slice, copy: slice, query_chunk: int = DEFAULT_QUERY_CHUNK
) -> torch.Tensor:
    """KVzip+ log-scores ``[H_kv, n_prompt]`` of one layer from its attention input (batch of one).

    Computed in the log domain: ``ln s+ = max_g [ln ||v_i W_O^(h,g)|| + max_j (logit_ji - lse_j - ln ||x_j||)]``,
    which never materialises probabilities and cannot underflow to ``ln 0``.
    """
    attn, x = inp.attention, inp.hidden_states[0]
    cos, sin = (t[0].float() for t in inp.position_embeddings)
    H, G, d = shape.num_kv_heads, shape.group_size, shape.head_dim
    scaling = getattr(attn, "scaling", d**-0.5)

    # Projections run in the model's dtype (the values the model itself attends with), the score math in fp32.
    keys = _heads(attn.k_proj, getattr(attn, "k_norm", None), x[: copy.stop], d).float()
    keys = _rope(keys, cos[: copy.stop], sin[: copy.stop])  # [H, T_needed, d]
    values = _heads(attn.v_proj, None, x[prompt], d).float()  # [H, n_prompt, d]
    out_weight = attn.o_proj.weight.float().T.reshape(H, G, d, shape.hidden_size)  # W_O^(h,g): [H, G, d, D]
    log_value_norm = torch.einsum("hid,hgdo->hgio", values, out_weight).norm(dim=-1).log()  # [H, G, n_prompt]

    best = torch.full((H, G, prompt.stop - prompt.start), float("-inf"))
    for start in range(copy.start, copy.stop, query_chunk):
        stop = min(start + query_chunk, copy.stop)
        queries = _heads(attn.q_proj, getattr(attn, "q_norm", None), x[start:stop], d).float()
        queries = _rope(queries, cos[start:stop], sin[start:stop]) * scaling
        # Query head h*G+g attends with KV head h (GQA); keys beyond the chunk's last row are never visible.
        logits = torch.einsum("hgjd,hid->hgji", queries.view(H, G, -1, d), keys[:, :stop])  # [H, G, n, stop]
        # Causality only bites inside the chunk's own key range [start, stop): every earlier key is visible.
        rows = torch.arange(start, stop).view(-1, 1)
        logits[..., start:stop].masked_fill_(torch.arange(start, stop).view(1, -1) > rows, float("-inf"))
        row_offset = logits.logsumexp(dim=-1) + x[start:stop].float().norm(dim=-1).log()  # [H, G, n]
        chunk_best = (logits[..., prompt] - row_offset.unsqueeze(-1)).amax(dim=2)
        torch.maximum(best, chunk_best, out=best)
    return (best + log_value_norm).amax(dim=1)


def kvzip_plus_scores(
    model: nn.Module,
    repeat: RepeatPrompt,
    capture_positions: torch.Tensor | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> OracleResult:
    """Run ``model`` once on a repeat prompt and return the KVzip+ log-scores of the prompt's tokens.

    ``capture_positions``: optional ``[n]`` prompt-relative positions whose attention inputs are returned too
    (the training collector samples 500 per prompt, the same for every layer).
    """
    shape = AttentionShape.of(model.config)
    scores = torch.empty(shape.num_layers, shape.num_kv_heads, repeat.num_prompt_tokens)
    hidden: dict[int, torch.Tensor] = {}

    def reduce_layer(inp: AttentionInput) -> None:
        if inp.position_embeddings is None:
            raise TypeError("the attention layer received no position_embeddings: unsupported architecture")
        scores[inp.layer_idx] = layer_kvzip_plus(inp, shape, repeat.prompt, repeat.copy, query_chunk)
        if capture_positions is not None:
            hidden[inp.layer_idx] = inp.hidden_states[0, repeat.prompt][capture_positions].detach().cpu()

    with attention_input_hooks(model, reduce_layer):
        run_decoder(model, repeat.input_ids)
    captured = torch.stack([hidden[i] for i in range(shape.num_layers)], dim=1) if hidden else None
    return OracleResult(scores=scores, hidden_states=captured)


def oracle_scores(model: nn.Module, tokenizer, prompt: str, query_chunk: int = DEFAULT_QUERY_CHUNK) -> torch.Tensor:
    """KVzip+ log-scores ``[L, H_kv, n_prompt]`` of ``prompt`` (convenience wrapper)."""
    return kvzip_plus_scores(model, build_repeat_prompt(tokenizer, prompt), query_chunk=query_chunk).scores
