"""Head-granular KV storage: virtual token slots mapped to one physical cell per (layer, KV head).

Why (docs/design.md, ../shared/notes/granularity.md): KVzap drops single (layer, KV head, token) entries, and
SGLang's pool slot holds a token for all layers and heads, so at 50–75 % removed entries token slots free no memory.
Here a token slot owns no K/V memory; it owns up to ``layers × kv_heads`` cells through ``slot_to_cell``, and each
cell can be freed on its own and reused by any request, layer or head.

Tensors (``S = num_slots``, ``N = num_cells``, ``L = layers``, ``H = kv_heads``, ``d = head_dim``):

* ``k_cells``, ``v_cells``: ``[N + 1, d]`` in ``dtype``; row 0 is the padding cell (never handed out; writes of
  SGLang's dummy slot 0 land there, and index tensors are padded with it).
* ``slot_to_cell``: int32 ``[S + 1, L, H]``; ``-1`` = no cell (pruned, freed or never written). Slot 0 is SGLang's
  padding slot and never maps to a cell.
* ``slot_scores``: float32 ``[S + 1, L, H]`` (``SCORE_DTYPE``: bf16's ~0.03 step at |score|≈4 would move entries
  across τ and break equality with ``policy.keep_mask``); NaN = no score (the DMS rule keeps it).

Per-slot bookkeeping (``[S + 1]`` each), kept exact by every write/reserve/prune/free:

* ``slot_cells`` int32 — cells the slot holds (``layers × kv_heads`` when intact);
* ``slot_decided`` float32 — the τ at which the slot's entries were decided by the DMS rule, NaN while undecided
  (inside some request's window). Each slot is decided once; reset when the slot is freed;
* ``owner`` / ``tenant`` — ``SlotTags``: an owner tag (0 = untagged; a prefix cache tags the slots it holds as
  evictable / protected) and a tenant tag (multi-tenant budgets), each with cell and slot counts per value that
  follow pruning without the owner being told. ``slot_group`` / ``group_cells`` / ``group_slots`` /
  ``set_group`` are the owner tag's.

Invariant (``check_invariants``): every cell id in ``slot_to_cell`` is in use, and every in-use cell appears in
``slot_to_cell`` exactly once. So freeing through the map can never double-free, and freeing every slot leaves 0
cells in use. The per-slot and per-group counts match the map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzap_sglang.storage.cell_allocator import CellAllocator
from kvzap_sglang.storage.slot_tags import SlotTags

NO_CELL = -1
NUM_GROUPS = 3  # slot owner tags 0..2 (0 = untagged); the radix cache uses 1 = evictable, 2 = protected
MAX_TENANTS = 64  # tenant tags 0..63 (0 = the default tenant)
# Scores are kept in float32, never coarser: τ is compared with them in their dtype, and bf16 would round τ too
# (−4.3 → −4.3125) and move entries across it, so decisions would no longer equal ``policy.keep_mask``'s.
SCORE_DTYPE = torch.float32


@dataclass(frozen=True)
class CellStoreConfig:
    """Sizes and dtypes of a ``CellStore``.

    ``num_slots`` virtual token slots are cheap (``L·H·(4 + 4)`` bytes of map per slot, vs ``2·L·H·d·dtype``
    bytes of K/V per full token), so size them generously; ``num_cells`` is the real memory budget.
    """

    num_slots: int
    num_cells: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None  # only equal K/V head dims are supported (SmolLM2, Llama, Qwen)
    dtype: torch.dtype = torch.bfloat16
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_slots", "num_cells", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.v_head_dim is not None and self.v_head_dim != self.head_dim:
            raise ValueError(f"v_head_dim ({self.v_head_dim}) != head_dim ({self.head_dim}) is not supported")

    @property
    def entries_per_token(self) -> int:
        """Cells one fully kept token holds: ``layers × kv_heads``."""
        return self.num_layers * self.num_kv_heads

    @property
    def kv_bytes(self) -> int:
        """Bytes of ``k_cells`` + ``v_cells``."""
        return 2 * (self.num_cells + 1) * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class CellStore:
    """K/V cells, the slot → cell map, the per-entry scores and the cell allocator.

    Every method taking ``slots`` accepts an integer tensor ``[n]`` of slot ids in ``0 .. num_slots`` (slot 0 is
    padding: writes go to the padding cell, every other op ignores it).
    """

    def __init__(self, config: CellStoreConfig) -> None:
        self.config = config
        c = config
        device = torch.device(c.device)
        self.device = device
        self.k_cells = torch.zeros(c.num_cells + 1, c.head_dim, dtype=c.dtype, device=device)
        self.v_cells = torch.zeros(c.num_cells + 1, c.head_dim, dtype=c.dtype, device=device)
        shape = (c.num_slots + 1, c.num_layers, c.num_kv_heads)
        self.slot_to_cell = torch.full(shape, NO_CELL, dtype=torch.int32, device=device)
        self.slot_scores = torch.full(shape, float("nan"), dtype=SCORE_DTYPE, device=device)
        self.allocator = CellAllocator(c.num_cells, device=device)
        self.slot_cells = torch.zeros(c.num_slots + 1, dtype=torch.int32, device=device)
        self.slot_decided = torch.full((c.num_slots + 1,), float("nan"), dtype=torch.float32, device=device)
        self.owner = SlotTags(c.num_slots, NUM_GROUPS, device)
        self.tenant = SlotTags(c.num_slots, MAX_TENANTS, device)
        # Cumulative counters for observability: cells handed to entries (write/reserve), cells freed by prune.
        self.entries_allocated = 0
        self.entries_pruned = 0

    # ------------------------------------------------------------------ accounting

    def used_cells(self) -> int:
        return self.allocator.used()

    def free_cells(self) -> int:
        return self.allocator.available()

    def token_capacity(self) -> int:
        """Free memory in token-equivalents, ``free_cells // (layers · kv_heads)``: what admission control sees."""
        return self.allocator.available() // self.config.entries_per_token

    def cells_held(self, slots: torch.Tensor) -> torch.Tensor:
        """int64 ``[n]``: cells each slot holds over all layers and heads (0 for slot 0)."""
        return self.slot_cells.index_select(0, self._slots(slots)).to(torch.int64)

    # ------------------------------------------------------------------ writes

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scores: torch.Tensor | None = None,
    ) -> None:
        """Store layer ``layer``'s K/V of tokens ``slots`` for every KV head (SGLang's ``set_kv_buffer``).

        Args:
            slots: ``[n]`` distinct slot ids (slot 0 may repeat: padded tokens, written to the padding cell).
            k, v: ``[n, H, d]`` (or ``[n, H·d]``); cast to the store dtype.
            scores: optional ``[n, H]`` log-scores; when omitted the entries' scores are reset to NaN.

        A (slot, layer, head) that already holds a cell is overwritten in place (SGLang may rewrite a slot; no leak);
        missing ones (never written, or pruned) get a new cell.

        Raises:
            OutOfCells: not enough free cells; nothing was written.
            ValueError: bad layer, slot ids or shapes; nothing was written.
        """
        self._check_layer(layer)
        slots = self._slots(slots)
        n, h, d = slots.numel(), self.config.num_kv_heads, self.config.head_dim
        if k.numel() != n * h * d or v.numel() != n * h * d:
            raise ValueError(f"write(): k/v must hold [{n}, {h}, {d}] values, got {tuple(k.shape)}, {tuple(v.shape)}")
        if scores is not None and scores.numel() != n * h:
            raise ValueError(f"write(): scores must hold [{n}, {h}] values, got {tuple(scores.shape)}")
        k, v = k.reshape(n, h, d), v.reshape(n, h, d)
        # Every layer of every forward comes here, so the common case (each entry holds its cell: the pool reserves
        # a slot's cells when it hands the slot out) is kept to a few ops; the rest only runs when needed.
        if n > 1:  # one slot cannot repeat; a decode step of one request skips the sort
            real_slots = slots[slots != 0]
            if int(torch.unique(real_slots).numel()) != real_slots.numel():
                raise ValueError("write() got the same slot twice")
        cells = self.slot_to_cell[:, layer].index_select(0, slots).to(torch.int64)  # [n, H]; -1 for slot 0
        if int((cells < 0).sum()):  # entries to give a cell, or slot 0 (padding)
            real = slots != 0
            missing = (cells < 0) & real[:, None]
            num_missing = int(missing.sum())
            if num_missing:
                self._allocate_missing(layer, slots, real, cells, missing, num_missing)
            cells.clamp_min_(0)  # slot 0's rows go to the padding cell
        flat = cells.reshape(-1)
        self.k_cells.index_copy_(0, flat, k.reshape(-1, d).to(self.config.dtype))
        self.v_cells.index_copy_(0, flat, v.reshape(-1, d).to(self.config.dtype))
        if scores is None:
            self.slot_scores[:, layer].index_fill_(0, slots, float("nan"))
        else:
            self._store_scores(layer, slots, scores.reshape(n, h))

    def _allocate_missing(self, layer, slots, real, cells, missing, num_missing) -> None:
        """Give ``write``'s entries without a cell one (``cells`` ``[n, H]`` is updated in place)."""
        cells[missing] = self.allocator.alloc(num_missing)  # raises before any change
        real_slots = slots[real]
        self.slot_to_cell[:, layer].index_copy_(0, real_slots, cells[real].to(torch.int32))
        self._count_cells(real_slots, missing[real].sum(dim=1))
        self.entries_allocated += num_missing

    def reserve(self, slots: torch.Tensor) -> int:
        """Give every (slot, layer, head) entry of ``slots`` ``[n]`` that lacks one a cell, before any write.

        For an adapter that must never run out of cells mid-forward: reserving ``layers · kv_heads`` cells per slot
        at slot allocation makes the later ``write`` calls pure in-place copies. Slot 0 is ignored; entries already
        holding a cell keep it. Returns the number of cells allocated.

        Raises:
            OutOfCells: not enough free cells; nothing was reserved.
        """
        slots = self._slots(slots)
        slots = torch.unique(slots[slots != 0])
        cells = self.slot_to_cell.index_select(0, slots)  # [n, L, H]
        missing = cells < 0
        cells[missing] = self.allocator.alloc(int(missing.sum())).to(torch.int32)  # raises before any change
        self.slot_to_cell[slots] = cells
        self.slot_scores[slots] = torch.where(missing, float("nan"), self.slot_scores.index_select(0, slots))
        self._count_cells(slots, missing.sum(dim=(1, 2)))
        self.entries_allocated += int(missing.sum())
        return int(missing.sum())

    def set_scores(self, layer: int, slots: torch.Tensor, scores: torch.Tensor) -> None:
        """Record the surrogate's log-scores ``[n, H]`` of layer ``layer`` for ``slots`` ``[n]`` (slot 0 ignored)."""
        self._check_layer(layer)
        slots = self._slots(slots)
        self._store_scores(layer, slots, scores.reshape(slots.numel(), self.config.num_kv_heads))

    def _store_scores(self, layer: int, slots: torch.Tensor, scores: torch.Tensor) -> None:
        # In place on the layer's column, then slot 0 back to "no score": two ops instead of masking slot 0 out,
        # which cost ~5x more per layer on CPU (this runs on every layer of every forward).
        column = self.slot_scores[:, layer]
        column.index_copy_(0, slots, scores.to(SCORE_DTYPE))
        column[0] = float("nan")

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense view of layer ``layer`` for ``slots`` ``[n]``: ``k, v`` ``[n, H, d]`` (zeros where no cell) and
        ``held`` bool ``[n, H]``. For tests and debugging; attention uses ``layout.build_layout``."""
        self._check_layer(layer)
        cells = self.slot_to_cell[self._slots(slots), layer].to(torch.int64)  # [n, H]
        held = cells >= 0
        idx = cells.clamp_min(0)
        k = torch.where(held[..., None], self.k_cells[idx], 0)
        v = torch.where(held[..., None], self.v_cells[idx], 0)
        return k, v, held

    # ------------------------------------------------------------------ frees

    def prune(self, layer: int, slots: torch.Tensor, heads: torch.Tensor) -> int:
        """Free the cells of entries ``(slots[i], layer, heads[i])`` (``[n]`` each); returns cells freed.

        See ``prune_entries`` for the tolerance rules.
        """
        self._check_layer(layer)
        return self.prune_entries(slots, torch.full_like(slots.reshape(-1), layer), heads)

    def prune_entries(self, slots: torch.Tensor, layers: torch.Tensor, heads: torch.Tensor) -> int:
        """Free the cells of entries ``(slots[i], layers[i], heads[i])`` (``[n]`` each); returns cells freed.

        Entries already without a cell (pruned before, never written, slot 0) are skipped, and an entry listed twice
        is freed once, so a cell is never freed twice.
        """
        slots = self._slots(slots)
        layers = layers.reshape(-1).to(device=self.device, dtype=torch.int64)
        heads = heads.reshape(-1).to(device=self.device, dtype=torch.int64)
        if not slots.numel() == layers.numel() == heads.numel():
            raise ValueError(f"prune: {slots.numel()} slots, {layers.numel()} layers, {heads.numel()} heads")
        if heads.numel() and bool(((heads < 0) | (heads >= self.config.num_kv_heads)).any()):
            raise ValueError(f"head ids must be in 0..{self.config.num_kv_heads - 1}")
        if layers.numel() and bool(((layers < 0) | (layers >= self.config.num_layers)).any()):
            raise ValueError(f"layer ids must be in 0..{self.config.num_layers - 1}")
        entry = (slots * self.config.num_layers + layers) * self.config.num_kv_heads + heads
        entry = torch.unique(entry)  # an entry listed twice is freed once
        heads = entry % self.config.num_kv_heads
        layers = (entry // self.config.num_kv_heads) % self.config.num_layers
        slots = entry // (self.config.num_kv_heads * self.config.num_layers)
        cells = self.slot_to_cell[slots, layers, heads].to(torch.int64)
        held = cells >= 0
        return self.free_held_entries(slots[held], layers[held], heads[held], cells[held])

    def free_held_entries(self, slots: torch.Tensor, layers: torch.Tensor, heads: torch.Tensor,
                          cells: torch.Tensor) -> int:  # fmt: skip
        """Free distinct entries ``(slots[i], layers[i], heads[i])`` known to hold ``cells[i]`` (int64 ``[n]`` each,
        slots ``>= 1``); returns ``n``. ``prune_entries`` without the sorting that makes any list safe, for callers
        that read ``cells`` from the map themselves (``pruning.prune_decided``, once per layer of every forward).
        The allocator still refuses a cell that is not in use or listed twice, so a wrong list cannot double-free.
        """
        if cells.numel() == 0:
            return 0
        self.allocator.free(cells)
        self.slot_to_cell[slots, layers, heads] = NO_CELL
        self._count_cells(slots, torch.full_like(slots, -1))
        self.entries_pruned += cells.numel()
        return cells.numel()

    def prune_mask(self, layer: int, slots: torch.Tensor, drop: torch.Tensor) -> int:
        """Free the entries where bool ``drop`` ``[n, H]`` is True for ``slots`` ``[n]``; returns cells freed."""
        slots = self._slots(slots)
        drop = drop.reshape(slots.numel(), self.config.num_kv_heads)
        rows, heads = drop.nonzero(as_tuple=True)
        return self.prune(layer, slots[rows], heads)

    def free_slots(self, slots: torch.Tensor) -> int:
        """Free every cell the slots still hold in any layer or head (request finished or aborted, tree eviction).

        Idempotent per entry: a slot holding no cells (already freed, or fully pruned) frees nothing; catching
        double *slot* frees is the slot allocator's job. Returns the number of cells freed.
        """
        slots = self._slots(slots)
        slots = torch.unique(slots[slots != 0])
        cells = self.slot_to_cell.index_select(0, slots)  # [n, L, H]
        held = cells[cells >= 0]
        self.allocator.free(held)  # distinct by the map invariant
        self._count_cells(slots, -self.slot_cells.index_select(0, slots))
        self.owner.set(slots, 0, self.slot_cells)
        self.tenant.set(slots, 0, self.slot_cells)
        self.slot_to_cell[slots] = NO_CELL
        self.slot_scores[slots] = float("nan")
        self.slot_decided[slots] = float("nan")
        return held.numel()

    # ------------------------------------------------------------------ owner tags

    @property
    def slot_group(self) -> torch.Tensor:
        return self.owner.tag

    @property
    def group_cells(self) -> list[int]:
        return self.owner.cells

    @property
    def group_slots(self) -> list[int]:
        return self.owner.slots

    def set_group(self, slots: torch.Tensor, group: int) -> None:
        """Tag ``slots`` ``[n]`` (slot 0 ignored) with owner ``group``; their cells move between the per-owner
        counts. Tagging a slot with its current owner is a no-op."""
        self.owner.set(self._distinct_real(slots), group, self.slot_cells)

    def set_tenant(self, slots: torch.Tensor, tenant: int) -> None:
        """Tag ``slots`` ``[n]`` (slot 0 ignored) with ``tenant``: their cells count against that tenant."""
        self.tenant.set(self._distinct_real(slots), tenant, self.slot_cells)

    def _distinct_real(self, slots: torch.Tensor) -> torch.Tensor:
        slots = self._slots(slots)
        return torch.unique(slots[slots != 0])

    def _count_cells(self, slots: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``delta[i]`` cells to slot ``slots[i]`` (a slot may repeat) and to its tags' counts."""
        if slots.numel() == 0:
            return
        delta = delta.to(torch.int64)
        self.slot_cells.index_add_(0, slots, delta.to(torch.int32))
        self.owner.count(slots, delta)
        self.tenant.count(slots, delta)

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Assert the map/allocator invariant (see module docstring); O(S·L·H + N), for tests."""
        self.allocator.check_invariants()
        assert bool((self.slot_to_cell >= NO_CELL).all()), "slot_to_cell holds a value below -1"
        assert bool((self.slot_to_cell[0] == NO_CELL).all()), "padding slot 0 maps to a cell"
        mapped = self.slot_to_cell[self.slot_to_cell >= 0].to(torch.int64)
        assert bool((mapped >= 1).all()) and bool((mapped <= self.config.num_cells).all()), "map holds a bad cell id"
        refs = torch.bincount(mapped, minlength=self.config.num_cells + 1)
        assert bool((refs <= 1).all()), "a cell is referenced by two entries"
        assert torch.equal(refs.bool(), self.allocator.in_use), "map references and in-use cells differ (leak?)"
        per_slot = (self.slot_to_cell >= 0).sum(dim=(1, 2)).to(torch.int32)
        assert torch.equal(per_slot, self.slot_cells), "slot_cells differs from the map"
        self.owner.check(per_slot, "owner")
        self.tenant.check(per_slot, "tenant")

    # ------------------------------------------------------------------ helpers

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer must be in 0..{self.config.num_layers - 1}, got {layer}")

    def _slots(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        if slots.numel():
            lowest, highest = torch.aminmax(slots)  # one op: this check runs on every layer of every forward
            if int(lowest) < 0 or int(highest) > self.config.num_slots:
                raise ValueError(f"slot ids must be in 0..{self.config.num_slots}")
        return slots
