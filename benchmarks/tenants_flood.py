"""Two tenants with KV budgets 2:1, both flooding the real SGLang server (issue #8). Not a test; prints a table.

One server with KVzap and ``--kvzap-tenants`` (tenant ``big``: budget 2B, tenant ``small``: budget B, in
token-equivalents of cells). A sampler reads every tenant's held cells, queue and τ from ``/server_info`` every
0.2 s all along. Each round runs three phases, in an order that rotates from round to round:

* ``alone`` — ``big``'s ``--clients`` closed-loop clients send ``--requests`` requests, ``small`` is idle;
* ``steady`` — the same, while ``small`` runs as many closed-loop clients as its budget admits at once (measured
  before the rounds: the mean of ``small``'s running requests over ``--probe-s`` seconds of flooding alone; pruned
  requests hold less than their worst case, so a budget admits more of them than ``budget / worst case``);
* ``flood`` — the same, while ``small`` floods with ``--flood-clients`` clients (most of them wait in its queue).

``flood / steady`` is what ``small``'s *queueing* costs ``big``: both phases give ``small`` about the same number of
running requests (reported per phase), so a ratio at 1 within the round-to-round spread means a queued burst does
not slow the other tenant. ``steady / alone`` is the compute ``small``'s admitted requests take on a CPU, which the budget bounds.
Also reported: the largest held/budget ratio of each tenant over all samples (must stay <= 1) and the requests each
tenant finished in every phase (both make progress). ``--small-range LO HI`` gives ``small`` the
tighten-before-queueing policy (``threshold_range``): its τ in use, removed fraction and finished requests show
what the policy buys.

    .venv/bin/python -u -m benchmarks.tenants_flood --budget-tokens 600 --rounds 3
    .venv/bin/python -u -m benchmarks.tenants_flood --budget-tokens 600 --rounds 3 --small-range -4.3 -1.0 \
        --out benchmarks/results/tenants_flood_tighten.json
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.prefix_sharing import SERVER_FLAGS
from kvzap_sglang.models import resolve_model_path
from kvzap_sglang.plugin.server_process import kvzap_state, launched_server

KEYS = {"big": "bench-big-key-1", "small": "bench-small-key-1"}
ADMIN_KEY = secrets.token_urlsafe(16)  # --admin-api-key: required with tenants, and it unlocks per-tenant figures
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
PHASES = ("alone", "steady", "flood")


def request(url: str, tenant: str, rng: random.Random, args) -> tuple[float, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
    body = {"text": f"<|im_start|>user\n{text}\nSummarise.<|im_end|>\n",
            "sampling_params": {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}}  # fmt: skip
    start = time.perf_counter()
    response = requests.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                             timeout=1800)  # fmt: skip
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["meta_info"]


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
            latency, _ = request(url, tenant, rng, args)
            with lock:
                latencies.append(latency)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies, time.perf_counter() - start


def tenant_state(url: str) -> dict:
    return kvzap_state(url, api_key=ADMIN_KEY)["tenants"]


def run_phase(url: str, phase: str, small_clients: int, seed: int, args, now: dict) -> dict:
    """``big``'s fixed workload, with ``small`` idle, steady at its budget, or flooding (``now["phase"]`` tags the
    sampler's samples)."""
    stop, background = threading.Event(), {}
    now["phase"] = phase
    small = None
    if phase != "alone":
        clients = small_clients if phase == "steady" else args.flood_clients
        small = threading.Thread(target=lambda: background.update(
            zip(("latencies", "wall"), run_clients(url, "small", clients, 0, seed + 1, args, stop))))  # fmt: skip
        small.start()
        time.sleep(args.settle_s)  # small's requests are admitted (and, flooding, its queue fills) first
    latencies, wall = run_clients(url, "big", args.clients, args.requests, seed, args)
    now["phase"] = None
    stop.set()
    if small is not None:
        small.join()
    return {"phase": phase, "big_requests": len(latencies), "big_wall_s": wall,
            "big_throughput_rps": len(latencies) / wall, "big_mean_latency_s": statistics.mean(latencies),
            "small_finished": len(background.get("latencies", []))}  # fmt: skip


def write_tenants_file(args) -> Path:
    small_range = "" if args.small_range is None else f"threshold_range = [{args.small_range[0]}, {args.small_range[1]}]\n"
    path = Path(tempfile.mkdtemp(prefix="kvzap-tenants-")) / "tenants.toml"
    path.write_text(f'[tenants.big]\napi_key = "{KEYS["big"]}"\nkv_budget_tokens = {2 * args.budget_tokens}\n'
                    f'[tenants.small]\napi_key = "{KEYS["small"]}"\nkv_budget_tokens = {args.budget_tokens}\n'
                    f"{small_range}")  # fmt: skip
    return path


