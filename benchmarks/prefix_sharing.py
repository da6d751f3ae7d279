"""Prefix sharing of pruned KV through the real SGLang HTTP server (issue #4). Not a test; prints tables.

One server with KVzap on (radix cache on, the default with ``--kvzap-threshold``), two workloads:

1. **One document, many questions.** A ~``--doc-tokens`` RULER-style document holding ``--questions`` needles, asked
   once per needle. First every question on an empty cache (``/flush_cache`` before each: the no-cache run),
   then all of them in a row on a shared cache. Per request: ``cached_tokens`` as a share of the document tokens,
   whether the answer equals the no-cache answer and the gold value, and the cells the server holds afterwards
   (``/server_info``) against one pruned copy of the document (cells held after the first request) and against
   ``questions`` copies.
2. **Multi-turn chat.** Each turn sends the whole conversation so far (previous answers included) plus a new
   question; per turn the share of the previous conversation found in the cache.

    .venv/bin/python -u -m benchmarks.prefix_sharing --threshold -4.3 --surrogate mlp --doc-tokens 2048 --questions 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import requests

from benchmarks.tasks import make_shared_document, string_match_all
from kvzap_sglang.models import resolve_model_path
from kvzap_sglang.plugin.server_process import kvzap_state, launched_server

SERVER_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native",
    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
    "--dtype", "bfloat16",
    "--page-size", "1", "--mem-fraction-static", "0.3", "--skip-server-warmup", "--random-seed", "0",
    "--log-level", "warning", "--host", "127.0.0.1",
]  # fmt: skip


def generate(url: str, prompt_ids: list[int], max_new_tokens: int) -> dict:
    body = {"input_ids": prompt_ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
    response = requests.post(f"{url}/generate", json=body, timeout=1800)
    response.raise_for_status()
    return response.json()


def flush(url: str) -> None:
    response = requests.post(f"{url}/flush_cache", timeout=60)
    response.raise_for_status()


def chat_ids(tokenizer, messages: list[dict], answer_prefix: str = "") -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def one_document_many_questions(url: str, tokenizer, doc_tokens: int, questions: int, seed: int) -> dict:
    context, samples = make_shared_document(tokenizer, doc_tokens, questions, seed)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": f"{context}\n{s.question}"}], " " + s.answer_prefix)
               for s in samples]  # fmt: skip
    doc_len = len(chat_ids(tokenizer, [{"role": "user", "content": context}])) - 6  # chat-template tail not shared

    uncached = []
    for sample, ids in zip(samples, prompts):
        flush(url)
        uncached.append(generate(url, ids, sample.max_new_tokens))
    flush(url)
    rows = []
    for i, (sample, ids) in enumerate(zip(samples, prompts)):
        start = time.perf_counter()
        out = generate(url, ids, sample.max_new_tokens)
        seconds = time.perf_counter() - start
        state = kvzap_state(url)
        meta = out["meta_info"]
        rows.append({
            "request": i + 1,
            "prompt_tokens": meta["prompt_tokens"],
            "cached_tokens": meta["cached_tokens"],
            "cached_share_of_document": meta["cached_tokens"] / doc_len,
            "answer": out["text"],
            "same_as_no_cache": out["text"] == uncached[i]["text"],
            "correct": string_match_all(out["text"], sample.answers),
            "correct_no_cache": string_match_all(uncached[i]["text"], sample.answers),
            "removed_fraction": meta["kvzap"]["removed_fraction"],
            "cells_in_use_after": state["cells_in_use"],
            "seconds": seconds,
        })  # fmt: skip
    one_copy = rows[0]["cells_in_use_after"]
    return {
        "document_tokens": doc_len,
        "rows": rows,
        "cells_one_pruned_copy": one_copy,
        "cells_after_all": rows[-1]["cells_in_use_after"],
    }


def multi_turn(url: str, tokenizer, turns: int, seed: int) -> list[dict]:
    context, samples = make_shared_document(tokenizer, 512, turns, seed + 1)
    flush(url)
    messages = [{"role": "system", "content": f"Answer questions about this text.\n{context}"}]
    rows, previous_len = [], 0
    for turn, sample in enumerate(samples[:turns]):
        messages.append({"role": "user", "content": sample.question})
        ids = chat_ids(tokenizer, messages)
        out = generate(url, ids, 24)
        meta = out["meta_info"]
        rows.append({
            "turn": turn + 1,
            "prompt_tokens": meta["prompt_tokens"],
            "previous_conversation_tokens": previous_len,
            "cached_tokens": meta["cached_tokens"],
            "cached_share_of_previous": meta["cached_tokens"] / previous_len if previous_len else None,
            "correct": string_match_all(out["text"], sample.answers),
        })  # fmt: skip
        messages.append({"role": "assistant", "content": out["text"].strip()})
        previous_len = meta["prompt_tokens"] + meta["completion_tokens"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threshold", type=float, default=-4.3)
    parser.add_argument("--surrogate", default="mlp")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_sharing.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    flags = [*SERVER_FLAGS, "--max-total-tokens", str(args.max_total_tokens), "--kvzap-threshold", str(args.threshold),
             "--kvzap-surrogate", args.surrogate, "--kvzap-window", str(args.window)]  # fmt: skip
    started = time.perf_counter()
    with launched_server(model_path, flags) as url:
        shared = one_document_many_questions(url, tokenizer, args.doc_tokens, args.questions, args.seed)
        turns = multi_turn(url, tokenizer, args.turns, args.seed)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "one_document": shared,
              "multi_turn": turns, "wall_s": time.perf_counter() - started}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result)


def print_report(result: dict) -> None:
    shared = result["one_document"]
    print(f"\nOne document ({shared['document_tokens']} tokens), {len(shared['rows'])} questions, KVzap "
          f"τ={result['settings']['threshold']} {result['settings']['surrogate']}:")  # fmt: skip
    print(f"{'req':>3} {'prompt':>6} {'cached':>6} {'cached/doc':>10} {'=no-cache':>9} {'correct':>7} {'cells in use':>12}")
    for r in shared["rows"]:
        print(f"{r['request']:>3} {r['prompt_tokens']:>6} {r['cached_tokens']:>6} {r['cached_share_of_document']:>10.1%} "
              f"{str(r['same_as_no_cache']):>9} {r['correct']:>7.0f} {r['cells_in_use_after']:>12}")  # fmt: skip
    print(f"cells after 1 request (one pruned copy): {shared['cells_one_pruned_copy']}; after all: "
          f"{shared['cells_after_all']} ({shared['cells_after_all'] / shared['cells_one_pruned_copy']:.2f}x one copy, "
          f"unshared would be ~{len(shared['rows'])}x)")  # fmt: skip
    print("\nMulti-turn chat:")
    for r in result["multi_turn"]:
        share = "-" if r["cached_share_of_previous"] is None else f"{r['cached_share_of_previous']:.1%}"
        print(f"turn {r['turn']}: prompt {r['prompt_tokens']}, cached {r['cached_tokens']} ({share} of the previous "
              f"conversation), correct {r['correct']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
