"""Heavy pruning in the real HTTP server: every KV head pruned outside a short window, so live requests and cached
prefixes hold many virtual slots and few cells, and slots — not cells — run out first.

The allocator then has the radix cache evict leaves for slots (``slot_reclaimer``) on top of SGLang's own eviction
for cells; every request must finish and, with ``KVZAP_CHECK_INVARIANTS=1``, the strict idle check (which also
recounts the cell store) must hold throughout. The exact admission arithmetic of this regime (an evictable prefix's
slots were once counted in both ``available_size`` and ``evictable_size``) is pinned down in-process by
``test_radix_cache.py::test_the_admission_figure_is_allocatable_*``: here SGLang's reservation for running decodes
absorbed that over-count, so this test passed before the fix too. Its own module, so no other server is alive while
it runs.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from kvzap_sglang.plugin.server_process import kvzap_state, wait_until_idle

pytestmark = pytest.mark.engine  # starts the real SGLang server: deselect with -m 'not engine'

REQUESTS, WINDOW, POOL_TOKENS = 96, 8, 512


@pytest.fixture(scope="module")
def slot_bound_server(smollm2_path, server_factory, head0_surrogate):
    """Scores 0, 1, 2 on the three KV heads and τ 2.5: every entry outside the 8-token window goes. A 512-token pool
    (2,048 virtual slots), chunked prefill of 64 tokens, up to 24 requests at once."""
    flags = ["--kvzap-threshold", "2.5", "--kvzap-surrogate", str(head0_surrogate), "--kvzap-window", str(WINDOW),
             "--chunked-prefill-size", "64", "--max-total-tokens", str(POOL_TOKENS), "--max-running-requests", "24"]  # fmt: skip
    with server_factory(smollm2_path, flags, deep_checks=True) as url:
        yield url


def _request(url: str, prefixes: list[list[int]], rng: random.Random) -> dict:
    ids = rng.choice(prefixes)[: rng.randint(64, 160)] + [rng.randrange(1000, 40000) for _ in range(rng.randint(1, 48))]
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": rng.randint(1, 6)}}
    response = requests.post(f"{url}/generate", json=body, timeout=900)
    response.raise_for_status()  # a scheduler killed by a failed allocation answers 5xx (or not at all)
    return response.json()["meta_info"]


def test_slot_bound_admission_never_promises_what_cannot_be_allocated(slot_bound_server):
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(160)] for _ in range(16)]
    seeds = [rng.randrange(10**9) for _ in range(REQUESTS)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        metas = list(pool.map(lambda i: _request(slot_bound_server, prefixes, random.Random(seeds[i])), range(REQUESTS)))
    assert len(metas) == REQUESTS and all(m["finish_reason"]["type"] in ("length", "stop") for m in metas)
    prompt = sum(m["prompt_tokens"] for m in metas)
    assert prompt > 4 * 4 * POOL_TOKENS, "more prompt tokens than four times the virtual slots went through"

    state = wait_until_idle(slot_bound_server)
    assert requests.get(f"{slot_bound_server}/health", timeout=60).status_code == 200, "an idle check failed"
    assert state["slot_reclaims"] > 0, "slots, not cells, ran short: the allocator had the tree evict for slots"
    assert state["cells_in_use"] == state["cells_cached"] and state["idle_checks"] > 0, state
    removed = state["entries_pruned"] / state["entries_reserved"]
    assert removed > 0.8, f"heavy pruning ({removed:.0%} of the entries written were freed)"
    print(f"{REQUESTS} requests, {prompt} prompt tokens; {removed:.1%} of entries pruned; the allocator evicted for "
          f"slots {state['slot_reclaims']} times; idle: {state['slots_cached']} slots / {state['cells_cached']} cells "
          f"cached, {state['idle_checks']} idle checks")  # fmt: skip
    requests.post(f"{slot_bound_server}/flush_cache", timeout=60).raise_for_status()
    state = kvzap_state(slot_bound_server)
    assert state["cells_in_use"] == 0 and state["slots_cached"] == 0
