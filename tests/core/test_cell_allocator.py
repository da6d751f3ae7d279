"""CellAllocator: ids 1..N, typed errors that leave the state unchanged, bitmap-checked frees."""

from __future__ import annotations

import pytest
import torch

from kvzap_sglang.storage import CellAllocator, InvalidCellFree, OutOfCells


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_alloc_hands_out_distinct_ids_from_one_and_never_zero():
    alloc = CellAllocator(10)
    got = alloc.alloc(10)
    assert sorted(got.tolist()) == list(range(1, 11))
    assert alloc.used() == 10 and alloc.available() == 0
    assert alloc.alloc(0).numel() == 0
    alloc.check_invariants()


def test_out_of_cells_is_typed_and_allocates_nothing():
    alloc = CellAllocator(5)
    alloc.alloc(3)
    with pytest.raises(OutOfCells) as err:
        alloc.alloc(3)
    assert err.value.requested == 3 and err.value.available == 2
    assert alloc.used() == 3 and alloc.available() == 2
    alloc.check_invariants()
    assert alloc.alloc(2).numel() == 2


def test_freed_cells_are_reused():
    alloc = CellAllocator(4)
    first = alloc.alloc(4)
    alloc.free(first[1:3])
    again = alloc.alloc(2)
    assert set(again.tolist()) == set(first[1:3].tolist())
    alloc.check_invariants()


@pytest.mark.parametrize(
    "bad, reason",
    [
        (ids(0), "out of range"),
        (ids(11), "out of range"),
        (ids(-1), "out of range"),
        (ids(7), "double free"),  # allocated ids are 1..6 below; 7 was never handed out
        (ids(2, 2), "repeated"),
    ],
)
def test_bad_free_raises_and_frees_nothing(bad, reason):
    alloc = CellAllocator(10)
    alloc.alloc(6)
    with pytest.raises(InvalidCellFree, match=reason):
        alloc.free(torch.cat([ids(1), bad]))  # a valid id first: it must not be freed either
    assert alloc.used() == 6
    alloc.check_invariants()


def test_double_free_across_calls_raises():
    alloc = CellAllocator(4)
    got = alloc.alloc(2)
    alloc.free(got)
    with pytest.raises(InvalidCellFree, match="double free"):
        alloc.free(got[:1])
    assert alloc.used() == 0
    alloc.check_invariants()


def test_random_alloc_free_cycles_keep_the_partition():
    gen = torch.Generator().manual_seed(0)
    alloc = CellAllocator(200)
    held: list[int] = []
    for _ in range(300):
        if held and torch.rand((), generator=gen) < 0.5:
            perm = torch.randperm(len(held), generator=gen)
            k = int(torch.randint(1, len(held) + 1, (), generator=gen))
            gone = [held[i] for i in perm[:k].tolist()]
            alloc.free(torch.tensor(gone))
            held = [h for h in held if h not in set(gone)]
        else:
            n = int(torch.randint(0, 40, (), generator=gen))
            if n > alloc.available():
                with pytest.raises(OutOfCells):
                    alloc.alloc(n)
            else:
                held += alloc.alloc(n).tolist()
        assert len(set(held)) == len(held) == alloc.used()
        alloc.check_invariants()
    alloc.free(torch.tensor(held, dtype=torch.int64))
    assert alloc.used() == 0 and alloc.available() == 200


def test_check_invariants_detects_corruption():
    alloc = CellAllocator(4)
    alloc.alloc(2)
    alloc.in_use[3] = True  # a free cell marked in use behind the allocator's back
    with pytest.raises(AssertionError):
        alloc.check_invariants()
