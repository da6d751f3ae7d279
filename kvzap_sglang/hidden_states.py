"""Capture each decoder layer's attention input from a Hugging Face model through forward pre-hooks.

KVzap's surrogate and the KVzip+ oracle both read the **post-input_layernorm** hidden state that a decoder layer
hands to its ``self_attn`` (the ``hidden_states`` argument; kvpress ``kvzap/data.py`` reads
``kwargs["hidden_states"]`` of the same module; KVzap paper §2, quirk §8.1 of the method notes), not the
residual stream. This module is the one place that knows how to reach that tensor: the oracle, the training
collector and the reference scoring path all go through :func:`attention_input_hooks`.

Supported layouts: ``*ForCausalLM`` with ``.model.layers[i].self_attn`` (Llama, Qwen2, Qwen3) or the bare
decoder (``.layers[i].self_attn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionShape:
    """Attention geometry of a decoder, read from its config (SmolLM2-135M: 30, 576, 9, 3, 64)."""

    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @classmethod
    def of(cls, config) -> AttentionShape:
        num_q_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_q_heads=num_q_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_q_heads,
            head_dim=head_dim,
        )


@dataclass(frozen=True)
class AttentionInput:
    """What one decoder layer's ``self_attn`` receives in a forward.

    ``hidden_states``: ``[batch, T, D]`` post-input_layernorm attention input, model dtype.
    ``position_embeddings``: ``(cos, sin)``, each ``[batch, T, head_dim]`` (RoPE tables for these positions).
    """

    layer_idx: int
    attention: nn.Module
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None


def decoder(model: nn.Module) -> nn.Module:
    """The bare decoder (embeddings + layers + final norm) of a causal LM, skipping the LM head."""
    if hasattr(model, "layers"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    raise TypeError(f"{type(model).__name__} has neither .layers nor .model.layers: unsupported architecture")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


@contextmanager
def attention_input_hooks(model: nn.Module, on_input: Callable[[AttentionInput], None]) -> Iterator[None]:
    """Call ``on_input`` with every layer's attention input during forwards run inside this block.

    Pre-hooks run before the layer's attention, one layer at a time, so a callback that reduces the tensor right
    away keeps memory at one layer's worth (the oracle relies on this).
    """

    def make_hook(layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            on_input(AttentionInput(layer_idx, module, hidden, kwargs.get("position_embeddings")))

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(make_hook(idx), with_kwargs=True)
        for idx, layer in enumerate(decoder_layers(model))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_decoder(model: nn.Module, input_ids: torch.Tensor) -> None:
    """One dense no-cache forward of the decoder on ``input_ids [T]`` (the LM head is skipped: ~1/3 of the FLOPs)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        decoder(model)(input_ids=input_ids.view(1, -1).to(device), use_cache=False)


def capture_attention_inputs(
    model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Post-norm attention inputs of ``input_ids [T]`` at ``positions [n]`` (all if None).

    Returns ``[n, L, D]`` in the model's dtype.
    """
    captured: dict[int, torch.Tensor] = {}

    def keep(inp: AttentionInput) -> None:
        rows = inp.hidden_states[0]
        captured[inp.layer_idx] = (rows if positions is None else rows[positions]).detach().cpu()

    with attention_input_hooks(model, keep):
        run_decoder(model, input_ids)
    return torch.stack([captured[idx] for idx in sorted(captured)], dim=1)
