"""Surrogate quality as the paper reports it: squared Pearson correlation per (layer, KV head) (paper Table 1)."""

from __future__ import annotations

import torch


def squared_pearson(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Squared Pearson correlation over the rows of ``pred`` and ``true`` (``[N, ...]`` -> ``[...]``), in fp64.

    A constant column has no defined correlation; it yields NaN rather than a flattering number.
    """
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(true.shape)}")
    pred, true = pred.double(), true.double()
    pred_c, true_c = pred - pred.mean(dim=0), true - true.mean(dim=0)
    cov = (pred_c * true_c).sum(dim=0)
    denom = pred_c.square().sum(dim=0) * true_c.square().sum(dim=0)
    return torch.where(denom > 0, cov.square() / denom, torch.full_like(cov, float("nan")))


def r2_report(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """R² of ``pred`` vs ``true`` (both ``[N, L, H_kv]``): per (layer, head), per layer (mean of heads), mean."""
    per_head = squared_pearson(pred, true)  # [L, H]
    return {
        "r2_mean": round(per_head.mean().item(), 4),
        "r2_per_layer": [round(v, 4) for v in per_head.mean(dim=1).tolist()],
        "r2_per_layer_head": [[round(v, 4) for v in row] for row in per_head.tolist()],
    }
