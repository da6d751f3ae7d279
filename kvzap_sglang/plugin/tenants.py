"""Multi-tenant serving inside SGLang (issue #8): identity at the HTTP edge, per-tenant τ/window in the forward,
per-tenant KV budgets at admission, per-tenant figures.

* **Identity** (main process) — ``TenantMiddleware`` on SGLang's FastAPI app resolves the tenant of every
  ``POST``/``PUT`` to ``/generate``, ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/responses``
  (``TenantsConfig.resolve``: API key or ``X-KVzap-Tenant``; 401/403 with a reason when refused) and writes it into
  the request's ``extra_key`` (SGLang's radix-cache namespace), so a tenant's cached prefixes are not served to
  another (unless both name the same ``prefix_cache_group``: ``radix_cache.KvzapRadixCache._namespaced``) and the
  scheduler knows whose request it runs. A body that sets a tenant namespace itself is refused (403 there; 400 on SGLang's other generation routes,
  whose requests run as ``default``: ``refuse_unvouched_tenant_keys``). SGLang's sessions (``/open_session``,
  ``session_params``) are refused with a 400: they are not tenant-scoped.
* **τ and window** (scheduler) — each request row carries its tenant; the window tracker uses the tenant's window
  and the slots a forward decides are pruned at their tenant's τ (``KvzapRuntime.begin_forward``). The
  calibration service's per-tenant τ replaces a tenant's τ live (``calibration.py``).
* **Budgets** (scheduler) — in ``hooks.admission``, AROUND ``Scheduler.get_new_batch_prefill``: a waiting request
  whose tenant's held cells (its live requests + its cached prefixes, ``CellStore.tenant``) plus the growth its
  running requests may still need plus this request's worst case (prompt + ``max_new_tokens``, unpruned) would
  exceed the budget stays queued for this round, after the tenant's own evictable cached prefixes have been
  evicted to make room, and so do the tenant's later requests while its own running requests are what it waits
  for (first come, first served within a tenant, as SGLang's own admission stops at the first request that does
  not fit: small requests never starve a large one; a tenant with nothing running whose request still does not
  fit waits for cells it cannot free, such as its cached prefix in use by another tenant of its prefix-cache
  group, and its later requests go ahead rather than wait with it);
  the other tenants' requests are admitted as usual, so one tenant's burst never blocks another's admission. Held
  requests keep their places in the waiting queue (``requeue``). A tenant's requests take their turns in SGLang's
  order: by priority first under ``--enable-priority-scheduling``, longest output first under ``lof``
  (``_in_turn_order``). Structured-output requests
  whose grammar is ready join the waiting queue before the check, not inside SGLang's admission after it
  (``_take_ready_grammar_requests``); a request SGLang refuses needs only the one token it is queued with.
* **A tenant's budget is its pool** (``cap_to_budget``, AROUND ``Scheduler.init_req_max_new_tokens``) — as SGLang
  clips ``max_new_tokens`` to what the whole pool can hold and refuses a prompt that cannot fit, a request of a
  tenant with a budget has ``max_new_tokens`` clipped so that prompt + new tokens fit the budget (finish reason
  ``length`` there), and a prompt of the budget's size or more is refused (HTTP 400 with the reason) at arrival. So
  every request's worst case fits its tenant's budget, and budgets are hard limits.
* **Tighten before queueing** (optional, ``threshold_range = [τ_min, τ_max]``) — before such a request is held back,
  the tenant's τ rises to the lowest value up to τ_max at which judging its decided entries again frees the cells
  the request lacks (``storage.retighten``: scores are kept, so nothing is rescored); it stays there for the
  tenant's later decisions while any of its requests wait, then returns to its base τ. The budget check itself is
  unchanged (worst case, unpruned), so held cells never exceed the budget either way.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from kvzap_sglang.tenants import (
    DEFAULT_TENANT,
    EXTRA_KEY_PREFIX,
    GROUP_KEY_PREFIX,
    TenantAuthError,
    TenantsConfig,
    clamp_to_range,
    extra_key_for,
    tenant_of_extra_key,
)

logger = logging.getLogger(__name__)

TENANT_HEADER = "x-kvzap-tenant"
# SGLang's routes whose body carries an extra_key into the scheduler (0.5.23); the check in the tokenizer manager
# (refuse_unvouched_tenant_keys) covers any other route that starts to.
TENANT_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses")
TENANT_METHODS = ("POST", "PUT")  # SGLang serves /generate for both
# SGLang's sessions are not tenant-scoped: a request naming another tenant's session id would run on that tenant's
# history (Session.create_req builds the prompt from it), and "replace" would clear it. Not served with tenants.
SESSION_PATHS = ("/open_session", "/close_session")
SESSIONS_REFUSED = "SGLang sessions are not tenant-scoped, so they are not served with --kvzap-tenants"
# SGLang serves these to any client when no --api-key is set, which is the case with tenants. Their per-tenant
# sections (names, τ, budgets, cells held, queues) go to the admin key's holder only.
SERVER_INFO_PATHS = ("/server_info", "/get_server_info")
TENANT_SECTIONS = ("kvzap", "kvzap_calibration")  # internal_states[i][section]["tenants"]
TENANTS_HIDDEN = "per-tenant figures are shown to the admin API key only (Authorization: Bearer ADMIN_KEY)"

# The scheduler takes a request's tenant from its extra_key, so in the HTTP process a tenant namespace may only come
# from TenantMiddleware: these are the extra_keys it wrote for the HTTP request being served (None outside one), and
# ``refuse_unvouched_tenant_keys`` refuses any other (SGLang's other generation routes accept extra_key too).
# Namespaces only KVzap writes: a tenant's (the middleware) and a prefix-cache group's (the radix cache maps a group
# tenant's namespace to it). A client's raw extra_key starting with either would reach that tenant's or group's
# cached prefixes from a route the middleware does not cover.
RESERVED_KEY_PREFIXES = (EXTRA_KEY_PREFIX, GROUP_KEY_PREFIX)
_vouched_extra_keys: ContextVar[frozenset[str] | None] = ContextVar("kvzap_vouched_extra_keys", default=None)
_edge_installed = False  # tenants on, launched here: an extra_key naming a tenant must be vouched for


@contextmanager
def vouching_for(extra_keys) -> Iterator[None]:
    """Within this block (this context), requests may carry these tenant ``extra_key``s: the HTTP edge vouches for
    the one it wrote; ``engine_requests`` for the one an Engine caller asked for."""
    vouched = _vouched_extra_keys.set(frozenset(extra_keys if isinstance(extra_keys, list) else [extra_keys]))
    try:
        yield
    finally:
        _vouched_extra_keys.reset(vouched)


# ---------------------------------------------------------------------------- scheduler-side table


@dataclass
class TenantTable:
    """Per-tenant settings and counters in a scheduler; index 0 is ``default``."""

    names: list[str]
    thresholds: list[float]  # τ in use (above base_thresholds while the tighten policy is active)
    windows: list[int]
    budget_cells: list[int | None]
    row_tenant: torch.Tensor  # int64 [rows]: tenant of the request in each req_to_token row
    base_thresholds: list[float] = field(default_factory=list)  # the file's / flag's / calibration service's τ
    ranges: list[tuple[float, float] | None] = field(default_factory=list)  # tighten-before-queueing [min, max]
    entries_reserved: list[int] = field(default_factory=list)
    entries_pruned: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)  # the tenant's requests admitted and not finished
    held_back: list[int] = field(default_factory=list)  # admission rounds a request waited for its budget
    refused: list[int] = field(default_factory=list)  # requests whose prompt alone did not fit the budget
    tightenings: list[int] = field(default_factory=list)  # times τ was raised before queueing
    entries_pruned_tightening: list[int] = field(default_factory=list)  # cells freed by those raises

    @classmethod
    def build(cls, config: TenantsConfig, threshold: float, window: int, cells_per_token: int, num_rows: int,
              device) -> TenantTable:  # fmt: skip
        specs = config.specs()
        n = len(specs)
        base = [s.clamp_threshold(threshold if s.threshold is None else s.threshold) for s in specs.values()]
        return cls(
            names=list(specs),
            thresholds=list(base),
            windows=[window if s.window is None else s.window for s in specs.values()],
            budget_cells=[None if s.kv_budget_tokens is None else s.kv_budget_tokens * cells_per_token
                          for s in specs.values()],  # fmt: skip
            row_tenant=torch.zeros(num_rows, dtype=torch.int64, device=device),
            base_thresholds=base, ranges=[s.threshold_range for s in specs.values()],
            entries_reserved=[0] * n, entries_pruned=[0] * n, queued=[0] * n, running=[0] * n, held_back=[0] * n,
            refused=[0] * n, tightenings=[0] * n, entries_pruned_tightening=[0] * n,
        )  # fmt: skip

    def budget_warnings(self, pool_cells: int, cells_per_token: int) -> list[str]:
        """What an operator should know about the budgets against the pool: a budget larger than the whole pool (the
        pool is then the limit), and budgets that add up to more than the pool (each tenant stays within its own but
        may wait for cells other tenants hold: a budget is a ceiling, not a reservation)."""
        pool = pool_cells // cells_per_token
        budgets = {name: b // cells_per_token for name, b in zip(self.names, self.budget_cells) if b is not None}
        lines = [f"KVzap tenant {name!r}: kv_budget_tokens {tokens} is more than the whole KV pool ({pool} tokens), "
                 f"which is then its limit" for name, tokens in budgets.items() if tokens > pool]  # fmt: skip
        if len(budgets) > 1 and sum(budgets.values()) > pool:
            lines.append(f"KVzap tenants: the KV budgets add up to {sum(budgets.values())} tokens, more than the pool's "
                         f"{pool}: each tenant stays within its own budget, but its requests may wait for cells other "
                         f"tenants hold (a budget is a ceiling, not a reservation)")  # fmt: skip
        return lines

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            return 0

    def index_of_request(self, req) -> int:
        extra_key = getattr(req, "extra_key", None)
        return self.index(tenant_of_extra_key(extra_key)) if extra_key else 0

    @property
    def has_budgets(self) -> bool:
        return any(b is not None for b in self.budget_cells)

    def set_base_threshold(self, t: int, tau: float) -> None:
        """A new τ for tenant ``t`` (calibration service, flag): kept inside its range; a τ tightened above it
        stays until the tenant's queue empties (``relax``)."""
        base = clamp_to_range(tau, self.ranges[t])
        tightened = self.thresholds[t] > self.base_thresholds[t]
        self.base_thresholds[t] = base
        self.thresholds[t] = max(base, self.thresholds[t]) if tightened else base

    def relax(self, t: int) -> None:
        """Tenant ``t`` has nothing waiting: later decisions go back to its base τ (entries freed stay freed)."""
        self.thresholds[t] = self.base_thresholds[t]

    def threshold_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.thresholds, dtype=torch.float32, device=device)

    def window_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.windows, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------- admission (scheduler)


