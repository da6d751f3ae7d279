"""FlashInfer path over the pruned store (issue #7): plan arguments on CPU, real kernels on CUDA.

CPU (always runs): the arguments ``flashinfer_attention`` hands to FlashInfer's ``plan`` (indptr, indices,
last_page_len, qo_indptr, head folding) are checked against the layout and the store, and then fed — through
``paged_kv_cache`` and the folded queries the executor passes to ``run`` — to a torch emulation of FlashInfer's
documented semantics (page size 1, ``get_length`` of an empty sequence is 0, causal mask aligned with the end of the
KV list, GQA head ``j`` → KV head ``j // G``, LSE merge): the result must equal ``attention.attend`` (fp32, 1e-5).

CUDA (one test, skipped without a CUDA device — a skip is not a pass): the same scenarios through the real FlashInfer
kernels against ``attend`` on the same device in bf16. ``bash scripts/gpu/check.sh`` runs it on a GPU machine.

Scenarios: random pruned prefixes, a prefix head emptied, window-only heads, a request without prefix, a batch whose
whole prefix is pruned, chunked prefill then decode with pruning between steps, and a decode batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_sglang.storage import CellStore, CellStoreConfig, QueryLayout, attend, build_layout, fold_queries, pad_slot_lists
from kvzap_sglang.storage import flashinfer_attention as fia

LAYERS, H, G, D = 2, 3, 3, 64  # SmolLM2's attention shape: 9 query heads over 3 KV heads, head_dim 64
LAYER = 1  # checked layer; layer 0 is pruned with the complementary pattern to catch layer mix-ups
FP32_TOL, BF16_TOL = 1e-5, 1e-2
WINDOW = 4


class Requests:
    """Requests written into a store, token by token slots handed out in shuffled order."""

    def __init__(self, device, dtype, seed: int, num_slots: int = 400) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype = torch.device(device), dtype
        config = CellStoreConfig(num_slots=num_slots, num_cells=num_slots * LAYERS * H, num_layers=LAYERS,
                                 num_kv_heads=H, head_dim=D, dtype=dtype, device=device)  # fmt: skip
        self.store = CellStore(config)
        self.free = (torch.randperm(num_slots, generator=self.gen) + 1).tolist()
        self.slots: list[torch.Tensor] = []
        self.last_new: list[torch.Tensor] = []

    def add(self) -> int:
        self.slots.append(torch.zeros(0, dtype=torch.int64))
        self.last_new.append(torch.zeros(0, dtype=torch.int64))
        return len(self.slots) - 1

    def grow(self, req: int, n: int) -> None:
        new = torch.tensor([self.free.pop() for _ in range(n)], dtype=torch.int64)
        for layer in range(LAYERS):
            k, v = (torch.randn(n, H, D, generator=self.gen).to(self.device) for _ in range(2))
            self.store.write(layer, new.to(self.device), k, v)
        self.slots[req] = torch.cat([self.slots[req], new])
        self.last_new[req] = new

    def prune(self, req: int, drop: torch.Tensor) -> None:
        """Drop entries ``drop`` ``[H, T]`` of LAYER (the complement in layer 0)."""
        slots = self.slots[req].to(self.device)
        self.store.prune_mask(LAYER, slots, drop.T.to(self.device))
        self.store.prune_mask(0, slots, (~drop).T.to(self.device))

    def prune_prefix(self, req: int, how: str) -> None:
        n = self.slots[req].numel()
        drop = torch.rand(H, n, generator=self.gen) < 0.6
        if how == "empty-head":
            drop[2] = True
        elif how in ("window-only", "all"):
            drop[:] = True
            if how == "window-only":
                drop[:, -WINDOW:] = False
        elif how == "none":
            drop[:] = False
        self.prune(req, drop)

    def scenario(self, name: str, extend_lens: list[int]) -> dict:
        """Everything one forward's attention needs; the last ``extend_lens[b]`` tokens of request ``b`` are new."""
        token_slots, seq_lens = pad_slot_lists(self.slots)
        token_slots, seq_lens = token_slots.to(self.device), seq_lens.to(self.device)
        extend = torch.tensor(extend_lens, device=self.device)
        queries = QueryLayout.for_extend(seq_lens, extend)
        q = torch.randn(sum(extend_lens), H * G, D, generator=self.gen).to(self.device, self.dtype)
        new_slots = torch.cat([s[-n:] for s, n in zip(self.slots, extend_lens)]).to(self.device)
        k_new, v_new, held = self.store.read(LAYER, new_slots)
        assert bool(held.all()), "new tokens must hold their cells (they are pruned after attention)"
        return {
            "name": name, "token_slots": token_slots, "seq_lens": seq_lens, "extend_lens": extend,
            "queries": queries, "q": q, "k_new": k_new, "v_new": v_new,
        }  # fmt: skip


