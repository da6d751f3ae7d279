"""Prefix sharing of pruned KV in the real HTTP server: KVzap with SGLang's radix cache on (issue #4).

* one document and several questions: later requests find the document in the cache (minus the window back-off),
  answer as without the cache, and the server keeps one pruned copy of the document;
* multi-turn chat keeps hitting the cache;
* the property-style stress test is in test_prefix_sharing_stress.py.
"""

from __future__ import annotations


import time

import pytest
import requests

from benchmarks.tasks import make_shared_document
from kvzap_sglang.plugin.server_process import kvzap_state, stream_chunks, wait_until_idle

pytestmark = pytest.mark.engine  # starts the real SGLang server: deselect with -m 'not engine'

LAYERS, KV_HEADS = 30, 3
CELLS_PER_TOKEN = LAYERS * KV_HEADS


def generate(url: str, ids: list[int], max_new_tokens: int, **extra) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}, **extra}
    response = requests.post(f"{url}/generate", json=body, timeout=900)
    response.raise_for_status()
    return response.json()


def flush(url: str) -> None:
    """SGLang answers 400 while a request is still leaving the scheduler (the HTTP answer can come first): retry."""
    for _ in range(100):
        response = requests.post(f"{url}/flush_cache", timeout=60)
        if response.status_code != 400:
            break
        time.sleep(0.1)
    response.raise_for_status()


def chat_ids(tokenizer, messages: list[dict], answer_prefix: str = "") -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def mlp_server(smollm2_path, server_factory):
    """The bundled MLP surrogate at its default τ (≈ 50 % of entries removed), window 128, radix cache on."""
    flags = ["--kvzap-threshold", "-4.3", "--kvzap-surrogate", "mlp", "--max-total-tokens", "16384", "--enable-metrics"]
    with server_factory(smollm2_path, flags) as url:
        yield url


def test_one_document_many_questions_shares_one_pruned_copy(mlp_server, tokenizer):
    context, samples = make_shared_document(tokenizer, 1024, 4, seed=0)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": f"{context}\n{s.question}"}], " " + s.answer_prefix)
               for s in samples]  # fmt: skip
    document = len(chat_ids(tokenizer, [{"role": "user", "content": context}])) - 6  # minus the template's tail
    uncached = []
    for sample, ids in zip(samples, prompts):
        flush(mlp_server)
        uncached.append(generate(mlp_server, ids, sample.max_new_tokens)["text"])
    flush(mlp_server)
    assert kvzap_state(mlp_server)["cells_in_use"] == 0

    outputs, cells = [], []
    for sample, ids in zip(samples, prompts):
        outputs.append(generate(mlp_server, ids, sample.max_new_tokens))
        cells.append(wait_until_idle(mlp_server)["cells_in_use"])
    cached = [out["meta_info"]["cached_tokens"] for out in outputs]
    assert cached[0] == 0
    # Back-off: at most the window (128) minus the question's own tokens is recomputed.
    assert all(c >= document - 128 for c in cached[1:]), (cached, document)
    assert all(c / document >= 0.88 for c in cached[1:]), (cached, document)
    assert [out["text"] for out in outputs] == uncached, "answers differ from the no-cache run"
    removed = outputs[0]["meta_info"]["kvzap"]["removed_fraction"]
    assert removed > 0.3
    # One pruned copy of the document: later requests add at most their own question + answer tokens.
    one_copy = cells[0]
    assert one_copy < (1 - removed + 0.05) * len(prompts[0]) * CELLS_PER_TOKEN + 160 * CELLS_PER_TOKEN
    for i in range(1, len(cells)):
        own = outputs[i]["meta_info"]["prompt_tokens"] + outputs[i]["meta_info"]["completion_tokens"] - cached[i]
        assert cells[i] - cells[i - 1] <= own * CELLS_PER_TOKEN, (i, cells)
    assert cells[-1] < 1.5 * one_copy, cells
    flush(mlp_server)
    assert kvzap_state(mlp_server)["cells_in_use"] == 0


def test_multi_turn_chat_keeps_hitting_the_cache(mlp_server, tokenizer):
    context, samples = make_shared_document(tokenizer, 400, 3, seed=1)
    flush(mlp_server)
    messages = [{"role": "system", "content": f"Answer questions about this text.\n{context}"}]
    previous = 0
    for turn, sample in enumerate(samples):
        messages.append({"role": "user", "content": sample.question})
        out = generate(mlp_server, chat_ids(tokenizer, messages), 16)
        meta = out["meta_info"]
        if turn:
            assert meta["cached_tokens"] >= 0.95 * previous, (turn, meta["cached_tokens"], previous)
        messages.append({"role": "assistant", "content": out["text"].strip()})
        previous = meta["prompt_tokens"] + meta["completion_tokens"]
    state = wait_until_idle(mlp_server)
    assert state["prefix_cache"] == "KvzapRadixCache" and state["cells_cached"] > 0


def test_a_cumulative_stream_reports_the_figures_once_on_its_last_chunk(mlp_server):
    """SGLang re-reports every accumulated customized-info key in each chunk of a cumulative stream: the chunks before
    the last carried ``"kvzap": []`` and the last a dict, a field that changed type within one response."""
    body = {"text": "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"max_new_tokens": 6, "temperature": 0}}  # fmt: skip
    chunks = stream_chunks(mlp_server, "/generate", body)
    assert len(chunks) >= 2
    assert all("kvzap" not in chunk["meta_info"] for chunk in chunks[:-1])
    figures = chunks[-1]["meta_info"]["kvzap"]
    assert set(figures) == {"removed_fraction", "cells_held", "cells_full", "tokens"}
    assert figures["tokens"] >= chunks[-1]["meta_info"]["prompt_tokens"] and figures["cells_full"] == figures["tokens"] * 90


def _gauges(url: str) -> dict[str, float]:
    lines = requests.get(f"{url}/metrics", timeout=60).text.splitlines()
    return {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith("kvzap_")}


def test_metrics_follow_the_server_with_the_radix_cache_on(mlp_server):
    """The gauges were refreshed only when slots went back to the pool; with the radix cache on, finished requests go
    to the tree, so /metrics had no kvzap_* line at all, and a flush did not refresh them either (review)."""
    body = {"text": "<|im_start|>user\nName four animals.<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}}  # fmt: skip
    assert requests.post(f"{mlp_server}/generate", json=body, timeout=300).status_code == 200
    state = wait_until_idle(mlp_server)
    gauges = _gauges(mlp_server)
    assert gauges["kvzap_cells_in_use"] == state["cells_in_use"] > 0  # the cached prefixes
    assert gauges["kvzap_requests_finished"] == state["requests_finished"] >= 1
    assert requests.post(f"{mlp_server}/flush_cache", timeout=60).status_code == 200
    deadline = time.monotonic() + 30
    while _gauges(mlp_server)["kvzap_cells_in_use"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _gauges(mlp_server)["kvzap_cells_in_use"] == 0 == kvzap_state(mlp_server)["cells_in_use"]