def admit_within_budgets(original, scheduler, *args, **kwargs):
    """AROUND ``Scheduler.get_new_batch_prefill``: hold back over-budget tenants' requests for this round (module
    docstring), run SGLang's admission on the rest, then tag the admitted requests' rows with their tenants."""
    from kvzap_sglang.plugin import runtime

    rt = runtime.current()
    table = None if rt is None else rt.tenants
    if table is None:
        return original(scheduler, *args, **kwargs)
    # SGLang passes the batch it admits into (the last prefill merged in); scheduler.running_batch is only updated
    # after this call, so reading it missed the decode growth of requests prefilled in the previous step.
    running_batch = args[0] if args else kwargs["running_batch"]
    compiling = _take_ready_grammar_requests(scheduler) if table.has_budgets else None
    held_back, reused = [], []
    try:
        held_back = _hold_back(scheduler, rt, table, running_batch, reused) if table.has_budgets else []
        kept = scheduler.waiting_queue
        if held_back:
            held = set(map(id, held_back))
            scheduler.waiting_queue = [req for req in kept if id(req) not in held]
        plan = original(scheduler, *args, **kwargs)
    finally:
        if held_back:
            scheduler.waiting_queue = requeue(kept, scheduler.waiting_queue, held_back)
        if compiling is not None:
            scheduler.grammar_manager.grammar_queue = compiling + scheduler.grammar_manager.grammar_queue
        for reuse in reused:  # SGLang's admission holds its own lock on the prefixes of the requests it took
            scheduler.tree_cache.dec_lock_ref(reuse.node)
    batch = getattr(plan, "batch_to_run", None)
    if batch is not None:
        for req in batch.reqs:
            if req.kv.req_pool_idx is not None:
                table.row_tenant[req.kv.req_pool_idx] = table.index_of_request(req)
    table.queued = _count_by_tenant(table, scheduler.waiting_queue)
    admitted = list(getattr(plan.running_batch, "reqs", [])) + (list(batch.reqs) if batch is not None else [])
    table.running = _count_by_tenant(table, {id(req): req for req in admitted}.values())
    return plan


