"""Surrogate overhead in the live SGLang engine: decode step time (and prefill time) with KVzap on vs off, and
linear vs MLP surrogate, measured side by side in one run (issue #3). Not a test; prints a table and ratios.

Each mode starts a real ``sglang.Engine`` on CPU (SmolLM2, bf16, radix cache and overlap off in every mode so only
KVzap differs), warms up, then times ``--reps`` greedy requests of a ``--prompt-tokens`` retrieval prompt with
1 and with ``1 + --decode-tokens`` new tokens (``ignore_eos``): decode step = (t_long − t_short) / decode_tokens.
KVzap runs with τ = -inf-like (``--threshold -1000``) by default so nothing is pruned and the figure is the cost
of scoring plus the cell store, not a shorter cache.

``--store-only`` adds a mode with KVzap on but decode tokens not scored (``kvzap_no_decode``, first surrogate): its
decode step pays for the cell store, the KVzap attention path and the window-exit pruning but not for the
surrogate, so it splits the KVzap-on cost into store/attention vs the surrogate itself.

On a shared machine other jobs' load lands on whichever mode is running: ``--interleave`` starts every mode's
engine at once (``sleep_on_idle``, so idle ones cost no CPU) and times the modes in turn within every rep;
``--rounds R`` instead runs the whole sequence of modes R times (a fresh engine each time). Short/long requests
alternate within a rep, so contention spreads over all modes; the table gives medians over every rep of every round, and a second table the minima (load only
ever adds time), decode step = (min long − min short) / decode_tokens.

    .venv/bin/python benchmarks/server_overhead.py                      # off, linear, mlp (bundled checkpoints)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Appended, not prepended: a PYTHONPATH naming another checkout (to time older code) keeps its precedence.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks.provenance import header, provenance  # noqa: E402

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native",
                   cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled",
                   dtype="bfloat16",
                   page_size=1, max_total_tokens=8192, mem_fraction_static=0.3, skip_server_warmup=True,
                   random_seed=0, log_level="error", disable_radix_cache=True,
                   disable_overlap_schedule=True)  # fmt: skip


def timed_generate(engine, prompt: str, n: int) -> float:
    began = time.perf_counter()
    engine.generate(prompt, sampling_params={"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True})
    return time.perf_counter() - began


def time_mode(model_path, prompt: str, kvzap: dict, decode_tokens: int, reps: int) -> dict:
    import sglang

    engine = sglang.Engine(model_path=str(model_path), **ENGINE_ARGS, **kvzap)
    try:
        def run(n: int) -> float:
            return timed_generate(engine, prompt, n)

        run(4)  # warm-up
        short, long = [], []
        for _ in range(reps):
            short.append(run(1))
            long.append(run(1 + decode_tokens))
    finally:
        engine.shutdown()
    return {"short_s": short, "long_s": long}


def time_interleaved(model_path, prompt: str, modes: dict, decode_tokens: int, reps: int) -> dict:
    """All modes' engines up at once (``sleep_on_idle``: an idle scheduler does not spin a core); each rep times
    every mode back to back, in an order rotated per rep, so load from other jobs lands on all modes alike."""
    import sglang

    engines = {}
    try:
        for name, kvzap in modes.items():  # one after the other: each scheduler reads the KVZAP_* env at its spawn
            engines[name] = sglang.Engine(model_path=str(model_path), **ENGINE_ARGS, sleep_on_idle=True, **kvzap)
        for engine in engines.values():
            timed_generate(engine, prompt, 4)  # warm-up
        times = {name: {"short_s": [], "long_s": []} for name in modes}
        names = list(modes)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                times[name]["short_s"].append(timed_generate(engines[name], prompt, 1))
                times[name]["long_s"].append(timed_generate(engines[name], prompt, 1 + decode_tokens))
            print(f"rep {rep + 1}/{reps}: " + ", ".join(
                f"{n} {t['short_s'][-1]:.2f}/{t['long_s'][-1]:.2f} s" for n, t in times.items()), flush=True)  # fmt: skip
    finally:
        for engine in engines.values():
            engine.shutdown()
    return times


def figures(times: dict, decode_tokens: int, pick) -> dict:
    prefill = pick(times["short_s"])
    return {"prefill_s": prefill, "decode_step_ms": 1000 * (pick(times["long_s"]) - prefill) / decode_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence of modes this many times")
    parser.add_argument("--threshold", type=float, default=-1000.0)
    parser.add_argument("--surrogates", nargs="+", default=["linear", "mlp"], help="linear|mlp|checkpoint folders")
    parser.add_argument("--interleave", action="store_true",
                        help="all engines up at once, modes timed in turn within every rep (--rounds ignored)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of every engine (OMP_NUM_THREADS); 1 keeps "
                        "timings stable on a shared machine, where a 2-thread op waits for a descheduled thread")
    parser.add_argument("--store-only", action="store_true", help="add a KVzap mode that does not score decode tokens")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here (e.g. benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the spawned schedulers' torch at start-up

    from transformers import AutoTokenizer

    from kvzap_sglang.models import resolve_model_path
    from kvzap_sglang.prompts import retrieval_prompt

    measured = provenance()  # load average before the engines start
    print(header(measured), flush=True)
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt = retrieval_prompt(tokenizer, args.prompt_tokens, seed=0).render_chat(tokenizer)
    modes = {"off": {}}
    if args.store_only:
        modes["KVzap store only"] = {"kvzap_threshold": args.threshold, "kvzap_surrogate": args.surrogates[0],
                                     "kvzap_no_decode": True}  # fmt: skip
    for surrogate in args.surrogates:
        modes[f"KVzap {surrogate}"] = {"kvzap_threshold": args.threshold, "kvzap_surrogate": surrogate}
    times = {name: {"short_s": [], "long_s": []} for name in modes}
    if args.interleave:
        times = time_interleaved(model_path, prompt, modes, args.decode_tokens, args.reps)
        args.rounds = 1
    for round_ in range(0 if args.interleave else args.rounds):
        for name, kvzap in modes.items():
            got = time_mode(model_path, prompt, kvzap, args.decode_tokens, args.reps)
            for key in got:
                times[name][key] += got[key]
            print(f"round {round_ + 1}/{args.rounds} {name}: short {got['short_s']} long {got['long_s']}", flush=True)
    tables = {"median": {n: figures(t, args.decode_tokens, statistics.median) for n, t in times.items()},
              "min": {n: figures(t, args.decode_tokens, min) for n, t in times.items()}}  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    for pick, rows in tables.items():
        off = rows["off"]
        print(f"SmolLM2 bf16 CPU ({threads} torch threads), prompt {args.prompt_tokens} tokens, {args.decode_tokens} decode steps, "
              f"{pick} of {args.reps} reps x {args.rounds} rounds, tau={args.threshold}")
        print("| mode | prefill s | decode step ms | prefill ratio | decode ratio |")
        print("|---|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['prefill_s']:.3f} | {row['decode_step_ms']:.1f} | "
                  f"{row['prefill_s'] / off['prefill_s']:.2f} | {row['decode_step_ms'] / off['decode_step_ms']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        measured["load_average_1m_end"] = round(os.getloadavg()[0], 2)
        results = {"provenance": measured, "settings": settings, "tables": tables, "times": times}
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