def scenarios(device, dtype):
    """Yield ``(requests, scenario)``; a scenario is attended before the requests change again."""
    mixed = Requests(device, dtype, seed=1)
    for prefix, new, how in ((24, 5, "random"), (10, 3, "empty-head"), (30, 1, "window-only"), (0, 7, "none")):
        req = mixed.add()
        if prefix:
            mixed.grow(req, prefix)
            mixed.prune_prefix(req, how)
        mixed.grow(req, new)
    yield mixed, mixed.scenario("extend: random / empty head / window-only / no prefix", [5, 3, 1, 7])

    gone = Requests(device, dtype, seed=2)
    for prefix, new in ((20, 4), (9, 2)):
        req = gone.add()
        gone.grow(req, prefix)
        gone.prune_prefix(req, "all")
        gone.grow(req, new)
    yield gone, gone.scenario("extend: every prefix entry pruned", [4, 2])

    decode = Requests(device, dtype, seed=3)
    for prefix, how in ((40, "random"), (2, "none"), (17, "empty-head"), (64, "window-only")):
        req = decode.add()
        decode.grow(req, prefix)
        decode.prune_prefix(req, how)
        decode.grow(req, 1)
    yield decode, decode.scenario("decode: random / short / empty head / window-only", [1, 1, 1, 1])

    chunked = Requests(device, dtype, seed=4)
    req = chunked.add()
    for step in (13, 9, 11, 1, 1):
        chunked.grow(req, step)
        yield chunked, chunked.scenario(f"chunked prefill then decode: +{step}", [step])
        drop = torch.rand(H, chunked.slots[req].numel(), generator=chunked.gen) < 0.5
        drop[:, -WINDOW:] = False
        chunked.prune(req, drop)


def layouts(requests: Requests, sc: dict):
    """(layout over seq_lens, layout over the cached prefix only) of LAYER."""
    full = build_layout(requests.store, LAYER, sc["token_slots"], sc["seq_lens"])
    prefix = build_layout(requests.store, LAYER, sc["token_slots"], sc["seq_lens"] - sc["extend_lens"])
    return full, prefix


def reference(requests: Requests, sc: dict) -> torch.Tensor:
    full, _ = layouts(requests, sc)
    return attend(sc["q"], requests.store.k_cells, requests.store.v_cells, full, sc["queries"]).float()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ plan arguments (CPU)


def test_decode_plan_args_are_the_layout_with_heads_folded_into_the_batch():
    requests = Requests("cpu", torch.float32, seed=5)
    for n in (12, 1, 30):
        req = requests.add()
        requests.grow(req, n)
        requests.prune_prefix(req, "random")
    token_slots, seq_lens = pad_slot_lists(requests.slots)
    layout = build_layout(requests.store, LAYER, token_slots, seq_lens)
    args = fia.decode_plan_args(layout, G, D)
    assert set(args) == {"indptr", "indices", "last_page_len", "num_qo_heads", "num_kv_heads", "head_dim", "page_size"}
    assert (args["num_qo_heads"], args["num_kv_heads"], args["head_dim"], args["page_size"]) == (G, 1, D, 1)
    assert args["indptr"].dtype == args["indices"].dtype == args["last_page_len"].dtype == torch.int32
    assert args["last_page_len"].tolist() == [1] * (3 * H)
    for b, slots in enumerate(requests.slots):
        for h in range(H):
            s = b * H + h  # sequence of (request b, KV head h)
            cells = requests.store.slot_to_cell[slots, LAYER, h]
            expect = cells[cells >= 0].tolist()  # kept cells in position order
            assert args["indices"][int(args["indptr"][s]) : int(args["indptr"][s + 1])].tolist() == expect
    k_pages, v_pages = fia.paged_kv_cache(requests.store.k_cells, requests.store.v_cells)
    assert k_pages.shape == (requests.store.config.num_cells + 1, 1, 1, D)  # [pages, page_size, kv_heads, d]
    assert k_pages.data_ptr() == requests.store.k_cells.data_ptr() and v_pages.data_ptr() == requests.store.v_cells.data_ptr()