def _take_ready_grammar_requests(scheduler) -> list | None:
    """Move the requests whose grammars are ready into the waiting queue, as SGLang's admission does first, so that
    the budgets apply to them too; returns the requests still compiling, taken out of the grammar queue for the
    round (None when there were none), so SGLang's admission finds it empty. Structured-output requests (``regex``,
    ``json_schema``, ``ebnf``) wait in that queue while their grammar compiles, and were admitted unchecked.

    Still one poll a round, as without KVzap: a poll counts each waiting grammar's rounds towards its time-out and,
    with several ranks, is a collective (``GrammarManager.get_ready_grammar_requests``)."""
    manager = getattr(scheduler, "grammar_manager", None)
    if manager is None or not manager.has_waiting_grammars():
        return None
    for req in manager.get_ready_grammar_requests():
        scheduler._add_request_to_queue(req)
    compiling, manager.grammar_queue = manager.grammar_queue, []
    return compiling


def requeue(before: list, after: list, held_back: list) -> list:
    """The waiting queue after a round that held ``held_back`` out of it: what SGLang left waiting (``after``) and
    the held-back requests, in their places of ``before`` (the queue the round started from), so a request that
    waited for its budget keeps its turn rather than going behind every later arrival. Requests SGLang queued during
    the round (a preempted one) follow, in SGLang's order."""
    place = {id(req): i for i, req in enumerate(before)}
    return sorted([*after, *held_back], key=lambda req: place.get(id(req), len(before)))


