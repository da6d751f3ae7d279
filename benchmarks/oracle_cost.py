"""KVzip+ oracle cost on SmolLM2: wall time and peak RSS at 1k and 2k prompt tokens, each in a fresh subprocess.

For each prompt length the child process loads the model, runs one untimed plain forward of the repeat prompt
(prompt + instruction + copy, ~2x the prompt: the first forward of a process also pays one-time kernel set-up,
which made it slower than the oracle run after it), then times one plain forward and one oracle run (the same
forward plus the per-layer KVzip+ reduction in hooks), and reports its peak RSS. The issue's bound is < 4 GiB at 2k tokens; the
all-layer eager approach needs 5.95 GB there (environment notes §4).

    .venv/bin/python benchmarks/oracle_cost.py [--tokens 1000 2000] [--dtype float32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(tokens: int, dtype: str, threads: int) -> dict:
    import resource

    import torch

    from kvzap_sglang.hidden_states import run_decoder
    from kvzap_sglang.oracle import build_repeat_prompt, kvzip_plus_scores
    from kvzap_sglang.prompts import make_prompt
    from kvzap_sglang.scoring import load_reference_model

    torch.set_num_threads(threads)
    ref = load_reference_model("smollm2-135m", dtype=getattr(torch, dtype))
    prompt = make_prompt("prose", ref.tokenizer, tokens, seed=0)
    repeat = build_repeat_prompt(ref.tokenizer, prompt.text)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    run_decoder(ref.model, repeat.input_ids)  # warm-up, untimed
    started = time.perf_counter()
    run_decoder(ref.model, repeat.input_ids)
    forward_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = kvzip_plus_scores(ref.model, repeat).scores
    oracle_s = time.perf_counter() - started
    assert torch.isfinite(scores).all()
    return {
        "prompt_tokens": repeat.num_prompt_tokens,
        "sequence_tokens": repeat.input_ids.numel(),
        "forward_s": forward_s,
        "oracle_s": oracle_s,
        "rss_after_load_gib": rss_loaded,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.threads)))
        return
    rows = []
    for tokens in args.tokens:
        command = [sys.executable, __file__, "--child", str(tokens), "--dtype", args.dtype, "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[0]
    print(f"KVzip+ oracle, SmolLM2-135M {args.dtype}, {args.threads} threads, 1-min load average at the end {load}")
    print("| prompt tokens | sequence tokens | plain forward s | oracle s | oracle / forward | RSS after load GiB | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['prompt_tokens']} | {row['sequence_tokens']} | {row['forward_s']:.1f} | {row['oracle_s']:.1f} | "
            f"{row['oracle_s'] / row['forward_s']:.2f} | {row['rss_after_load_gib']:.2f} | {row['peak_rss_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
