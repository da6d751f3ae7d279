"""``storage.retighten``: decided entries judged again at the lowest τ' that frees what a tenant's budget needs."""

from __future__ import annotations

import pytest
import torch

from kvzap_sglang.policy import keep_mask
from kvzap_sglang.storage import CellStore, CellStoreConfig, prune_decided, retighten

L, H, D = 3, 2, 4


def decided_store(num_slots: int, tau: float, seed: int = 0) -> tuple[CellStore, torch.Tensor, torch.Tensor]:
    """A store whose ``num_slots`` slots are written with random scores and decided at ``tau``."""
    gen = torch.Generator().manual_seed(seed)
    store = CellStore(CellStoreConfig(num_slots=num_slots, num_cells=num_slots * L * H, num_layers=L,
                                      num_kv_heads=H, head_dim=D))  # fmt: skip
    slots = torch.arange(1, num_slots + 1)
    scores = torch.randn(num_slots, L, H, generator=gen) * 2
    for layer in range(L):
        store.write(layer, slots, torch.randn(num_slots, H, D), torch.randn(num_slots, H, D), scores=scores[:, layer])
    store.slot_decided[slots] = tau
    prune_decided(store, None, slots, tau)
    return store, slots, scores


@pytest.mark.parametrize("needed", [1, 7, 40, 100])
def test_the_lowest_tau_that_frees_enough_is_chosen_and_equals_deciding_there_from_the_start(needed):
    store, slots, scores = decided_store(50, tau=-1.0, seed=needed)
    used_before = store.used_cells()
    tau, freed = retighten(store, slots, needed, tau_from=-1.0, tau_max=3.0)
    store.check_invariants()
    assert freed >= needed and freed == used_before - store.used_cells()
    # Minimal: one float lower would not have freed enough.
    lower = torch.nextafter(torch.tensor(tau, dtype=torch.float32), torch.tensor(-float("inf"))).item()
    assert int(((scores >= -1.0) & (scores < lower)).sum()) < needed
    # The held entries are exactly the DMS rule's at τ' (window 0: every slot decided).
    held = (store.slot_to_cell[slots] >= 0).permute(1, 2, 0)
    assert torch.equal(held, keep_mask(scores.permute(1, 2, 0), tau, 0))
    assert torch.all(store.slot_decided[slots] == tau)


def test_falling_short_stops_at_tau_max_and_never_loosens():
    store, slots, scores = decided_store(40, tau=0.0)
    tau, freed = retighten(store, slots, 10_000, tau_from=0.0, tau_max=0.5)
    assert tau == 0.5 and freed == int(((scores >= 0.0) & (scores < 0.5)).sum())
    # Already tighter than asked: nothing moves, nothing is freed.
    tau, freed = retighten(store, slots, 5, tau_from=0.5, tau_max=0.5)
    assert (tau, freed) == (0.5, 0)
    store.check_invariants()


def test_window_slots_are_not_touched_and_bad_ranges_are_refused():
    store, slots, _ = decided_store(30, tau=-1.0)
    decided, protected = slots[:20], slots[20:]
    store.slot_decided[protected] = float("nan")  # inside a live window: the caller passes decided slots only
    cells = store.slot_to_cell[protected].clone()
    retighten(store, decided, 1_000, tau_from=-1.0, tau_max=10.0)
    assert torch.equal(store.slot_to_cell[protected], cells) and torch.isnan(store.slot_decided[protected]).all()
    assert int((store.slot_to_cell[decided] >= 0).sum()) == 0  # every score < 10 went
    with pytest.raises(ValueError, match="must not exceed"):
        retighten(store, decided, 1, tau_from=1.0, tau_max=0.0)
    assert retighten(store, torch.empty(0, dtype=torch.int64), 5, -1.0, 2.0) == (-1.0, 0)