def _count_by_tenant(table: TenantTable, reqs) -> list[int]:
    counts = [0] * len(table.names)
    for req in reqs:
        counts[table.index_of_request(req)] += 1
    return counts


def _hold_back(scheduler, rt, table: TenantTable, running_batch, reused: list[_Reuse]) -> list:
    """The waiting requests that stay queued this round for their tenants' budgets (module docstring). The cached
    prefixes that admitted requests were counted to reuse stay locked for the round, listed in ``reused``."""
    waiting = {table.index_of_request(req) for req in scheduler.waiting_queue}
    for t, low_high in enumerate(table.ranges):
        if low_high is not None and t not in waiting:
            table.relax(t)
    budgets = _BudgetRound.begin(scheduler, rt, table, running_batch, reused)
    for req in _in_turn_order(scheduler):
        budgets.judge(req)
    return budgets.held_back


@dataclass
class _BudgetRound:
    """One admission round's accounts, in cells per tenant: what each has committed (held cells + the growth its
    running requests may still need + the requests admitted so far this round), and what was decided."""

    scheduler: object
    rt: object
    table: TenantTable
    committed: list[int]
    busy: list[bool]  # has running or admitted requests: they will free room
    reused: list[_Reuse]
    evict: object  # KvzapRadixCache.evict_tenant; None without KVzap's prefix cache (--disable-radix-cache)
    held_back: list = field(default_factory=list)
    tightened: set[int] = field(default_factory=set)  # one re-judgement per tenant and round (a scan of its slots)
    blocked: set[int] = field(default_factory=set)  # a request waits for the tenant's own: later ones wait behind it
    evicted_all: set[int] = field(default_factory=set)  # nothing of the tenant's left to evict this round

    @classmethod
    def begin(cls, scheduler, rt, table: TenantTable, running_batch, reused: list[_Reuse]) -> _BudgetRound:
        per_token = rt.store.config.entries_per_token
        committed = list(rt.store.tenant.cells[: len(table.names)])
        busy = [False] * len(table.names)
        running = list(getattr(running_batch, "reqs", []))
        chunked = scheduler.chunked_req
        if chunked is not None and all(req is not chunked for req in running):
            running.append(chunked)
        for req in running:
            t = table.index_of_request(req)
            busy[t] = True
            committed[t] += still_to_write(req, _max_new_tokens(scheduler, req), req is chunked) * per_token
        return cls(scheduler, rt, table, committed, busy, reused, getattr(scheduler.tree_cache, "evict_tenant", None))

    def judge(self, req) -> None:
        """Admit ``req`` into its tenant's account or hold it back."""
        t = self.table.index_of_request(req)
        budget = self.table.budget_cells[t]
        if budget is None:
            return
        # SGLang queues a request it refuses (its grammar failed, its prompt exceeds the budget) to send its error:
        # it prefills its fill once (one token after set_finish_with_abort) and never decodes; it overtakes no one.
        refused = req.to_finish is not None or req.finished()
        if t in self.blocked and not refused:  # first come, first served within a tenant
            self._hold(req, t)
            return
        # Worst case: prompt + every new token (a retracted request's output so far is part of its max_new_tokens).
        grows = len(req.output_ids) if refused else _max_new_tokens(self.scheduler, req)
        need = (len(req.origin_input_ids) + grows) * self.rt.store.config.entries_per_token
        reuse = None
        if self.committed[t] + need > budget and not refused:
            reuse = self._reuse(req)
            need -= 0 if reuse is None else reuse.tokens * self.rt.store.config.entries_per_token
        if self.committed[t] + need > budget:
            self._make_room(t, self.committed[t] + need - budget)
        # cap_to_budget makes every request fit an empty budget; one that came in some other way (a path of a later
        # SGLang that skips init_req_max_new_tokens) runs alone rather than waiting forever.
        alone = not self.busy[t] and self.rt.store.tenant.cells[t] == 0 and need > budget
        if self.committed[t] + need <= budget or alone:
            self.committed[t] += need
            self.busy[t] = True
            return
        if reuse is not None:  # waits: its prefix may go to make room for others this round
            self.reused.remove(reuse)
            self.scheduler.tree_cache.dec_lock_ref(reuse.node)
        self._hold(req, t)

    def _hold(self, req, t: int) -> None:
        self.held_back.append(req)
        self.table.held_back[t] += 1
        if self.busy[t]:  # its own requests will free room: the tenant's later requests wait their turn behind it
            self.blocked.add(t)

    def _reuse(self, req) -> _Reuse | None:
        """The cached prefix ``req`` will reuse, locked for the round (KVzap's prefix cache only)."""
        if self.evict is None:  # no prefix cache: nothing to reuse
            return None
        reuse = _lock_reused_prefix(self.scheduler.tree_cache, req)
        if reuse is not None:
            self.reused.append(reuse)
        return reuse

    def _make_room(self, t: int, lacking: int) -> None:
        """Free up to ``lacking`` cells of tenant ``t``: its evictable cached prefixes, then (with a threshold range)
        its decided entries judged again at a higher τ."""
        if self.evict is not None and t not in self.evicted_all:
            freed = self.evict(t, lacking)
            self.committed[t] -= freed
            lacking -= freed
            if lacking > 0:  # nothing of the tenant's is left to evict this round: its later requests skip it
                self.evicted_all.add(t)
        if lacking > 0 and self.table.ranges[t] is not None and t not in self.tightened:
            self.tightened.add(t)
            # Never the prefixes counted as reused: a hole there makes the admission's match back off (KVzap's rule
            # 1 in the request's window, rule 2 for a group tenant at a lower τ), and the tokens it leaves would be
            # prefilled uncounted.
            keep = torch.cat([r.slots for r in self.reused]) if self.reused else None
            self.committed[t] -= self.rt.tighten_tenant(t, lacking, keep=keep)