def probe_small_concurrency(url: str, args) -> float:
    """Mean running requests of ``small`` flooding alone for ``--probe-s`` s (after its queue fills)."""
    stop, seen = threading.Event(), []
    flooder = threading.Thread(target=run_clients, args=(url, "small", args.flood_clients, 0, 99, args, stop))
    flooder.start()
    time.sleep(args.settle_s)
    deadline = time.monotonic() + args.probe_s
    while time.monotonic() < deadline:
        seen.append(tenant_state(url)["small"]["running_requests"])
        time.sleep(0.2)
    stop.set()
    flooder.join()
    return statistics.mean(seen)


def summarise(rounds: list[dict], samples: list[dict], small_clients: int, args) -> dict:
    by_phase = {p: [r for r in rounds if r["phase"] == p] for p in PHASES}
    small_running = {p: statistics.mean([s["small"]["running_requests"] for s in samples if s["phase"] == p] or [0])
                     for p in PHASES}  # fmt: skip
    per_round = {}
    for ratio, (num, den) in {"flood_over_steady": ("flood", "steady"), "steady_over_alone": ("steady", "alone"),
                              "flood_over_alone": ("flood", "alone")}.items():  # fmt: skip
        pairs = list(zip(by_phase[num], by_phase[den]))
        per_round[f"big_throughput_{ratio}"] = [a["big_throughput_rps"] / b["big_throughput_rps"] for a, b in pairs]
        per_round[f"big_latency_{ratio}"] = [a["big_mean_latency_s"] / b["big_mean_latency_s"] for a, b in pairs]
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "small_clients_at_budget": small_clients,
        "samples": len(samples),
        "peak_held_over_budget": {t: max(s[t]["cells_held"] / s[t]["budget_cells"] for s in samples)
                                  for t in ("big", "small")},  # fmt: skip
        "samples_over_budget": {t: sum(s[t]["cells_held"] > s[t]["budget_cells"] for s in samples)
                                for t in ("big", "small")},  # fmt: skip
        "peak_queued": {t: max(s[t]["queued_requests"] for s in samples) for t in ("big", "small")},
        "small_threshold_in_use": {"min": min(s["small"]["threshold"] for s in samples),
                                   "max": max(s["small"]["threshold"] for s in samples)},  # fmt: skip
        "final": samples[-1] if samples else {},
        "rounds": rounds,
        "ratios_per_round": per_round,
        "ratios_median": {k: statistics.median(v) for k, v in per_round.items() if v},
        "small_finished_median": {p: statistics.median(r["small_finished"] for r in by_phase[p]) for p in PHASES},
        "small_running_mean": small_running,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threshold", type=float, default=-4.3)
    parser.add_argument("--surrogate", default="mlp")
    parser.add_argument("--budget-tokens", type=int, default=600, help="small's budget B; big gets 2B")
    parser.add_argument("--clients", type=int, default=4, help="big's closed-loop clients")
    parser.add_argument("--flood-clients", type=int, default=12, help="small's clients while flooding")
    parser.add_argument("--requests", type=int, default=24, help="big's requests per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--probe-s", type=float, default=20.0, help="how long small floods alone to size 'steady'")
    parser.add_argument("--small-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="small's threshold_range (tighten before queueing)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tenants_flood.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.budget_tokens < 1 or min(args.clients, args.flood_clients, args.requests) < 1:
        parser.error("--rounds, --budget-tokens, --clients, --flood-clients and --requests must be >= 1")

    flags = [*SERVER_FLAGS, "--max-total-tokens", "16384", "--kvzap-threshold", str(args.threshold),
             "--kvzap-surrogate", args.surrogate, "--kvzap-tenants", str(write_tenants_file(args)),
             "--admin-api-key", ADMIN_KEY]  # required with tenants; it also unlocks the per-tenant figures
    with launched_server(resolve_model_path(args.model), flags) as url:
        _, meta = request(url, "small", random.Random(0), args)  # warm-up
        worst_case = meta["prompt_tokens"] + args.new_tokens
        samples, sampling, now = [], threading.Event(), {"phase": "probe"}

        def sample() -> None:
            while not sampling.is_set():
                state = tenant_state(url)
                samples.append({"phase": now["phase"], **{name: state[name] for name in ("big", "small")}})
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        probed = probe_small_concurrency(url, args)
        small_clients = max(1, round(probed))
        rounds = []
        for index in range(args.rounds):
            order = PHASES[index % 3 :] + PHASES[: index % 3]
            for phase in order:
                result = run_phase(url, phase, small_clients, seed=10 * index + PHASES.index(phase), args=args, now=now)
                rounds.append({"round": index, **result})
                print(json.dumps(rounds[-1]), flush=True)
        sampling.set()
        sampler.join()
    result = summarise(rounds, samples, small_clients, args)
    result["worst_case_tokens_per_request"] = worst_case
    result["small_running_probed"] = probed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rounds", "final")}, indent=2))


if __name__ == "__main__":
    main()
