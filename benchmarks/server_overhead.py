"""Surrogate overhead in the live SGLang engine: decode step time (and prefill time) with KVzap on vs off, and
linear vs MLP surrogate, measured side by side in one run (issue #3). Not a test; prints a table and ratios.

Each mode starts a real ``sglang.Engine`` on CPU (SmolLM2, bf16, radix cache and overlap off in every mode so only
KVzap differs), warms up, then times ``--reps`` greedy requests of a ``--prompt-tokens`` retrieval prompt with
1 and with ``1 + --decode-tokens`` new tokens (``ignore_eos``): decode step = (t_long − t_short) / decode_tokens.
KVzap runs with τ = -inf-like (``--threshold -1000``) by default so nothing is pruned and the figure is the cost
of scoring plus the cell store, not a shorter cache.

    .venv/bin/python benchmarks/server_overhead.py                      # off, linear, mlp (bundled checkpoints)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native", disable_cuda_graph=True, dtype="bfloat16",
                   page_size=1, max_total_tokens=8192, mem_fraction_static=0.3, skip_server_warmup=True,
                   random_seed=0, log_level="error", disable_radix_cache=True,
                   disable_overlap_schedule=True)  # fmt: skip


def time_mode(model_path, prompt: str, kvzap: dict, decode_tokens: int, reps: int) -> dict:
    import sglang

    engine = sglang.Engine(model_path=str(model_path), **ENGINE_ARGS, **kvzap)
    try:
        def run(n: int) -> float:
            began = time.perf_counter()
            engine.generate(prompt, sampling_params={"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True})
            return time.perf_counter() - began

        run(4)  # warm-up
        short = [run(1) for _ in range(reps)]
        long = [run(1 + decode_tokens) for _ in range(reps)]
    finally:
        engine.shutdown()
    prefill = statistics.median(short)
    return {"prefill_s": prefill, "decode_step_ms": 1000 * (statistics.median(long) - prefill) / decode_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=-1000.0)
    parser.add_argument("--surrogates", nargs="+", default=["linear", "mlp"], help="linear|mlp|checkpoint folders")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from kvzap_sglang.models import resolve_model_path
    from kvzap_sglang.prompts import retrieval_prompt

    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt = retrieval_prompt(tokenizer, args.prompt_tokens, seed=0).render_chat(tokenizer)
    rows = {"off": time_mode(model_path, prompt, {}, args.decode_tokens, args.reps)}
    for surrogate in args.surrogates:
        kvzap = {"kvzap_threshold": args.threshold, "kvzap_surrogate": surrogate}
        rows[f"KVzap {surrogate}"] = time_mode(model_path, prompt, kvzap, args.decode_tokens, args.reps)
    off = rows["off"]
    print(f"SmolLM2 bf16 CPU, prompt {args.prompt_tokens} tokens, {args.decode_tokens} decode steps, "
          f"median of {args.reps}, tau={args.threshold}")
    print("| mode | prefill s | decode step ms | prefill ratio | decode ratio |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['prefill_s']:.3f} | {row['decode_step_ms']:.1f} | "
              f"{row['prefill_s'] / off['prefill_s']:.2f} | {row['decode_step_ms'] / off['decode_step_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