@dataclass(eq=False)  # identity: a list of them is searched by ``remove``
class _Reuse:
    """A cached prefix a waiting request was counted to reuse, locked until SGLang's admission has run."""

    tokens: int
    node: object  # the radix-tree node locked (its path to the root)
    slots: torch.Tensor  # the slots of that path


def _lock_reused_prefix(tree, req) -> _Reuse | None:
    """What of ``req``'s prompt its admission will take from the prefix cache (SGLang's own match, with KVzap's
    back-off), locked for the round so that evicting for the tenant's budget keeps it. Without this a question on
    a document the tenant had cached counted the document twice (its cells held + the whole prompt), so the
    document was evicted to make room for itself and prefilled again."""
    from sglang.srt.mem_cache.common import match_kv_cache

    if req.positional_embed_overrides is not None:  # SGLang matches nothing for these (Req.init_next_round_input)
        return None
    match = match_kv_cache(req, tree)
    node = match.last_device_node
    if req.num_matched_prefix_tokens == 0 or node is None or node is tree.root_node:
        return None
    tree.inc_lock_ref(node)
    return _Reuse(req.num_matched_prefix_tokens, node, tree.path_device_indices(node))


def still_to_write(req, max_new_tokens: int, chunked: bool) -> int:
    """Tokens a running request may still write: its new tokens to come and, while it is prefilled in chunks, the
    rest of its fill (after its cached prefix and the chunks so far). A retracted or preempted request keeps its
    output and prefills it again with its prompt; counting only the prompt, its tenant's budget lost that much."""
    remaining = max(0, max_new_tokens - len(req.output_ids))
    if chunked:
        remaining += max(0, len(req.origin_input_ids) + len(req.output_ids) - req.kv.kv_allocated_len)
    return remaining


