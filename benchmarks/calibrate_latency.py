"""/calibrate latency (p50/p95) with 1k / 10k / 100k stored requests, against the real Redis and a real uvicorn.

Synthetic traffic: SmolLM2-shaped requests (30 layers × 3 KV heads, 200–2000 tokens, window 128) whose eligible
scores follow Normal(μ_i, 2) with μ_i ~ Normal(−6, 1); each histogram is a multinomial draw over the bin layout
(same distribution as binning real scores, without materialising them). Samples are loaded with
``SampleStore.ingest`` (the code behind POST /samples, minus HTTP) in batches of 1000; ingest throughput is printed
too. Each level adds requests to the same series, then times ``--calls`` POST /calibrate over HTTP.

    .venv/bin/python benchmarks/calibrate_latency.py [--levels 1000 10000 100000] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from statistics import NormalDist

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrator.bins import EDGES, NUM_BUCKETS  # noqa: E402
from calibrator.fit import fit_threshold  # noqa: E402
from calibrator.sample_store import SampleStore, StoreLimits  # noqa: E402
from calibrator.series import connect, delete_prefix  # noqa: E402
from calibrator.summary import ScoreSummary  # noqa: E402

REDIS_URL = os.environ.get("KVZAP_REDIS_URL", "redis://127.0.0.1:6379/0")
API_KEY = "bench-admin-key"
LAYERS, HEADS, WINDOW = 30, 3, 128


def synthetic_summaries(n: int, rng: np.random.Generator) -> list[ScoreSummary]:
    cdf = np.vectorize(NormalDist().cdf)
    out = []
    for _ in range(n):
        mu, tokens = rng.normal(-6.0, 1.0), int(rng.integers(200, 2001))
        eligible = LAYERS * HEADS * (tokens - WINDOW)
        below = np.concatenate([[0.0], cdf((EDGES - mu) / 2.0), [1.0]])  # P(s < edge), padded
        counts = rng.multinomial(eligible, np.clip(np.diff(below), 0, None) / (below[-1] - below[0]))
        (buckets,) = np.nonzero(counts)
        out.append(ScoreSummary(model="smollm2-135m", task="bench", num_layers=LAYERS, num_kv_heads=HEADS,
                                num_tokens=tokens, window=WINDOW, buckets=buckets.tolist(),
                                counts=counts[buckets].tolist()))
    assert all(len(s.buckets) <= NUM_BUCKETS for s in out)
    return out


def start_server(prefix: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "KVZAP_REDIS_URL": REDIS_URL, "KVZAP_REDIS_PREFIX": prefix,
           "KVZAP_ADMIN_API_KEYS": f'["{API_KEY}"]', "KVZAP_MAX_REQUESTS_PER_SERIES": "200000"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:app", "--port", str(port),
                               "--log-level", "warning"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError("service did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    prefix = f"kvzap-bench-{uuid.uuid4().hex[:8]}:"
    client = connect(REDIS_URL)
    store = SampleStore(client, prefix, StoreLimits(max_requests=200_000))
    rng = np.random.default_rng(0)
    server, url = start_server(prefix)
    rows, stored, gen_s, ingest_s = [], 0, 0.0, 0.0
    try:
        with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=120) as http:
            for level in sorted(args.levels):
                while stored < level:
                    n = min(1000, level - stored)
                    t0 = time.perf_counter()
                    batch = synthetic_summaries(n, rng)
                    t1 = time.perf_counter()
                    store.ingest(batch)
                    gen_s, ingest_s = gen_s + t1 - t0, ingest_s + time.perf_counter() - t1
                    stored += n
                latencies, report = [], None
                for i in range(args.calls):
                    body = {"model": "smollm2-135m", "task": "bench", "target_ratio": (0.5, 0.67, 0.75)[i % 3], "seed": i}
                    t0 = time.perf_counter()
                    response = http.post("/calibrate", json=body)
                    latencies.append(time.perf_counter() - t0)
                    assert response.status_code == 200, response.text
                    report = response.json()["report"]
                t0 = time.perf_counter()
                curves = store.curves("smollm2-135m", "bench")
                t_read = time.perf_counter() - t0
                fit_threshold(curves, 0.5)
                t_fit = time.perf_counter() - t0 - t_read
                rows.append((level, np.percentile(latencies, 50), np.percentile(latencies, 95), t_read, t_fit,
                             report["n_requests"], report["ci_high"] - report["ci_low"]))
                print(f"  {level} stored: done ({stored / ingest_s:.0f} summaries/s ingest)", flush=True)
        memory = client.info("memory")["used_memory"] / 2**20
    finally:
        server.terminate()
        server.wait(15)
        delete_prefix(client, prefix)

    print(f"\n/calibrate over HTTP (uvicorn, 1 worker), {args.calls} calls per level, bootstrap 1000 resamples")
    print(f"{'stored':>8} {'p50 ms':>8} {'p95 ms':>8} {'read ms':>8} {'fit ms':>8} {'n used':>7} {'CI width':>9}")
    for level, p50, p95, t_read, t_fit, n, width in rows:
        print(f"{level:>8} {p50 * 1e3:>8.1f} {p95 * 1e3:>8.1f} {t_read * 1e3:>8.1f} {t_fit * 1e3:>8.1f} {n:>7} {width:>9.5f}")
    print(f"\np95 at {rows[-1][0]} vs {rows[0][0]} stored: {rows[-1][2] / rows[0][2]:.1f}x for {rows[-1][0] // rows[0][0]}x more requests")
    print(f"synthetic generation {gen_s:.1f} s, ingest {ingest_s:.1f} s ({stored / ingest_s:.0f} summaries/s); "
          f"Redis used_memory at the end {memory:.0f} MiB")


if __name__ == "__main__":
    main()
