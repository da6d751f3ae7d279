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
from kvzap_sglang.plugin.tenants import TenantTable
from kvzap_sglang.tenants import DEFAULT_TENANT
from kvzap_sglang.storage import CellStore, QueryLayout, WindowTracker, prune_decided, retighten
from kvzap_sglang.surrogate import CheckpointError, KVzapSurrogate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchView:
    """What every layer of one forward needs, built once per forward.

    * ``rows`` int64 ``[bs]`` — each request's ``req_to_token`` row (``req_pool_indices``);
    * ``token_slots`` int64 ``[bs, T]`` — each request's slot ids by position (``req_to_token`` rows), ``T = max seq``;
    * ``seq_lens`` int64 ``[bs]`` — tokens after this forward; ``prev_lens`` ``[bs]`` — before it;
    * ``queries`` — where this forward's query rows are (``QueryLayout``);
    * ``out_cache_loc`` int64 ``[num_tokens]`` — slots written by this forward, row-aligned with hidden states.
    """

    rows: torch.Tensor
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
    requests_finished: int = 0  # requests the scheduler ended, finished or aborted (reporting.count_request_end)


@dataclass
class KvzapRuntime:
    settings: KVzapSettings
    store: CellStore
    surrogate: KVzapSurrogate
    start_layer: int = 0
    batch: BatchView | None = None
    totals: Totals = field(default_factory=Totals)
    windows: WindowTracker | None = None
    # Slots decided in the current forward (left every live window in it); pruned layer by layer.
    deciding: torch.Tensor | None = None
    deciding_tau: torch.Tensor | None = None  # float32 [n]: the τ each deciding slot is judged at (its tenant's)
    # Highest τ any slot was decided at: a request whose τ is not below it can reuse any cached entry (radix_cache).
    highest_decided_tau: float = float("-inf")
    tenants: TenantTable | None = None  # multi-tenant serving (--kvzap-tenants)
    # Free cells when SGLang last closed admission (batch_is_full); hooks.admission compares against it.
    admission_closed_at_free_cells: int | None = None
    admissions_reopened: int = 0

    def layer(self, layer_id: int) -> int:
        return layer_id - self.start_layer

    def track_windows(self, num_rows: int) -> None:
        """Create the window tracker for ``num_rows`` request rows (once the request pool exists)."""
        if self.windows is None or self.windows.lo.numel() != num_rows:
            self.windows = WindowTracker(self.store.config.num_slots, num_rows, self.settings.window, self.store.device)
        config = self.settings.tenants_config()
        if config is not None and (self.tenants is None or self.tenants.row_tenant.numel() != num_rows):
            self.tenants = TenantTable.build(config, self.settings.threshold, self.settings.window,
                                             self.store.config.entries_per_token, num_rows, self.store.device)  # fmt: skip
            for line in self.tenants.budget_warnings(self.store.config.num_cells, self.store.config.entries_per_token):
                logger.warning(line)

    def begin_forward(self, view: BatchView) -> None:
        """Move the batch's windows; the slots that now lie outside every live window and are undecided are decided
        in this forward at their tenant's τ (``after_attention`` frees their low-score entries layer by layer)."""
        self.batch = view
        windows = None
        if self.tenants is not None:
            row_tenant = self.tenants.row_tenant.index_select(0, view.rows)
            windows = self.tenants.window_tensor(self.store.device).index_select(0, row_tenant)
            self._tag_tenants(view, row_tenant)
        leaving = self.windows.advance(view.rows, view.token_slots, view.seq_lens, windows)
        deciding = leaving[torch.isnan(self.store.slot_decided.index_select(0, leaving))]
        if self.tenants is not None:
            taus = self.tenants.threshold_tensor(self.store.device)
            tau = taus.index_select(0, self.store.tenant.tag.index_select(0, deciding).to(torch.int64))
        else:
            tau = torch.full((deciding.numel(),), self.settings.threshold, dtype=torch.float32, device=deciding.device)
        self.store.slot_decided[deciding] = tau
        if deciding.numel():
            self.highest_decided_tau = max(self.highest_decided_tau, float(tau.max()))
        self.deciding, self.deciding_tau = deciding, tau

    def _tag_tenants(self, view: BatchView, row_tenant: torch.Tensor) -> None:
        """The slots this forward writes count against their request's tenant."""
        per_request = view.queries.qo_indptr.diff().to(device=row_tenant.device)
        token_tenant = torch.repeat_interleave(row_tenant, per_request)
        for t in torch.unique(token_tenant).tolist():
            slots = view.out_cache_loc[token_tenant == t]
            if t:
                self.store.set_tenant(slots, t)
            self.tenants.entries_reserved[t] += slots.numel() * self.store.config.entries_per_token

    def tenant_threshold(self, req) -> float:
        """τ a request runs at: its tenant's, or the server's."""
        if self.tenants is None or req is None:
            return self.settings.threshold
        return self.tenants.thresholds[self.tenants.index_of_request(req)]

    def release_row(self, row: int, row_slots: torch.Tensor) -> None:
        """A request gave its row back (finished, aborted, retracted): its window protects nothing any more."""
        if self.windows is not None:
            self.windows.release(row, row_slots)

    def after_attention(self, layer_id: int, hidden_states: torch.Tensor) -> None:
        """Score the tokens this forward wrote in layer ``layer_id`` and apply the DMS rule to window exits.

        ``hidden_states`` ``[num_tokens, D]`` is the layer's post-input_layernorm attention input, row-aligned with
        ``out_cache_loc`` (../shared/notes/sglang-internals.md §5). Decisions for this layer are final as soon as its
        attention ran (dense prefill, paper Algorithm 1), so its pruned cells are freed before the next layer runs.
        The slots decided are ``begin_forward``'s (outside every live request's window, decided once).
        """
        view = self.batch
        if view is None or hidden_states.shape[0] == 0:
            return
        layer = self.layer(layer_id)
        if not (view.is_decode and not self.settings.score_decode):
            with torch.no_grad():
                scores = self.surrogate.layers[layer](hidden_states.to(self.surrogate_dtype))  # [T, H]
            self.store.set_scores(layer, view.out_cache_loc, scores)
        before = list(self.store.tenant.cells) if self.tenants is not None else None
        self.totals.entries_pruned += prune_decided(self.store, layer, self.deciding, self.deciding_tau)
        if before is not None:
            for t in range(len(self.tenants.names)):
                self.tenants.entries_pruned[t] += before[t] - self.store.tenant.cells[t]

    def set_threshold(self, tau: float) -> None:
        """Change τ without a restart (plugin/calibration.py applies it between forwards). Entries already decided
        stay decided: each one is judged once, when it leaves the window, with the τ of that moment."""
        self.settings = replace(self.settings, threshold=float(tau))  # validated like a start-up value
        if self.tenants is not None:
            self.tenants.set_base_threshold(0, float(tau))

    def set_tenant_threshold(self, tenant: str, tau: float) -> None:
        """A tenant's τ changed (calibration service): it judges that tenant's next decisions."""
        if tenant == DEFAULT_TENANT or self.tenants is None:
            return self.set_threshold(tau)
        KVzapSettings(threshold=float(tau))  # same validation as a start-up value
        self.tenants.set_base_threshold(self.tenants.index(tenant), float(tau))

    def tighten_tenant(self, t: int, cells_needed: int, keep: torch.Tensor | None = None) -> int:
        """Tighten-before-queueing (plugin/tenants.py): raise tenant ``t``'s τ within its range until judging its
        decided entries again frees ``cells_needed`` cells (or τ_max is reached); returns the cells freed. The slots
        ``keep`` (prefixes waiting requests were counted to reuse) are not judged again."""
        table, store = self.tenants, self.store
        tau_max = table.ranges[t][1]
        if table.thresholds[t] >= tau_max:
            return 0
        mine = (store.tenant.tag == t) & ~torch.isnan(store.slot_decided)
        if self.windows is not None:
            # A decided slot comes back into a live window when a later request reuses the prefix (the match only
            # asks window entries to be intact): the window protects it again until it leaves.
            mine &= self.windows.refs == 0
        mine[0] = False  # the padding slot
        if keep is not None:
            mine[keep] = False
        tau, freed = retighten(store, mine.nonzero().squeeze(1), cells_needed, table.thresholds[t], tau_max)
        if tau > table.thresholds[t]:
            table.thresholds[t] = tau
            table.tightenings[t] += 1
            self.highest_decided_tau = max(self.highest_decided_tau, tau)
        table.entries_pruned[t] += freed
        table.entries_pruned_tightening[t] += freed
        self.totals.entries_pruned += freed
        if freed:
            notify_cells_released()
        return freed

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
            "admissions_reopened": self.admissions_reopened,
        }


_runtime: KvzapRuntime | None = None
# Called with the runtime whenever cells are given back in bulk (slot frees, a flush) or a request gives its row back;
# reporting's gauges subscribe here.
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