def test_prefill_plan_args_fold_queries_per_request_and_head():
    requests = Requests("cpu", torch.float32, seed=6)
    for prefix, new in ((10, 4), (0, 2), (7, 1)):
        req = requests.add()
        if prefix:
            requests.grow(req, prefix)
        requests.grow(req, new)
    sc = requests.scenario("fold", [4, 2, 1])
    full, _ = layouts(requests, sc)
    folded = fold_queries(sc["q"], sc["queries"], H)
    args = fia.paged_prefill_plan_args(full, folded, G, D, causal=True)
    assert args["causal"] is True and args["qo_indptr"].dtype == torch.int32
    assert args["qo_indptr"].tolist() == [0, 4, 8, 12, 14, 16, 18, 19, 20, 21]  # n_b rows for each of b's H heads
    assert args["paged_kv_indptr"] is full.kv_indptr and args["paged_kv_indices"] is full.kv_indices
    token_start = [0, 4, 6]
    for b, n in enumerate((4, 2, 1)):
        for h in range(H):
            s = b * H + h
            rows = folded.q[int(args["qo_indptr"][s]) : int(args["qo_indptr"][s + 1])]
            torch.testing.assert_close(rows, sc["q"][token_start[b] : token_start[b] + n, h * G : (h + 1) * G])
    ragged = fia.ragged_plan_args(sc["queries"], H * G, H, D)
    assert ragged["qo_indptr"].tolist() == ragged["kv_indptr"].tolist() == [0, 4, 6, 7]
    assert (ragged["num_qo_heads"], ragged["num_kv_heads"], ragged["causal"]) == (H * G, H, True)
    with pytest.raises(ValueError, match="query sequences"):
        fia.paged_prefill_plan_args(full, fold_queries(sc["q"][:4], QueryLayout.for_decode(sc["seq_lens"][:1].repeat(4)), H), G, D, True)


def test_new_tokens_are_tails_holds_after_writing_and_fails_when_a_new_token_is_pruned():
    requests = Requests("cpu", torch.float32, seed=7)
    req = requests.add()
    requests.grow(req, 15)
    requests.prune_prefix(req, "random")
    requests.grow(req, 5)
    sc = requests.scenario("tails", [5])
    full, _ = layouts(requests, sc)
    assert fia.new_tokens_are_tails(full, fold_queries(sc["q"], sc["queries"], H), sc["queries"])
    drop = torch.zeros(H, 20, dtype=torch.bool)
    drop[1, 17] = True  # one new token of head 1 gone: end alignment would shift head 1's causal mask
    requests.store.prune_mask(LAYER, requests.slots[req], drop.T)
    full, _ = layouts(requests, sc)
    assert not fia.new_tokens_are_tails(full, fold_queries(sc["q"], sc["queries"], H), sc["queries"])


def test_missing_flashinfer_is_a_clear_error(monkeypatch):
    # Injected failure: sys.modules entry None makes `import flashinfer` raise ImportError, installed or not.
    monkeypatch.setitem(__import__("sys").modules, "flashinfer", None)
    with pytest.raises(fia.FlashInferUnavailable, match="scripts/gpu/README.md"):
        fia.FlashInferCellAttention("cuda")


