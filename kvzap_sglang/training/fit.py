"""Fit KVzap surrogates on (attention input, log-score) pairs (paper §3.1, kvpress ``kvzap/train.py``).

* Linear: one scikit-learn ``Ridge(alpha=1.0)`` per layer on float64 copies; ``coef_ [H, D]`` and
  ``intercept_ [H]`` become that layer's ``nn.Linear``.
* MLP: all layers trained jointly on MSE over ``[N, L, H]``; AdamW (weight decay 0.01), batch 512, cosine LR
  stepped per epoch, gradient-norm clipping 1.0, 5 % of the rows held aside for validation (skorch
  ``ValidSplit(0.05)`` in the reference); hidden width D/8 (the paper's choice; the reference code fixes 512).
  The reference passes lr 5e-3 and 15 epochs from ``train()``; those are the defaults here. Unlike the
  reference (which casts to the model dtype), training runs in fp32: bf16 Adam updates lose most of a small
  model's gradient signal, and the surrogate is cast to bf16 only when scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvzap_sglang.surrogate import KVzapConfig, KVzapSurrogate


def fit_linear(hidden_states: torch.Tensor, scores: torch.Tensor, alpha: float = 1.0) -> KVzapSurrogate:
    """Ridge per layer. ``hidden_states [N, L, D]``, ``scores [N, L, H]`` -> a linear :class:`KVzapSurrogate`."""
    from sklearn.linear_model import Ridge

    _, num_layers, dim = hidden_states.shape
    surrogate = KVzapSurrogate(KVzapConfig(input_dim=dim, output_dim=scores.shape[2], n_modules=num_layers))
    for idx in tqdm(range(num_layers), desc="ridge", unit="layer"):
        ridge = Ridge(alpha=alpha).fit(hidden_states[:, idx].double().numpy(), scores[:, idx].double().numpy())
        layer = surrogate.layers[idx]
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(ridge.coef_).reshape(layer.weight.shape))
            layer.bias.copy_(torch.as_tensor(ridge.intercept_).reshape(layer.bias.shape))
    return surrogate.eval()


@dataclass(frozen=True)
class MLPSettings:
    epochs: int = 15
    lr: float = 5e-3
    batch_size: int = 512
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    valid_fraction: float = 0.05
    hidden_dim: int | None = None  # None = D / 8
    seed: int = 0


class _StackedMLP(torch.nn.Module):
    """All L per-layer MLPs as batched matmuls: 3 kernels per step instead of 3·L module calls.

    Same function as ``KVzapSurrogate.forward`` for an MLP surrogate (tested); initialised from and copied
    back into the surrogate's per-layer ``nn.Linear`` modules, so the saved layout is unchanged.
    """

    def __init__(self, surrogate: KVzapSurrogate):
        super().__init__()
        stack = lambda index, name: torch.stack([getattr(layer[index], name).detach() for layer in surrogate.layers])  # noqa: E731
        self.w1 = torch.nn.Parameter(stack(0, "weight").transpose(1, 2).clone())  # [L, D, hidden]
        self.b1 = torch.nn.Parameter(stack(0, "bias").unsqueeze(1).clone())  # [L, 1, hidden]
        self.w2 = torch.nn.Parameter(stack(2, "weight").transpose(1, 2).clone())  # [L, hidden, H]
        self.b2 = torch.nn.Parameter(stack(2, "bias").unsqueeze(1).clone())  # [L, 1, H]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, L, D] -> [N, L, H]``."""
        x = hidden_states.transpose(0, 1)  # [L, N, D]
        hidden = torch.nn.functional.gelu(torch.baddbmm(self.b1, x, self.w1))
        return torch.baddbmm(self.b2, hidden, self.w2).transpose(0, 1)

    def copy_into(self, surrogate: KVzapSurrogate) -> None:
        with torch.no_grad():
            for idx, layer in enumerate(surrogate.layers):
                layer[0].weight.copy_(self.w1[idx].T)
                layer[0].bias.copy_(self.b1[idx, 0])
                layer[2].weight.copy_(self.w2[idx].T)
                layer[2].bias.copy_(self.b2[idx, 0])


def fit_mlp(
    hidden_states: torch.Tensor, scores: torch.Tensor, settings: MLPSettings = MLPSettings()
) -> tuple[KVzapSurrogate, list[dict]]:
    """Joint MLP fit; returns the surrogate and a per-epoch history (train / validation MSE, lr)."""
    num_rows, num_layers, dim = hidden_states.shape
    torch.manual_seed(settings.seed)
    config = KVzapConfig(
        input_dim=dim, output_dim=scores.shape[2], n_modules=num_layers, hidden_dim=settings.hidden_dim or dim // 8
    )
    surrogate = KVzapSurrogate(config)
    stacked = _StackedMLP(surrogate)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(num_rows, generator=generator)
    num_valid = int(round(num_rows * settings.valid_fraction))
    valid_rows, train_rows = order[:num_valid], order[num_valid:]
    optimizer = torch.optim.AdamW(stacked.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    history = []
    progress = tqdm(range(settings.epochs), desc="mlp", unit="epoch")
    for epoch in progress:
        total, seen = 0.0, 0
        shuffled = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for start in range(0, len(shuffled), settings.batch_size):
            rows = shuffled[start : start + settings.batch_size]
            loss = torch.nn.functional.mse_loss(stacked(hidden_states[rows].float()), scores[rows].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(stacked.parameters(), settings.grad_clip)
            optimizer.step()
            total, seen = total + loss.item() * len(rows), seen + len(rows)
        record = {"epoch": epoch + 1, "lr": schedule.get_last_lr()[0], "train_mse": total / max(seen, 1)}
        schedule.step()
        if num_valid:
            stacked.copy_into(surrogate)
            record["valid_mse"] = _mse(surrogate, hidden_states[valid_rows], scores[valid_rows])
        history.append(record)
        progress.set_postfix({k: round(v, 4) for k, v in record.items() if k.endswith("mse")})
    stacked.copy_into(surrogate)
    return surrogate.eval(), history


def predict(surrogate: KVzapSurrogate, hidden_states: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``[N, L, D] -> [N, L, H]`` fp32 predictions, in batches."""
    surrogate.eval()
    with torch.no_grad():
        parts = [surrogate(hidden_states[i : i + batch_size].float()) for i in range(0, len(hidden_states), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, surrogate.config.n_modules, surrogate.config.output_dim)


def _mse(surrogate: KVzapSurrogate, hidden_states: torch.Tensor, scores: torch.Tensor) -> float:
    return torch.nn.functional.mse_loss(predict(surrogate, hidden_states), scores.float()).item()
