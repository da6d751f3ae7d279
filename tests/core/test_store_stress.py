"""Seeded random server-like workloads on a small store: invariants after every op, no leak at the end.

Each op mirrors a server event: admit a request (prefill), extend it (chunked prefill / decode) with DMS pruning,
prune arbitrary entries (incl. already pruned ones), rewrite a slot in place, finish or abort a request (its
slots go back to a slot free list and are reused by later requests). The store is small so that it runs out of
cells often: a write that raises ``OutOfCells`` must change nothing, and the request is then aborted.
An independent model (held entries per slot) is compared with the store after every op.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvzap_sglang.storage import (
    CellStore,
    CellStoreConfig,
    OutOfCells,
    build_layout,
    pad_slot_lists,
    prune_window_exits,
)

L, H, D = 4, 2, 8
NUM_SLOTS, NUM_CELLS = 160, 900
THRESHOLD, WINDOW = 0.0, 3
OPS = 1500


class Workload:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        cfg = CellStoreConfig(num_slots=NUM_SLOTS, num_cells=NUM_CELLS, num_layers=L, num_kv_heads=H, head_dim=D)
        self.store = CellStore(cfg)
        self.free_slot_ids = list(range(1, NUM_SLOTS + 1))
        self.rng.shuffle(self.free_slot_ids)
        self.requests: dict[int, list[int]] = {}  # request id -> slots by position
        self.held: dict[int, torch.Tensor] = {}  # slot -> bool [L, H], the independent model
        self.next_id = 0
        self.out_of_cells = 0

    # ---------------------------------------------------------------- ops

    def admit(self) -> None:
        n = self.rng.randint(1, 20)
        if n > len(self.free_slot_ids):
            return
        rid, self.next_id = self.next_id, self.next_id + 1
        self.requests[rid] = []
        self.extend(rid, n)

    def extend(self, rid: int, n: int) -> None:
        n = min(n, len(self.free_slot_ids))
        if n == 0:
            return
        slots = self.requests[rid]
        new = [self.free_slot_ids.pop() for _ in range(n)]
        prev = len(slots)
        slots += new
        for slot in new:
            self.held[slot] = torch.zeros(L, H, dtype=torch.bool)
        new_t = torch.tensor(new)
        for layer in range(L):
            used_before, map_before = self.store.used_cells(), self.store.slot_to_cell.clone()
            try:
                self.store.write(layer, new_t, torch.randn(n, H, D), torch.randn(n, H, D), scores=torch.randn(n, H))
            except OutOfCells:
                assert self.store.used_cells() == used_before and torch.equal(self.store.slot_to_cell, map_before)
                self.out_of_cells += 1
                self.finish(rid)  # the server would retract/abort the request
                return
            for slot in new:
                self.held[slot][layer] = True
        self.decide(rid, prev)

    def decide(self, rid: int, prev: int) -> None:
        slots = self.requests[rid]
        row = torch.tensor(slots)[None]
        layer = self.rng.choice([None, *range(L)])
        layers = range(L) if layer is None else [layer]
        # The model's expectation, from policy semantics: exits with score < τ lose their (still held) cell.
        expected = 0
        for p in range(max(prev - WINDOW, 0), max(len(slots) - WINDOW, 0)):
            for lay in layers:
                drop = (self.store.slot_scores[slots[p], lay] < THRESHOLD) & self.held[slots[p]][lay]
                expected += int(drop.sum())
                self.held[slots[p]][lay] &= ~drop
        freed = prune_window_exits(self.store, layer, row, torch.tensor([prev]), torch.tensor([len(slots)]),
                                   THRESHOLD, WINDOW)
        assert int(freed[0]) == expected

    def prune_random(self, rid: int) -> None:
        slots = self.requests[rid]
        n = self.rng.randint(1, 2 * len(slots))  # with repeats: some entries listed twice
        picks = [(self.rng.choice(slots), self.rng.randrange(L), self.rng.randrange(H)) for _ in range(n)]
        s, lay, h = (torch.tensor(x) for x in zip(*picks))
        expected = len({p for p in picks if self.held[p[0]][p[1], p[2]]})
        assert self.store.prune_entries(s, lay, h) == expected
        for slot, layer, head in picks:
            self.held[slot][layer, head] = False

    def rewrite(self, rid: int) -> None:
        """SGLang may write a slot again: every head of that layer holds a cell afterwards, none leaked."""
        slot = self.rng.choice(self.requests[rid])
        layer = self.rng.randrange(L)
        try:
            self.store.write(layer, torch.tensor([slot]), torch.randn(1, H, D), torch.randn(1, H, D))
        except OutOfCells:
            self.out_of_cells += 1
            return
        self.held[slot][layer] = True

    def finish(self, rid: int) -> None:
        slots = self.requests.pop(rid)
        expected = sum(int(self.held[s].sum()) for s in slots)
        assert self.store.free_slots(torch.tensor(slots, dtype=torch.int64)) == expected
        for slot in slots:
            del self.held[slot]
        self.free_slot_ids += slots

    # ---------------------------------------------------------------- checks

    def check(self) -> None:
        self.store.check_invariants()
        assert self.store.used_cells() == sum(int(m.sum()) for m in self.held.values())
        if self.held:
            live = torch.tensor(list(self.held))
            assert torch.equal(self.store.slot_to_cell[live] >= 0, torch.stack(list(self.held.values())))

    def check_layout(self) -> None:
        if not self.requests:
            return
        rows = list(self.requests.values())
        layer = self.rng.randrange(L)
        layout = build_layout(self.store, layer, *pad_slot_lists([torch.tensor(r) for r in rows]))
        expect = torch.stack([torch.stack([self.held[s][layer] for s in r]).sum(0) for r in rows])
        assert torch.equal(layout.kv_lens.long(), expect)

    def step(self) -> None:
        roll = self.rng.random()
        live = list(self.requests)
        if not live or roll < 0.2:
            self.admit()
        elif roll < 0.55:
            self.extend(self.rng.choice(live), self.rng.choice([1, 1, 1, 4, 9]))
        elif roll < 0.7:
            self.prune_random(self.rng.choice(live))
        elif roll < 0.8:
            self.rewrite(self.rng.choice(live))
        else:
            self.finish(self.rng.choice(live))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_keeps_invariants_and_frees_everything(seed):
    work = Workload(seed)
    for i in range(OPS):
        work.step()
        work.check()
        if i % 50 == 0:
            work.check_layout()
    assert work.out_of_cells > 0, "the workload should exercise running out of cells"
    for rid in list(work.requests):
        work.finish(rid)
    work.check()
    assert work.store.used_cells() == 0 and work.store.free_cells() == NUM_CELLS
    assert (work.store.slot_to_cell == -1).all()
    assert sorted(work.free_slot_ids) == list(range(1, NUM_SLOTS + 1))