def test_plugin_register_serves_kvzap_with_flashinfer_on_cuda_and_torch_elsewhere(monkeypatch):
    """The adapter's registration (SGLang imported here only; registries restored after the test)."""
    pytest.importorskip("sglang", reason="the SGLang adapter needs the sglang extra")
    from sglang.srt.arg_groups import choices
    from sglang.srt.layers.attention import attention_registry

    from kvzap_sglang.plugin import flashinfer_backend as plugin
    from kvzap_sglang.plugin.attention_backend import create_kvzap_torch_backend

    monkeypatch.setattr(attention_registry, "ATTENTION_BACKENDS", dict(attention_registry.ATTENTION_BACKENDS))
    monkeypatch.setattr(choices, "ATTENTION_BACKEND_CHOICES", list(choices.ATTENTION_BACKEND_CHOICES))
    plugin.register()
    plugin.register()  # idempotent
    assert choices.ATTENTION_BACKEND_CHOICES.count("kvzap_flashinfer") == 1
    assert attention_registry.ATTENTION_BACKENDS["kvzap_flashinfer"] is plugin.create_kvzap_flashinfer_backend
    assert attention_registry.ATTENTION_BACKENDS["torch_native"] is plugin.create_kvzap_backend
    assert plugin.backend_factory_for("cuda") is plugin.create_kvzap_flashinfer_backend
    assert plugin.backend_factory_for(torch.device("cuda", 0)) is plugin.create_kvzap_flashinfer_backend
    assert plugin.backend_factory_for("cpu") is create_kvzap_torch_backend


# ------------------------------------------------------------------- FlashInfer semantics emulated in torch (CPU)


