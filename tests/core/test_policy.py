"""The DMS rule: strict `<` against τ, the protected window, and the incremental form equal to the dense one."""

import pytest
import torch

from kvzap_sglang.policy import WindowedPruner, keep_mask, removed_fraction, window_exits


def test_strict_less_than_keeps_equality():
    scores = torch.tensor([-5.0, -4.0, -3.9, -4.0001])
    keep = keep_mask(scores, threshold=-4.0, window=0)
    assert keep.tolist() == [False, True, True, False]


def test_last_window_tokens_are_always_kept():
    scores = torch.full((2, 3, 10), -100.0)
    keep = keep_mask(scores, threshold=0.0, window=4)
    assert not keep[..., :6].any()
    assert keep[..., 6:].all()


def test_sequence_no_longer_than_window_is_never_pruned():
    scores = torch.full((5,), -100.0)
    assert keep_mask(scores, threshold=0.0, window=5).all()
    assert keep_mask(scores, threshold=0.0, window=128).all()
    assert not keep_mask(scores, threshold=0.0, window=4)[0]


def test_nan_scores_are_kept_and_nan_threshold_rejected():
    assert keep_mask(torch.tensor([float("nan"), -9.0]), threshold=-1.0, window=0).tolist() == [True, False]
    with pytest.raises(ValueError):
        keep_mask(torch.zeros(3), threshold=float("nan"))
    with pytest.raises(ValueError):
        keep_mask(torch.zeros(3), threshold=0.0, window=-1)


def test_window_exits():
    assert window_exits(0, 100, 128) == range(0, 0)
    assert window_exits(0, 130, 128) == range(0, 2)
    assert window_exits(130, 131, 128) == range(2, 3)
    assert window_exits(5, 5, 0) == range(5, 5)
    with pytest.raises(ValueError):
        window_exits(10, 9)
    with pytest.raises(ValueError, match="window"):
        window_exits(0, 3, -1)  # would name position 3 of a 3-token sequence


@pytest.mark.parametrize("window", [0, 1, 7, 128])
@pytest.mark.parametrize("seed", range(5))
def test_incremental_equals_dense_for_any_chunking(window, seed):
    generator = torch.Generator().manual_seed(seed)
    total = int(torch.randint(1, 400, (1,), generator=generator))
    scores = torch.randn(3, 2, total, generator=generator) * 2 - 1
    pruner = WindowedPruner(threshold=-1.0, window=window)
    decided = torch.ones(3, 2, total, dtype=torch.bool)
    seen = []
    position = 0
    while position < total:
        # Mix prefill-sized chunks and single decode steps.
        step = 1 if torch.rand(1, generator=generator) < 0.5 else int(torch.randint(1, 80, (1,), generator=generator))
        step = min(step, total - position)
        exits, keep = pruner.push(scores[..., position : position + step])
        position += step
        decided[..., exits.start : exits.stop] = keep
        seen.extend(exits)
    assert seen == list(range(max(total - window, 0))), "each token is decided exactly once, in order"
    assert torch.equal(decided, keep_mask(scores, -1.0, window))


def test_removed_fraction_counts_all_entries_including_window():
    keep = torch.ones(2, 3, 10, dtype=torch.bool)
    keep[0, 0, :5] = False
    assert removed_fraction(keep) == pytest.approx(5 / 60)
    assert removed_fraction(torch.ones(0, dtype=torch.bool)) == 0.0
