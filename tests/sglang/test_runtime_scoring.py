"""KvzapRuntime's per-layer step (score this forward's tokens, apply the DMS rule to window exits) on a real cell
store with a constant surrogate: prefill, chunked prefill and decode, with and without decode scoring."""

from __future__ import annotations

import pytest
import torch

from kvzap_sglang.plugin.runtime import BatchView, KvzapRuntime
from kvzap_sglang.plugin.settings import KVzapConfigError, KVzapSettings
from kvzap_sglang.storage import CellStore, CellStoreConfig, QueryLayout
from kvzap_sglang.surrogate import KVzapConfig, KVzapSurrogate

LAYERS, HEADS, DIM, HIDDEN = 2, 2, 4, 8


def _runtime(window: int, score_decode: bool = True) -> KvzapRuntime:
    store = CellStore(CellStoreConfig(num_slots=32, num_cells=32 * LAYERS * HEADS, num_layers=LAYERS,
                                      num_kv_heads=HEADS, head_dim=DIM))  # fmt: skip
    surrogate = KVzapSurrogate(KVzapConfig(input_dim=HIDDEN, output_dim=HEADS, n_modules=LAYERS))
    with torch.no_grad():
        for layer in surrogate.layers:
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor([0.0, 1.0]))  # head 0 below τ = 0.5, head 1 above
    settings = KVzapSettings(threshold=0.5, surrogate="linear", window=window, score_decode=score_decode)
    rt = KvzapRuntime(settings=settings, store=store, surrogate=surrogate)
    rt.track_windows(num_rows=4)
    return rt


def _forward(rt: KvzapRuntime, slots: list[int], prev_len: int, is_decode: bool = False, row: int = 1,
             written: int | None = None) -> None:  # fmt: skip
    """One forward of the request in ``row`` whose slots are ``slots`` (all positions), ``prev_len`` of them cached
    before; the first ``written`` (default ``prev_len``) of them already hold K/V (a cached prefix: fewer)."""
    written = prev_len if written is None else written
    new = torch.tensor(slots[written:])
    for layer in range(LAYERS):
        rt.store.write(layer, new, torch.zeros(len(new), HEADS, DIM), torch.zeros(len(new), HEADS, DIM))
    seq = torch.tensor([len(slots)])
    rt.begin_forward(BatchView(rows=torch.tensor([row]), token_slots=torch.tensor([slots]), seq_lens=seq,
                               prev_lens=torch.tensor([prev_len]),
                               queries=QueryLayout.for_extend(seq, seq - prev_len), out_cache_loc=new,
                               is_decode=is_decode))  # fmt: skip
    for layer in range(LAYERS):
        rt.after_attention(layer, torch.randn(len(new), HIDDEN))


def _held(rt: KvzapRuntime, slots: list[int]) -> torch.Tensor:
    """bool [positions, layers, heads]: which entries still hold a cell."""
    return rt.store.slot_to_cell[torch.tensor(slots)] >= 0


def test_prefill_frees_head0_of_every_layer_outside_the_window():
    rt = _runtime(window=2)
    slots = list(range(1, 7))
    _forward(rt, slots, prev_len=0)
    held = _held(rt, slots)
    assert not held[:4, :, 0].any() and held[4:, :, 0].all() and held[:, :, 1].all()
    assert rt.totals.entries_pruned == 4 * LAYERS
    rt.store.check_invariants()


def test_chunked_prefill_gives_the_same_decisions_as_one_prefill():
    whole, chunked = _runtime(window=2), _runtime(window=2)
    slots = list(range(1, 9))
    _forward(whole, slots, prev_len=0)
    _forward(chunked, slots[:3], prev_len=0)
    _forward(chunked, slots[:7], prev_len=3)
    _forward(chunked, slots, prev_len=7)
    assert torch.equal(_held(whole, slots), _held(chunked, slots))


def test_decode_tokens_are_scored_unless_no_decode():
    for score_decode, decode_token_kept in ((True, False), (False, True)):
        rt = _runtime(window=1, score_decode=score_decode)
        slots = [1, 2, 3]
        _forward(rt, slots, prev_len=0)
        _forward(rt, slots + [4], prev_len=3, is_decode=True)  # position 3 enters the window
        _forward(rt, slots + [4, 5], prev_len=4, is_decode=True)  # ... and leaves it
        held = _held(rt, [4])[0]
        assert bool(held[:, 0].all()) == decode_token_kept  # unscored (NaN) entries are kept
        assert bool(held[:, 1].all())


def test_a_shared_slot_is_decided_only_outside_every_live_window():
    rt = _runtime(window=2)
    prefix = [1, 2, 3, 4]
    _forward(rt, prefix + [5, 6, 7], prev_len=0, row=1)  # A: positions 0..4 leave A's window
    assert not _held(rt, prefix)[:, :, 0].any()
    rt.release_row(1, torch.tensor(prefix + [5, 6, 7]))
    rt2 = _runtime(window=2)
    _forward(rt2, prefix, prev_len=0, row=2)  # B holds the prefix, positions 2, 3 in its window
    _forward(rt2, prefix + [5, 6, 7], prev_len=4, row=1, written=4)  # A reuses it: 2, 3 leave A's window
    held = _held(rt2, prefix)[:, :, 0]
    assert not held[:2].any() and held[2:].all(), "slots in B's window stay while B is live"
    _forward(rt2, prefix + [8, 9], prev_len=4, row=2, written=4)  # B grows: 2, 3 leave B's window too
    assert not _held(rt2, prefix)[:, :, 0].any()
    for row, slots in ((1, prefix + [5, 6, 7]), (2, prefix + [8, 9])):
        rt2.release_row(row, torch.tensor(slots))
    rt2.windows.check_idle()
    rt2.store.check_invariants()


def test_a_cached_prefix_left_undecided_is_decided_by_the_next_request():
    rt = _runtime(window=3)
    _forward(rt, [1, 2, 3], prev_len=0, row=1)  # all three in the window
    rt.release_row(1, torch.tensor([1, 2, 3]))  # finished: its tail stays undecided (a prefix cache keeps it)
    assert _held(rt, [1, 2, 3]).all() and torch.isnan(rt.store.slot_decided[1:4]).all()
    _forward(rt, [1, 2, 3, 4, 5, 6], prev_len=3, row=2)  # a new request over the cached 3: they lie outside its window
    assert not _held(rt, [1, 2, 3])[:, :, 0].any()
    assert torch.equal(rt.store.slot_decided[1:4], torch.full((3,), 0.5))


def test_a_live_tau_change_reads_no_files(tmp_path):
    """``set_threshold`` (a τ from the calibration service) once rebuilt the settings with their start-up checks,
    which re-read the tenants file and looked for the surrogate folder: editing the file or moving the folder while
    the server ran stopped its scheduler at the next τ change (review). A τ that is not finite in float32 is still
    refused."""
    from dataclasses import replace

    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[tenants.acme]\nkv_budget_tokens = 64\n")
    folder = tmp_path / "surrogate"
    folder.mkdir()
    rt = _runtime(window=4)
    rt.settings = replace(rt.settings, surrogate=str(folder), tenants=str(tenants))
    tenants.write_text("[tenants.acme]\nkv_budget_tokens = 64\nkv_budget_tokens = \"lots\"\n")  # edited, now broken
    folder.rmdir()
    rt.set_threshold(-3.0)
    assert rt.settings.threshold == -3.0 and rt.settings.tenants == str(tenants)
    with pytest.raises(KVzapConfigError, match="finite float32"):
        rt.set_threshold(1e300)
    assert rt.settings.threshold == -3.0
