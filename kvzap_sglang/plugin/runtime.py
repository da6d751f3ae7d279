"""Per-scheduler-process KVzap state: settings, the cell store, the surrogate, and the batch being forwarded.

One ``KvzapRuntime`` exists in a scheduler (TP worker) process once its KV pool is built with KVzap on
(``install``); hooks reach it through ``current()`` and do nothing when it is ``None`` (KVzap off, or a process
without a model). The forward is single-threaded (the overlap scheduler is switched off at launch), so the batch
view set by the attention backend's ``init_forward_metadata`` is the one every layer hook of that forward sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from kvzap_sglang.plugin.settings import KVzapConfigError, KVzapSettings, ModelDims, resolve_surrogate
from kvzap_sglang.storage import CellStore, QueryLayout, prune_window_exits
from kvzap_sglang.surrogate import CheckpointError, KVzapSurrogate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchView:
    """What every layer of one forward needs, built once per forward.

    * ``token_slots`` int64 ``[bs, T]`` — each request's slot ids by position (``req_to_token`` rows), ``T = max seq``;
    * ``seq_lens`` int64 ``[bs]`` — tokens after this forward; ``prev_lens`` ``[bs]`` — before it;
    * ``queries`` — where this forward's query rows are (``QueryLayout``);
    * ``out_cache_loc`` int64 ``[num_tokens]`` — slots written by this forward, row-aligned with hidden states.
    """

    token_slots: torch.Tensor
    seq_lens: torch.Tensor
    prev_lens: torch.Tensor
    queries: QueryLayout
    out_cache_loc: torch.Tensor
    is_decode: bool


@dataclass
class Totals:
    """Server-wide counters since start-up (cells = (layer, KV head, token) entries)."""

    entries_reserved: int = 0  # cells taken by token slots
    entries_pruned: int = 0  # cells freed by KVzap decisions
    requests_finished: int = 0


@dataclass
class KvzapRuntime:
    settings: KVzapSettings
    store: CellStore
    surrogate: KVzapSurrogate
    start_layer: int = 0
    batch: BatchView | None = None
    totals: Totals = field(default_factory=Totals)

    def layer(self, layer_id: int) -> int:
        return layer_id - self.start_layer

    def begin_forward(self, view: BatchView) -> None:
        self.batch = view

    def after_attention(self, layer_id: int, hidden_states: torch.Tensor) -> None:
        """Score the tokens this forward wrote in layer ``layer_id`` and apply the DMS rule to window exits.

        ``hidden_states`` ``[num_tokens, D]`` is the layer's post-input_layernorm attention input, row-aligned with
        ``out_cache_loc`` (../shared/notes/sglang-internals.md §5). Decisions for this layer are final as soon as its
        attention ran (dense prefill, paper Algorithm 1), so its pruned cells are freed before the next layer runs.
        """
        view = self.batch
        if view is None or hidden_states.shape[0] == 0:
            return
        layer = self.layer(layer_id)
        if not (view.is_decode and not self.settings.score_decode):
            with torch.no_grad():
                scores = self.surrogate.layers[layer](hidden_states.to(self.surrogate_dtype))  # [T, H]
            self.store.set_scores(layer, view.out_cache_loc, scores)
        freed = prune_window_exits(
            self.store, layer, view.token_slots, view.prev_lens, view.seq_lens,
            self.settings.threshold, self.settings.window,
        )  # fmt: skip
        self.totals.entries_pruned += int(freed.sum())

    def set_threshold(self, tau: float) -> None:
        """Change τ without a restart (plugin/calibration.py applies it between forwards). Entries already decided
        stay decided: each one is judged once, when it leaves the window, with the τ of that moment."""
        self.settings = replace(self.settings, threshold=float(tau))  # validated like a start-up value

    @property
    def surrogate_dtype(self) -> torch.dtype:
        return next(self.surrogate.parameters()).dtype

    def snapshot(self) -> dict:
        """Server-wide figures for the metrics endpoint and ``/server_info``."""
        store = self.store
        return {
            "threshold": self.settings.threshold,
            "window": self.settings.window,
            "surrogate": self.settings.surrogate,
            "cells_total": store.config.num_cells,
            "cells_in_use": store.used_cells(),
            "entries_reserved": self.totals.entries_reserved,
            "entries_pruned": self.totals.entries_pruned,
            "removed_fraction": self.totals.entries_pruned / max(1, self.totals.entries_reserved),
            "requests_finished": self.totals.requests_finished,
        }


_runtime: KvzapRuntime | None = None
# Called with the runtime whenever cells are given back in bulk (slot frees); reporting's gauges subscribe here.
cells_released_listeners: list = []


def current() -> KvzapRuntime | None:
    return _runtime


def notify_cells_released() -> None:
    if _runtime is not None:
        for listener in cells_released_listeners:
            listener(_runtime)


def install(settings: KVzapSettings, store: CellStore, hf_config, dtype: torch.dtype, start_layer: int = 0) -> KvzapRuntime:
    """Load and check the surrogate against the served model, then make the runtime current for this process.

    Raises:
        KVzapConfigError: the surrogate does not fit the model (start-up, before any request).
    """
    global _runtime
    dims = ModelDims.from_hf_config(hf_config)
    folder = resolve_surrogate(settings.surrogate, dims)
    try:
        surrogate = KVzapSurrogate.from_pretrained(folder)
        surrogate.check_fits(dims.num_layers, dims.hidden_size, dims.num_kv_heads)
    except (CheckpointError, FileNotFoundError) as error:
        raise KVzapConfigError(f"kvzap surrogate {folder}: {error}") from None
    # Cast once: scores run in the model's dtype as in kvpress (surrogate.score docstring).
    surrogate = surrogate.to(device=store.device, dtype=dtype).eval()
    _runtime = KvzapRuntime(settings=settings, store=store, surrogate=surrogate, start_layer=start_layer)
    logger.info("KVzap on: tau=%s window=%d surrogate=%s (%s)", settings.threshold, settings.window, folder, surrogate.kind)
    return _runtime


def uninstall() -> None:
    global _runtime
    _runtime = None