def _softmax_attention(q, k, v, mask, scale):
    """q [n, G, d], k/v [m, d], mask [n, m] → out [n, G, d], lse [n, G] (zeros and −inf without any key)."""
    scores = torch.einsum("ngd,md->ngm", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("ngm,md->ngd", torch.exp(scores - lse[..., None]).nan_to_num(0.0), v.float()), lse


def _emulate_paged(q_folded, qo_indptr, kv_indptr, indices, last_page_len, page_size, pages, causal, scale):
    """BatchPrefill/DecodeWithPagedKVCache for ``num_kv_heads = 1``, from the plan arguments only."""
    k_pages, v_pages = pages
    outs, lses = [], []
    for s in range(kv_indptr.numel() - 1):
        seq_pages = indices[int(kv_indptr[s]) : int(kv_indptr[s + 1])].long()
        n_pages = seq_pages.numel()
        kv_len = 0 if n_pages == 0 else (n_pages - 1) * page_size + int(last_page_len[s])  # paged_kv_t::get_length
        entry = torch.arange(kv_len)
        page, slot = seq_pages[entry // page_size], entry % page_size
        k, v = k_pages[page, slot, 0], v_pages[page, slot, 0]
        q = q_folded[int(qo_indptr[s]) : int(qo_indptr[s + 1])]
        n = q.shape[0]
        visible = torch.ones(n, kv_len, dtype=torch.bool)
        if causal:  # aligned with the end of the KV list
            visible = entry[None, :] <= (kv_len - n + torch.arange(n))[:, None]
        out, lse = _softmax_attention(q, k, v, visible, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _emulate_ragged(q, k, v, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, causal, scale):
    """BatchPrefillWithRaggedKVCache: per request, query head j reads KV head j // (H_q / H)."""
    group = num_qo_heads // num_kv_heads
    outs, lses = [], []
    for b in range(qo_indptr.numel() - 1):
        rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
        keys = slice(int(kv_indptr[b]), int(kv_indptr[b + 1]))
        n, m = rows.stop - rows.start, keys.stop - keys.start
        visible = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None] if causal else torch.ones(n, m, dtype=torch.bool)
        per_head = [_softmax_attention(q[rows, j : j + 1], k[keys, j // group], v[keys, j // group], visible, scale)
                    for j in range(num_qo_heads)]  # fmt: skip
        outs.append(torch.cat([o for o, _ in per_head], dim=1))
        lses.append(torch.cat([lse for _, lse in per_head], dim=1))
    return torch.cat(outs), torch.cat(lses)


def _merge_state(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return out_a * wa + out_b * wb


def test_plan_arguments_under_flashinfer_semantics_equal_attend():
    """Decode, paged-causal extend and ragged ⊕ paged-prefix, each computed from exactly what the executor passes."""
    scale = 1 / math.sqrt(D)
    checked = 0
    for requests, sc in scenarios("cpu", torch.float32):
        ref = reference(requests, sc)
        full, prefix = layouts(requests, sc)
        pages = fia.paged_kv_cache(requests.store.k_cells, requests.store.v_cells)
        q, queries, num_tokens = sc["q"], sc["queries"], sc["q"].shape[0]
        folded = fold_queries(q, queries, H)

        assert fia.new_tokens_are_tails(full, folded, queries), sc["name"]
        a = fia.paged_prefill_plan_args(full, folded, G, D, causal=True)
        out, _ = _emulate_paged(folded.q, a["qo_indptr"], a["paged_kv_indptr"], a["paged_kv_indices"],
                                a["paged_kv_last_page_len"], a["page_size"], pages, a["causal"], scale)  # fmt: skip
        assert rel_err(folded.unfold(out, num_tokens), ref) < FP32_TOL, ("extend", sc["name"])

        r = fia.ragged_plan_args(queries, H * G, H, D)
        new_out, new_lse = _emulate_ragged(q, sc["k_new"], sc["v_new"], r["qo_indptr"], r["kv_indptr"],
                                           r["num_qo_heads"], r["num_kv_heads"], r["causal"], scale)  # fmt: skip
        p = fia.paged_prefill_plan_args(prefix, folded, G, D, causal=False)
        pre_out, pre_lse = _emulate_paged(folded.q, p["qo_indptr"], p["paged_kv_indptr"], p["paged_kv_indices"],
                                          p["paged_kv_last_page_len"], p["page_size"], pages, p["causal"], scale)  # fmt: skip
        pre_out = folded.unfold(pre_out, num_tokens)
        pre_lse = folded.unfold(pre_lse.unsqueeze(-1), num_tokens).squeeze(-1)
        assert rel_err(_merge_state(pre_out, pre_lse, new_out, new_lse), ref) < FP32_TOL, ("ragged", sc["name"])

        if bool((sc["extend_lens"] == 1).all()):
            d = fia.decode_plan_args(full, G, D)
            decode_q = q.reshape(-1, G, D)  # the executor's decode folding: a plain view
            out, _ = _emulate_paged(decode_q, torch.arange(decode_q.shape[0] + 1), d["indptr"], d["indices"],
                                    d["last_page_len"], d["page_size"], pages, False, scale)  # fmt: skip
            assert rel_err(out.view(num_tokens, H * G, D), ref) < FP32_TOL, ("decode", sc["name"])
        checked += 1
    assert checked == 8


# ------------------------------------------------------------------------------ the real kernels (CUDA only)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run scripts/gpu/check.sh on a GPU)")
def test_flashinfer_kernels_match_attend_on_cuda():
    """bf16 FlashInfer (decode, paged-causal extend, ragged ⊕ paged prefix) vs ``attend`` on the same device."""
    attention = fia.FlashInferCellAttention("cuda", measure=True)
    rows = []
    for requests, sc in scenarios("cuda", torch.bfloat16):
        ref = reference(requests, sc)
        full, prefix = layouts(requests, sc)
        store = requests.store
        got = {
            "extend": attention.extend(sc["q"], store.k_cells, store.v_cells, full, sc["queries"]),
            "ragged": attention.extend_ragged(sc["q"], sc["k_new"], sc["v_new"], store.k_cells, store.v_cells,
                                              prefix, sc["queries"]),
        }  # fmt: skip
        if bool((sc["extend_lens"] == 1).all()):
            got["decode"] = attention.decode(sc["q"], store.k_cells, store.v_cells, full)
        for path, out in got.items():
            assert out.dtype == torch.bfloat16 and out.shape == sc["q"].shape
            rows.append((sc["name"], path, rel_err(out, ref)))
    print(f"\n{'scenario':58s} {'path':7s} rel. error vs attend (bf16)")
    for name, path, err in rows:
        print(f"{name:58s} {path:7s} {err:.2e}")
    t = attention.times
    print(f"plan: {t.plans} calls {1e6 * t.plan_s / max(t.plans, 1):.0f} us/call; "
          f"run: {t.runs} calls {1e6 * t.run_s / max(t.runs, 1):.0f} us/call")  # fmt: skip
    bad = [row for row in rows if not (math.isfinite(row[2]) and row[2] < BF16_TOL)]  # NaN fails too
    assert not bad, f"relative error not below {BF16_TOL}: {bad}"
