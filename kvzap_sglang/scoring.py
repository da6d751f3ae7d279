"""Reference scoring path: run a Hugging Face model on a prompt and score every token with a KVzap surrogate.

This is what a server does inside its forward (score each new token at each layer from the layer's attention
input, dense prefill, paper §3.3), written plainly on top of transformers so that the SGLang adapter can be
tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvzap_sglang.hidden_states import AttentionInput, AttentionShape, attention_input_hooks, run_decoder
from kvzap_sglang.surrogate import KVzapSurrogate


@dataclass
class ReferenceModel:
    """A causal LM (eval mode) and its tokenizer, loaded from a local folder."""

    model: nn.Module
    tokenizer: object
    path: Path

    @property
    def shape(self) -> AttentionShape:
        return AttentionShape.of(self.model.config)


def load_reference_model(name_or_path: str, dtype: torch.dtype = torch.bfloat16) -> ReferenceModel:
    """Resolve ``name_or_path`` (embedded name or local folder; never a hub) and load it on CPU.

    bf16 by default: the stored weights are bf16, it is what the server runs, and CPU prefill is ~3x faster
    than fp32 with AMX (environment notes §4).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvzap_sglang.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    except (OSError, RuntimeError, KeyError, SafetensorError) as error:  # truncated or foreign weights, no tokenizer
        raise ModelLoadError(f"cannot load the model in {path}: {type(error).__name__}: {error}") from error
    return ReferenceModel(model=model, tokenizer=tokenizer, path=path)


class ModelLoadError(ValueError):
    """A model folder whose weights or tokenizer cannot be loaded (a ValueError: the CLI's "bad input", exit 2)."""


def score_tokens(model: nn.Module, surrogate: KVzapSurrogate, input_ids: torch.Tensor) -> torch.Tensor:
    """Surrogate log-scores ``[L, H_kv, T]`` (fp32 copy of the scores computed in the model's dtype) of ``input_ids [T]``."""
    shape = AttentionShape.of(model.config)
    surrogate.check_fits(shape.num_layers, shape.hidden_size, shape.num_kv_heads)
    scores = torch.empty(shape.num_layers, shape.num_kv_heads, input_ids.numel())

    def score_layer(inp: AttentionInput) -> None:
        scores[inp.layer_idx] = surrogate.score(inp.hidden_states[0], inp.layer_idx).float().T.cpu()

    with attention_input_hooks(model, score_layer):
        run_decoder(model, input_ids)
    return scores