def _in_turn_order(scheduler) -> list:
    """The waiting queue in the order a tenant's requests take their turns: SGLang's own sort of it where that sort
    needs no prefix matching (``SchedulePolicy.calc_priority``): longest output first under ``--schedule-policy
    lof`` (by priority first with priority scheduling), by priority then arrival under priority scheduling, else the
    queue's order. Unsorted, a tenant's request of a higher priority, or under lof one with a longer output, waited
    behind a held one that SGLang's admission would have taken after it."""
    from sglang.srt.managers.schedule_policy import CacheAgnosticPolicy, SchedulePolicy

    policy = scheduler.policy
    by_priority = getattr(scheduler, "enable_priority_scheduling", False)
    if policy.policy == CacheAgnosticPolicy.LOF:
        queue = list(scheduler.waiting_queue)
        SchedulePolicy._sort_by_longest_output(queue, by_priority, policy.priority_sign)
        return queue
    if by_priority:
        queue = list(scheduler.waiting_queue)
        SchedulePolicy._sort_by_priority_and_fcfs(queue, policy.priority_sign)
        return queue
    return scheduler.waiting_queue


def cap_to_budget(original, scheduler, req, *args, **kwargs):
    """AROUND ``Scheduler.init_req_max_new_tokens``: after SGLang's own clipping to the pool, clip the request's
    ``max_new_tokens`` to its tenant's budget, or refuse a prompt that leaves no room for one new token."""
    from kvzap_sglang.plugin import runtime

    result = original(scheduler, req, *args, **kwargs)
    rt = runtime.current()
    table = None if rt is None else rt.tenants
    if table is None or req.finished_reason is not None:
        return result
    t = table.index_of_request(req)
    budget_cells = table.budget_cells[t]
    if budget_cells is None:
        return result
    budget = budget_cells // rt.store.config.entries_per_token
    prompt = len(req.origin_input_ids)
    params = req.sampling_params
    if prompt >= budget:
        table.refused[t] += 1
        req.set_finish_with_abort(
            f"Request prompt exceeds the KV budget of tenant {table.names[t]!r}: input_len={prompt}, "
            f"kv_budget_tokens={budget} (the prompt and at least one new token must fit)"
        )
        params.max_new_tokens = 0
    elif params.max_new_tokens is None or prompt + params.max_new_tokens > budget:
        params.max_new_tokens = budget - prompt
    params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
    return result


