"""Two tenants with KV budgets 2:1, both flooding the real SGLang server (issue #8). Not a test; prints a table.

One server with KVzap and ``--kvzap-tenants`` (tenant ``big``: budget 2B, tenant ``small``: budget B, in
token-equivalents of cells). A sampler reads every tenant's held cells from ``/server_info`` all along.

1. ``big`` alone: ``--clients`` closed-loop clients send ``--requests`` requests;
2. ``big`` again, while ``small`` floods with ``--flood-clients`` clients (far more than its budget admits).

Reported: the largest held/budget ratio of each tenant over all samples (must stay <= 1), requests finished per
tenant (both make progress), and ``big``'s throughput and mean latency with ``small`` flooding over ``big`` alone.
On a CPU both tenants share the same cores, so ``big`` loses the compute ``small``'s admitted requests use; the
budget bounds that share (``small`` never runs more than its budget admits, however many requests it queues).

    .venv/bin/python -u -m benchmarks.tenants_flood --budget-tokens 600
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.prefix_sharing import SERVER_FLAGS
from kvzap_sglang.models import resolve_model_path
from kvzap_sglang.plugin.server_process import launched_server

KEYS = {"big": "bench-big-key-1", "small": "bench-small-key-1"}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def request(url: str, tenant: str, rng: random.Random, prompt_words: int, new_tokens: int) -> float:
    text = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
    body = {"text": f"<|im_start|>user\n{text}\nSummarise.<|im_end|>\n",
            "sampling_params": {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}}  # fmt: skip
    start = time.perf_counter()
    response = requests.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                             timeout=1800)  # fmt: skip
    response.raise_for_status()
    return time.perf_counter() - start


def run_clients(url: str, tenant: str, clients: int, count: int, seed: int, args, stop: threading.Event | None = None):
    """``clients`` closed-loop clients; ``count`` requests in all (or until ``stop``). Returns latencies, wall s."""
    latencies, lock, issued = [], threading.Lock(), [0]

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while stop is None or not stop.is_set():
            with lock:
                if stop is None and issued[0] >= count:
                    return
                issued[0] += 1
            latency = request(url, tenant, rng, args.prompt_words, args.new_tokens)
            with lock:
                latencies.append(latency)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threshold", type=float, default=-4.3)
    parser.add_argument("--surrogate", default="mlp")
    parser.add_argument("--budget-tokens", type=int, default=600, help="small's budget B; big gets 2B")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--flood-clients", type=int, default=12)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tenants_flood.json")
    args = parser.parse_args()

    tenants = Path(tempfile.mkdtemp(prefix="kvzap-tenants-")) / "tenants.toml"
    tenants.write_text(f'[tenants.big]\napi_key = "{KEYS["big"]}"\nkv_budget_tokens = {2 * args.budget_tokens}\n'
                       f'[tenants.small]\napi_key = "{KEYS["small"]}"\nkv_budget_tokens = {args.budget_tokens}\n')  # fmt: skip
    flags = [*SERVER_FLAGS, "--max-total-tokens", "16384", "--kvzap-threshold", str(args.threshold),
             "--kvzap-surrogate", args.surrogate, "--kvzap-tenants", str(tenants)]  # fmt: skip
    with launched_server(resolve_model_path(args.model), flags) as url:
        samples, sampling = [], threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                state = requests.get(f"{url}/server_info", timeout=60).json()["internal_states"][0]["kvzap"]["tenants"]
                samples.append({name: state[name] for name in ("big", "small")})
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        alone, alone_s = run_clients(url, "big", args.clients, args.requests, 1, args)
        flood_stop = threading.Event()
        flood_result = {}
        flooder = threading.Thread(target=lambda: flood_result.update(
            zip(("latencies", "wall"), run_clients(url, "small", args.flood_clients, 0, 2, args, flood_stop))))
        flooder.start()
        time.sleep(2.0)  # small's queue fills first
        shared, shared_s = run_clients(url, "big", args.clients, args.requests, 3, args)
        flood_stop.set()
        flooder.join()
        sampling.set()
        sampler.join()

    peak = {t: max(s[t]["cells_held"] / s[t]["budget_cells"] for s in samples) for t in ("big", "small")}
    queued = {t: max(s[t]["queued_requests"] for s in samples) for t in ("big", "small")}
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "samples": len(samples),
        "peak_held_over_budget": peak,
        "peak_queued": queued,
        "big_alone": {"requests": len(alone), "wall_s": alone_s, "mean_latency_s": statistics.mean(alone)},
        "big_with_small_flooding": {"requests": len(shared), "wall_s": shared_s,
                                    "mean_latency_s": statistics.mean(shared)},
        "small_flooding": {"requests_finished": len(flood_result.get("latencies", []))},
        "big_throughput_ratio": (len(shared) / shared_s) / (len(alone) / alone_s),
        "big_latency_ratio": statistics.mean(shared) / statistics.mean(alone),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
