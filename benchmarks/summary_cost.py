"""Scheduler-thread cost of summarising one sampled request for the calibration service, numpy path vs torch path.

A server with ``--kvzap-redis-url`` summarises every sampled finished request on its scheduler thread (the scores
are in the cell store until ``release_kv_cache``): a histogram of the scores outside the request's window in the
calibrator's bin layout. The numpy path (``calibrator.summary.summarize`` on a ``[L, H, T]`` float copy, as the
plugin did until 2026-12-06) is timed side by side with the torch path the plugin uses now
(``plugin.calibration.bucket_counts`` + ``summary_from_counts``), on the same scores ``[T, L, H]`` as the store keeps
them (float32 holding a bf16 surrogate's outputs); both give the same counts (checked here and in ``tests/sglang/test_calibration_loop.py``).
Prints the median of ``--repeats`` runs per context length and the ratio.

    .venv/bin/python benchmarks/summary_cost.py [--tokens 1024 8192 32768] [--layers 30] [--heads 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
WINDOW = 128


def numpy_path(scores: torch.Tensor):
    from calibrator.summary import summarize

    return summarize(scores.permute(1, 2, 0).float().cpu().numpy(), WINDOW, model="m", task="t")


def torch_path(scores: torch.Tensor):
    from calibrator.summary import summary_from_counts
    from kvzap_sglang.plugin.calibration import bucket_counts

    tokens, layers, heads = scores.shape
    counts = bucket_counts(scores[: max(tokens - WINDOW, 0)])
    return summary_from_counts(counts, layers, heads, tokens, WINDOW, model="m", task="t")


def median_ms(fn, scores: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(scores)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if min(args.tokens) < 1 or args.layers < 1 or args.heads < 1 or args.repeats < 1:
        parser.error("--tokens, --layers, --heads and --repeats must be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; scores float32 [T, {args.layers}, "
          f"{args.heads}], window {WINDOW}, median of {args.repeats}")
    print(f"{'tokens':>8} {'numpy ms':>10} {'torch ms':>10} {'numpy/torch':>12}")
    generator = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        scores = (torch.randn(tokens, args.layers, args.heads, generator=generator) * 3 - 5).to(torch.bfloat16).float()
        scores[:: 97] = float("nan")  # some unscored entries, as a --kvzap-no-decode server has
        reference, fast = numpy_path(scores), torch_path(scores)
        assert np.array_equal(reference.dense_counts(), fast.dense_counts()), "the two paths disagree"
        slow_ms, fast_ms = median_ms(numpy_path, scores, args.repeats), median_ms(torch_path, scores, args.repeats)
        print(f"{tokens:>8} {slow_ms:>10.2f} {fast_ms:>10.2f} {slow_ms / fast_ms:>11.1f}x")


if __name__ == "__main__":
    main()
