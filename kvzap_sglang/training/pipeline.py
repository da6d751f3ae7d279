"""``kvzap-sglang train``: corpus -> cached oracle samples -> fit -> checkpoint + held-out ``metrics.json``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvzap_sglang.surrogate import KINDS
from kvzap_sglang.training.collect import OracleDataset, collect
from kvzap_sglang.training.corpus import MAX_TOKENS, MIN_TOKENS, ROTATION, corpus_prompts
from kvzap_sglang.training.fit import MLPSettings, fit_linear, fit_mlp, predict
from kvzap_sglang.training.metrics import r2_report

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainSettings:
    model: str
    kind: str
    out: Path
    num_prompts: int = 90  # training prompts
    held_out_prompts: int = 20
    positions: int = 500
    seed: int = 0
    # The oracle runs in fp32: on the project's torch 2.14.1+cu130 CPU build, fp32 matmuls measured ~4x
    # faster than bf16 (22 vs 6 GFLOP/s on 2 contended cores).
    oracle_dtype: torch.dtype = torch.float32
    mlp: MLPSettings = field(default_factory=MLPSettings)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown surrogate kind {self.kind!r}; expected one of {KINDS}")
        for name in ("num_prompts", "held_out_prompts", "positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def train_surrogate(settings: TrainSettings, reference=None) -> dict:
    """Train one surrogate, save it with its metrics under ``settings.out``, return the metrics.

    ``reference``: an already loaded :class:`~kvzap_sglang.scoring.ReferenceModel` (tests pass a tiny model).
    """
    from kvzap_sglang.scoring import load_reference_model

    started = time.perf_counter()
    ref = reference or load_reference_model(settings.model, dtype=settings.oracle_dtype)
    train_prompts = corpus_prompts(ref.tokenizer, settings.num_prompts, "train", settings.seed)
    held_prompts = corpus_prompts(ref.tokenizer, settings.held_out_prompts, "held_out", settings.seed)
    train = collect(ref, train_prompts, settings.positions, settings.seed, "oracle (train)")
    held_out = collect(ref, held_prompts, settings.positions, settings.seed, "oracle (held-out)")

    fit_started = time.perf_counter()
    history = None
    if settings.kind == "linear":
        surrogate = fit_linear(train.hidden_states, train.scores)
    else:
        surrogate, history = fit_mlp(train.hidden_states, train.scores, settings.mlp)
    fit_seconds = time.perf_counter() - fit_started

    metrics = {
        "model": settings.model,
        "kind": settings.kind,
        "held_out": r2_report(predict(surrogate, held_out.hidden_states), held_out.scores),
        "train": {"r2_mean": r2_report(predict(surrogate, train.hidden_states), train.scores)["r2_mean"]},
        "data": _data_summary(settings, train, held_out, train_prompts, held_prompts),
        "fit": {"seconds": round(fit_seconds, 1), **({"mlp": asdict(settings.mlp), "history": history} if history else {"ridge_alpha": 1.0})},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    surrogate.save_pretrained(settings.out)
    (Path(settings.out) / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def _data_summary(settings: TrainSettings, train: OracleDataset, held_out: OracleDataset, train_prompts, held_prompts) -> dict:
    def tasks(prompts) -> dict:
        counts: dict[str, int] = {}
        for prompt in prompts:
            counts[prompt.task] = counts.get(prompt.task, 0) + 1
        return counts

    return {
        "corpus": "kvzap_sglang.training.corpus (offline: GPL-3 needle prompts, license texts, Python docs and sources)",
        "rotation": [f"{task}:{filler}" if filler else task for task, filler in ROTATION],
        "prompt_tokens_exclusive_range": [MIN_TOKENS, MAX_TOKENS],
        "train_prompts": len(train_prompts),
        "held_out_prompts": len(held_prompts),
        "train_tasks": tasks(train_prompts),
        "held_out_tasks": tasks(held_prompts),
        "positions_per_prompt": settings.positions,
        "train_rows": len(train),
        "held_out_rows": len(held_out),
        "seed": settings.seed,
        "oracle_dtype": str(settings.oracle_dtype).removeprefix("torch."),
        "score_mean": round(train.scores.mean().item(), 3),
        "score_std": round(train.scores.std().item(), 3),
    }
