"""Capacity: how many concurrent ~2k-token requests the real SGLang server admits with the same KV pool, stock vs
KVzap, measured side by side in one run (issue #3). Not a test; prints a table and the ratio.

Each mode launches ``python -m sglang.launch_server`` on CPU (SmolLM2, bf16, ``--max-total-tokens POOL``, radix
cache off in both so no prefix is shared), sends N distinct RULER-style retrieval prompts at once, and reads the
scheduler's own count of running requests from its per-step log lines (``--decode-log-interval 1``): the peak
``#running-req`` is the number of requests admitted concurrently. KVzap's slots reserve all their cells when
allocated, so a request is admitted only with a full prompt's worth of free cells; the pruning of the requests
already running is what makes room.

    .venv/bin/python benchmarks/server_capacity.py --threshold -5 --surrogate mlp
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from pathlib import Path

import requests
from kvzap_sglang.plugin.server_process import launched_server_with_log

CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native",
             "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
             "--dtype", "bfloat16",
             "--page-size", "1", "--mem-fraction-static", "0.3", "--skip-server-warmup", "--random-seed", "0",
             "--disable-radix-cache", "--host", "127.0.0.1"]  # fmt: skip
RUNNING = re.compile(r"#running-req: (\d+)")


def kvzap_flags(threshold: float | None, surrogate: str, window: int) -> list[str]:
    if threshold is None:
        return []
    return ["--kvzap-threshold", str(threshold), "--kvzap-surrogate", surrogate, "--kvzap-window", str(window)]


def measure(model_path: Path, prompts: list[str], pool: int, max_new_tokens: int, extra: list[str]) -> dict:
    flags = ["--max-total-tokens", str(pool), "--decode-log-interval", "1", "--log-level", "info", *extra]
    with launched_server_with_log(model_path, [*CPU_FLAGS, *flags]) as (url, log_path):
        start_line = len(log_path.read_text().splitlines())
        results: list[dict] = [None] * len(prompts)

        def send(i: int) -> None:
            body = {"text": prompts[i], "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens,
                                                              "ignore_eos": True}}  # fmt: skip
            results[i] = requests.post(f"{url}/generate", json=body, timeout=3600).json()

        began = time.monotonic()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        lines = log_path.read_text().splitlines()[start_line:]
        running = [int(m.group(1)) for line in lines if "Decode batch" in line for m in [RUNNING.search(line)] if m]
        kvzap = [r["meta_info"].get("kvzap") for r in results]
    held = [k["cells_held"] / k["cells_full"] for k in kvzap if k]
    return {
        "peak_running": max(running, default=0),
        "elapsed_s": elapsed,
        "prompt_tokens": sum(r["meta_info"]["prompt_tokens"] for r in results) / len(results),
        "kept_fraction": sum(held) / len(held) if held else 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pool-tokens", type=int, default=10_000, help="--max-total-tokens for both servers")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=-5.0, help="τ for the KVzap server")
    parser.add_argument("--surrogate", default="mlp")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here (e.g. benchmarks/results/...)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from kvzap_sglang.models import resolve_model_path
    from kvzap_sglang.prompts import retrieval_prompt

    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [retrieval_prompt(tokenizer, args.prompt_tokens, seed=s).render_chat(tokenizer) for s in range(args.requests)]
    stock = measure(model_path, prompts, args.pool_tokens, args.max_new_tokens, [])
    kvzap = measure(model_path, prompts, args.pool_tokens, args.max_new_tokens,
                    kvzap_flags(args.threshold, args.surrogate, args.window))  # fmt: skip
    print(f"pool {args.pool_tokens} tokens, {args.requests} requests of ~{stock['prompt_tokens']:.0f} prompt tokens "
          f"+ {args.max_new_tokens} new; KVzap tau={args.threshold} surrogate={args.surrogate} window={args.window}")
    print("| server | peak concurrent requests | cells kept per finished request | wall s |")
    print("|---|---|---|---|")
    for name, row in (("stock", stock), ("KVzap", kvzap)):
        print(f"| {name} | {row['peak_running']} | {row['kept_fraction']:.3f} | {row['elapsed_s']:.0f} |")
    ratio = kvzap["peak_running"] / max(1, stock["peak_running"])
    print(f"admitted ratio KVzap / stock = {ratio:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"settings": settings, "stock": stock, "kvzap": kvzap,
                                        "admitted_ratio": ratio}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