def _max_new_tokens(scheduler, req) -> int:
    """The request's decode budget; no limit means up to the context length."""
    limit = req.sampling_params.max_new_tokens
    if limit is None:
        limit = max(0, scheduler.model_config.context_len - len(req.origin_input_ids))
    return limit


# ---------------------------------------------------------------------------- identity (HTTP, main process)


class TenantMiddleware:
    """ASGI middleware: resolve the tenant of generation requests and write it into their ``extra_key``."""

    def __init__(self, app, config: TenantsConfig, admin_api_key: str | None = None) -> None:
        self.app = app
        self.config = config
        self.admin_api_key = admin_api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in SESSION_PATHS:
            return await _reject(send, 400, SESSIONS_REFUSED)
        if scope["type"] == "http" and scope["path"] in SERVER_INFO_PATHS and not self._from_admin(scope):
            return await self.app(scope, receive, _hiding_tenant_figures(send))
        if scope["type"] != "http" or scope["method"] not in TENANT_METHODS or scope["path"] not in TENANT_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            api_key = self._api_key(headers.get("authorization"))
            tenant = self.config.resolve(api_key, headers.get(TENANT_HEADER) or None)
            body = await _read_body(receive)
            payload = json.loads(body or b"{}")
            if not isinstance(payload, dict):
                raise TenantAuthError(400, "the request body must be a JSON object")
            if payload.get("session_params") is not None:
                raise TenantAuthError(400, SESSIONS_REFUSED)
            payload["extra_key"] = _tenant_extra_key(tenant, payload.get("extra_key"))
        except TenantAuthError as error:
            return await _reject(send, error.status, error.reason)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # not UTF-8: latin-1 text, a gzip body
            return await _reject(send, 400, f"invalid JSON body: {error}")
        new_body = json.dumps(payload).encode()
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(new_body)).encode())])  # fmt: skip
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        with vouching_for(payload["extra_key"]):
            return await self.app(scope, replay, send)

    def _from_admin(self, scope) -> bool:
        authorization = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        key = _bearer_key(authorization.decode("latin-1"))
        if not self.admin_api_key or key is None:
            return False
        return secrets.compare_digest(key.encode(), self.admin_api_key.encode())

    def _api_key(self, authorization: str | None) -> str | None:
        """The key of an ``Authorization: Bearer KEY`` header. With keys configured, a header of any other form
        (``Basic ...``, a bare ``Bearer``, a tab after it) is a 401: read as no key, it ran as ``default``."""
        if (key := _bearer_key(authorization)) is not None:
            return key
        if authorization and self.config.keys_configured:
            raise TenantAuthError(401, "the Authorization header must be 'Bearer API_KEY'")
        return None


