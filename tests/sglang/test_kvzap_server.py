"""KVzap on inside the real HTTP server (`python -m sglang.launch_server --kvzap-threshold ...`, CPU, SmolLM2).

Constant surrogate (scores 0/1/2 on KV heads 0/1/2), τ = 0.5, window 8, chunked prefill of 256 tokens: every request
longer than 8 tokens has KV head 0 freed outside its window, long prompts go through chunked prefill, and the
stress test checks that every cell comes back after ≥ 200 mixed requests including aborts. The radix cache is off
here (``--disable-radix-cache``: every cell must come back); prefix sharing is tested in test_prefix_sharing.py.
Streams are incremental here (``--incremental-streaming-output``); test_prefix_sharing.py streams cumulatively.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from kvzap_sglang.plugin.server_process import kvzap_state, stream_chunks

pytestmark = pytest.mark.engine  # starts the real SGLang engine/server: deselect with -m 'not engine'

LAYERS, KV_HEADS, WINDOW = 30, 3, 8
FILLER = "The grass is green. The sky is blue. The sun is yellow. "


@pytest.fixture(scope="module")
def server(smollm2_path, server_factory, head0_surrogate):
    flags = ["--kvzap-threshold", "0.5", "--kvzap-surrogate", str(head0_surrogate), "--kvzap-window", str(WINDOW),
             "--chunked-prefill-size", "256", "--enable-metrics", "--disable-radix-cache",
             "--incremental-streaming-output"]  # fmt: skip
    with server_factory(smollm2_path, flags) as url:
        yield url


def generate(url: str, text: str, max_new_tokens: int = 4, **extra) -> dict:
    body = {"text": text, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}, **extra}
    response = requests.post(f"{url}/generate", json=body, timeout=900)
    response.raise_for_status()
    return response.json()


def test_generate_reports_kvzap_figures_in_meta_info(server):
    out = generate(server, "<|im_start|>user\n" + FILLER * 22 + "What colour is the sun?<|im_end|>\n")
    figures = out["meta_info"]["kvzap"]
    tokens = figures["tokens"]
    assert tokens >= out["meta_info"]["prompt_tokens"] > 256  # chunked prefill
    assert figures["cells_full"] == tokens * LAYERS * KV_HEADS
    assert figures["cells_held"] == figures["cells_full"] - (tokens - WINDOW) * LAYERS
    assert figures["removed_fraction"] == pytest.approx((tokens - WINDOW) / (KV_HEADS * tokens))


def test_chat_completions_are_served(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0}  # fmt: skip
    response = requests.post(f"{server}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")


def test_incremental_streams_carry_the_figures_on_their_last_chunk_and_the_server_serves_on(server):
    """With ``--incremental-streaming-output`` SGLang slices every accumulated customized-info key per chunk; the
    figures used to sit there as a dict, so the first streamed request to finish raised in the HTTP process and
    SGLang shut the whole server down."""
    text = "<|im_start|>user\n" + FILLER * 3 + "What colour is the sun?<|im_end|>\n"
    chunks = stream_chunks(server, "/generate", {"text": text, "sampling_params": {"max_new_tokens": 6,
                                                                                  "temperature": 0}})  # fmt: skip
    assert len(chunks) >= 2
    assert all("kvzap" not in chunk["meta_info"] for chunk in chunks[:-1])
    figures = chunks[-1]["meta_info"]["kvzap"]
    assert figures["cells_full"] == figures["tokens"] * LAYERS * KV_HEADS and figures["cells_held"] > 0
    assert "".join(chunk["text"] for chunk in chunks) == generate(server, text, max_new_tokens=6)["text"]
    body = {"model": "default", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
            "temperature": 0}  # fmt: skip
    openai_chunks = stream_chunks(server, "/v1/chat/completions", body)
    assert openai_chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert requests.get(f"{server}/health", timeout=60).status_code == 200


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"return_logprob": True, "top_logprobs_num": 100000}, "top_logprobs_num (OpenAI: top_logprobs) must be in"),
        ({"return_logprob": True, "logprob_start_len": -5}, "logprob_start_len must be -1"),
    ],
    ids=["top logprobs past the vocabulary", "negative logprob start"],
)
def test_logprob_options_that_crash_sglangs_scheduler_are_a_400(server, body, reason):
    """Both kill a stock SGLang 0.5.23 scheduler (the second once the prompt's prefix is cached); the OpenAI route
    reaches the same check through ``top_logprobs``."""
    response = requests.post(f"{server}/generate", json={"text": "The capital of France is",
                                                         "sampling_params": {"max_new_tokens": 2}, **body},
                             timeout=300)  # fmt: skip
    assert response.status_code == 400 and reason in response.text, response.text
    chat = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True,
            "top_logprobs": 100000}  # fmt: skip
    response = requests.post(f"{server}/v1/chat/completions", json=chat, timeout=300)
    assert response.status_code == 400 and "top_logprobs" in response.text, response.text
    assert generate(server, "The capital of France is")["meta_info"]["completion_tokens"] == 4


def _stress_request(url: str, index: int, rng: random.Random) -> str:
    # Short prompts keep 200 requests to a couple of minutes on 2 cores; every 20th is long enough (> 256 tokens)
    # for chunked prefill; every 5th is aborted by rid (queued or decoding).
    fillers = 22 if index % 20 == 3 else rng.randint(0, 1)
    text = "<|im_start|>user\n" + FILLER * fillers + f"Request {index}: say hi.<|im_end|>\n"
    if index % 5 == 0:
        rid = f"stress-abort-{index}"
        timer = threading.Timer(rng.uniform(0.2, 1.0), requests.post, args=(f"{url}/abort_request",),
                                kwargs={"json": {"rid": rid}, "timeout": 60})  # fmt: skip
        timer.start()
        out = generate(url, text, max_new_tokens=32, rid=rid)
        timer.join()
        return out["meta_info"]["finish_reason"]["type"]
    return generate(url, text, max_new_tokens=rng.randint(1, 3))["meta_info"]["finish_reason"]["type"]


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"text": ""}, "the prompt has no tokens"),
        ({"input_ids": [1, 2, 10**9]}, "token id 1000000000, outside the model's vocabulary [0, 49152)"),
        ({"input_ids": [-5, 2]}, "token id -5, outside"),
        ({"input_ids": [[3, 4], [49152]]}, "token id 49152, outside"),  # one bad prompt of a batch
        ({"input_embeds": [[0.1] * 576, [0.1] * 5]}, "input_embeds row 1 has 5 values; the model's hidden size is 576"),
    ],
    ids=["empty text", "id past the vocabulary", "negative id", "batch", "embeddings of the wrong width"],
)
def test_prompts_that_crash_sglangs_scheduler_are_a_400_and_the_server_serves_on(server, body, reason):
    """Each of these kills a stock SGLang 0.5.23 scheduler (plugin/prompt_checks.py); here they are refused in the
    HTTP process, and the next request is served."""
    response = requests.post(f"{server}/generate", json={**body, "sampling_params": {"max_new_tokens": 2}}, timeout=300)
    assert response.status_code == 400 and reason in response.text, response.text
    assert generate(server, "The capital of France is")["meta_info"]["completion_tokens"] == 4


def test_beam_search_is_a_400_and_the_server_serves_on(server):
    """SGLang frees beam rows outside release_kv_cache, so their KVzap windows stayed referenced: the idle check then
    stopped the scheduler (a stock server serves beam search on)."""
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 2, "beam_width": 2}}
    response = requests.post(f"{server}/generate", json=body, timeout=300)
    assert response.status_code == 400 and "beam search" in response.text, response.text
    assert generate(server, "The capital of France is")["meta_info"]["completion_tokens"] == 4
    assert requests.get(f"{server}/health", timeout=60).status_code == 200


def test_prompt_embeddings_are_served(server):
    """``input_embeds`` (allowed with the radix cache off) go through KVzap's scoring like token prompts."""
    body = {"input_embeds": [[0.01 * (i % 7)] * 576 for i in range(24)], "sampling_params": {"max_new_tokens": 2}}
    response = requests.post(f"{server}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["kvzap"]["cells_full"] > 0


def test_stress_mixed_requests_with_aborts_return_every_cell(server):
    rng = random.Random(0)
    seeds = [rng.randint(0, 10**6) for _ in range(200)]
    ended_before = kvzap_state(server)["requests_finished"]
    with ThreadPoolExecutor(max_workers=32) as pool:
        reasons = list(pool.map(lambda i: _stress_request(server, i, random.Random(seeds[i])), range(200)))
    assert len(reasons) == 200
    assert reasons.count("abort") >= 10  # aborts really happened
    deadline = time.monotonic() + 60
    while (state := kvzap_state(server))["cells_in_use"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state["cells_in_use"] == 0
    # Every request counted once, however it ended: requests aborted while queued or mid-prefill end through
    # send_abort_output, outside the output stream, and went uncounted.
    assert state["requests_finished"] - ended_before == 200
    assert state["entries_pruned"] > 0
    assert requests.get(f"{server}/health", timeout=30).status_code == 200  # scheduler's idle invariant held
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    assert "kvzap_cells_in_use" in metrics
    in_use = [line for line in metrics.splitlines() if line.startswith("kvzap_cells_in_use")]
    assert in_use and float(in_use[-1].split()[-1]) == 0.0
