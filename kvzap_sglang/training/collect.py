"""(attention input, KVzip+ score) pairs for surrogate training, cached per prompt.

Per prompt (kvpress ``KVzapDataCollector.collect``): one oracle forward on the repeat prompt, then
``positions`` prompt tokens drawn without replacement, **the same positions for every layer**. Each prompt's
sample is stored as one shard under ``<cache>/oracle/<model fingerprint>/`` keyed by the prompt text, the
number of positions, the seed and the oracle version, so ``train --kind linear`` and ``--kind mlp`` (and an
interrupted run) reuse every forward already paid for. A SmolLM2 shard (500 positions) is ~17 MB.

Dtypes: attention inputs are stored in bf16 (the serving dtype; halves the ~2 GB a 110-prompt set needs),
scores in fp32.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_sglang.models import cache_dir
from kvzap_sglang.oracle import build_repeat_prompt, kvzip_plus_scores
from kvzap_sglang.prompts import Prompt
from kvzap_sglang.scoring import ReferenceModel

ORACLE_VERSION = 1  # bump when the oracle or the sampling changes: old shards are then ignored
STORED_HIDDEN_DTYPE = torch.bfloat16


@dataclass
class OracleDataset:
    """``hidden_states [N, L, D]`` (bf16), ``scores [N, L, H_kv]`` (fp32), ``prompt_index [N]`` (row -> prompt)."""

    hidden_states: torch.Tensor
    scores: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return self.scores.shape[0]


def model_fingerprint(ref: ReferenceModel) -> str:
    """Identifies the weights and dtype the oracle ran with (config text + weight file sizes + dtype)."""
    parts = [(ref.path / "config.json").read_text(), str(ref.model.dtype)]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(ref.path.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def shard_path(ref: ReferenceModel, prompt: Prompt, positions: int, seed: int) -> Path:
    key = json.dumps([ORACLE_VERSION, prompt.text, positions, seed])
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "oracle" / model_fingerprint(ref) / f"{name}.safetensors"


def sample_positions(num_prompt_tokens: int, positions: int, prompt: Prompt, seed: int) -> torch.Tensor:
    """``[min(positions, n)]`` distinct prompt-relative positions, deterministic by (prompt text, seed)."""
    generator = torch.Generator().manual_seed(seed + int(hashlib.sha256(prompt.text.encode()).hexdigest()[:8], 16))
    return torch.randperm(num_prompt_tokens, generator=generator)[:positions].sort().values


def prompt_sample(ref: ReferenceModel, prompt: Prompt, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [n, L, D] bf16, scores [n, L, H] fp32)`` of one prompt, from the cache or one oracle run."""
    from safetensors.torch import load_file, save_file

    path = shard_path(ref, prompt, positions, seed)
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["hidden_states"], tensors["scores"]
    repeat = build_repeat_prompt(ref.tokenizer, prompt.text)
    chosen = sample_positions(repeat.num_prompt_tokens, positions, prompt, seed)
    result = kvzip_plus_scores(ref.model, repeat, capture_positions=chosen)
    hidden = result.hidden_states.to(STORED_HIDDEN_DTYPE).contiguous()
    scores = result.scores[:, :, chosen].permute(2, 0, 1).contiguous()  # [L, H, n] -> [n, L, H]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"hidden_states": hidden, "scores": scores}, str(partial))
    partial.rename(path)  # atomic: a killed run never leaves a truncated shard behind
    return hidden, scores


def collect(ref: ReferenceModel, prompts: list[Prompt], positions: int, seed: int, desc: str) -> OracleDataset:
    """Stack the samples of ``prompts`` (computing the missing ones, with a progress bar)."""
    hidden_parts, score_parts, index_parts = [], [], []
    for idx, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt")):
        hidden, scores = prompt_sample(ref, prompt, positions, seed)
        hidden_parts.append(hidden)
        score_parts.append(scores)
        index_parts.append(torch.full((scores.shape[0],), idx, dtype=torch.long))
    return OracleDataset(torch.cat(hidden_parts), torch.cat(score_parts), torch.cat(index_parts))