def _bearer_key(authorization: str | None) -> str | None:
    """The KEY of an ``Authorization: Bearer KEY`` header; None without a header or for any other form."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def refuse_unvouched_tenant_keys(obj) -> None:
    """HTTP process, per request before it is queued: an ``extra_key`` naming a tenant namespace that
    ``TenantMiddleware`` did not write for this HTTP request (another route, or a body that set it) is a
    ``ValueError`` (HTTP 400): it would run as that tenant, on its cached prefixes and budget, without its key."""
    if not _edge_installed:
        return
    value = getattr(obj, "extra_key", None)
    vouched = _vouched_extra_keys.get() or frozenset()
    for key in value if isinstance(value, list) else [value]:
        if isinstance(key, str) and key.startswith(RESERVED_KEY_PREFIXES) and key not in vouched:
            raise ValueError(
                f"extra_key may not name a tenant or prefix-cache group namespace ({' or '.join(RESERVED_KEY_PREFIXES)}"
                f"...): a request's tenant comes from its API key on {', '.join(TENANT_PATHS)}"
            )


def _tenant_extra_key(tenant: str, client_value):
    values = client_value if isinstance(client_value, list) else [client_value]
    for value in values:
        if value is not None and not isinstance(value, str):
            raise TenantAuthError(400, "extra_key must be a string or a list of strings")
        if value and value.startswith(RESERVED_KEY_PREFIXES):
            raise TenantAuthError(403, "extra_key may not name a tenant namespace; send the tenant's API key")
    if isinstance(client_value, list):
        return [extra_key_for(tenant, value) for value in client_value]
    return extra_key_for(tenant, client_value)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _hiding_tenant_figures(send):
    """``send`` for a ``/server_info`` reply to a client without the admin key: the body is held until complete, its
    per-tenant sections are replaced by ``tenants_hidden``, and it goes out with its new length. A body that cannot
    be read as the JSON SGLang sends is not passed on (502): it might carry them in some other shape."""
    start, chunks = None, []

    async def hide(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        status, body = start["status"], b"".join(chunks)
        try:
            body = hide_tenant_figures(body) if status == 200 else body
        except ValueError:
            status, body = 502, json.dumps({"error": {"message": "unreadable /server_info reply", "code": 502}})
            body = body.encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "status": status, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return hide


def hide_tenant_figures(body: bytes) -> bytes:
    """``/server_info``'s JSON body without its per-tenant sections (``TENANT_SECTIONS``); ``ValueError`` when it is
    not the JSON object SGLang sends."""
    info = json.loads(body)
    if not isinstance(info, dict):
        raise ValueError("not a JSON object")
    for state in info.get("internal_states") or []:
        for section in TENANT_SECTIONS:
            figures = state.get(section) if isinstance(state, dict) else None
            if isinstance(figures, dict) and figures.pop("tenants", None) is not None:
                figures["tenants_hidden"] = TENANTS_HIDDEN
    return json.dumps(info).encode()


async def _reject(send, status: int, reason: str) -> None:
    body = json.dumps({"error": {"message": reason, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def install_http_middleware(config: TenantsConfig, admin_api_key: str | None = None) -> None:
    """Add ``TenantMiddleware`` to SGLang's FastAPI app (launching process, before the server starts)."""
    from sglang.srt.entrypoints import http_server

    global _edge_installed
    _edge_installed = True
    if not getattr(http_server.app.state, "kvzap_tenants", False):
        http_server.app.add_middleware(TenantMiddleware, config=config, admin_api_key=admin_api_key)
        http_server.app.state.kvzap_tenants = True
        logger.info("KVzap tenants: %s (API keys %s)", config.names(), "on" if config.keys_configured else "off")


def snapshot(table: TenantTable, store) -> dict:
    """Per-tenant figures for ``/server_info`` and the metrics."""
    out = {}
    for t, name in enumerate(table.names):
        reserved = table.entries_reserved[t]
        out[name] = {
            "threshold": table.thresholds[t],
            "threshold_base": table.base_thresholds[t],
            "threshold_range": None if table.ranges[t] is None else list(table.ranges[t]),
            "tightenings": table.tightenings[t],
            "entries_pruned_tightening": table.entries_pruned_tightening[t],
            "window": table.windows[t],
            "budget_cells": table.budget_cells[t],
            "cells_held": store.tenant.cells[t],
            "queued_requests": table.queued[t],
            "running_requests": table.running[t],
            "held_back_rounds": table.held_back[t],
            "refused_requests": table.refused[t],
            "entries_reserved": reserved,
            "entries_pruned": table.entries_pruned[t],
            "removed_fraction": table.entries_pruned[t] / reserved if reserved else 0.0,
        }
    return out


__all__ = [
    "DEFAULT_TENANT", "TenantMiddleware", "TenantTable", "admit_within_budgets", "cap_to_budget",
    "install_http_middleware",
]
