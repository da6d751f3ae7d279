"""Does the KVzip+ oracle still hold at 4k tokens, where its repeat prompt runs past the model's context?

The oracle's input is the context, the repeat instruction and a teacher-forced copy of the context: at a 4096-token
fidelity sample that is 7,844–8,200 tokens, up to 8 past SmolLM2's 8,192 positions (``max_position_embeddings``;
qa_prose, niah_single seeds 1–2, niah_multikey seeds 0–1). Two checks on the fidelity samples themselves
(``benchmarks/tasks.py``):

1. **Copying past the context**: the model's teacher-forced next-token accuracy on the copy, for the copy tokens
   at positions ≥ the context limit against the same number just before it. If the model still copies there,
   its attention at those positions is the copy-attention the oracle measures.
2. **Does it matter for the ranking**: oracle scores with every copy query (as the fidelity benchmark runs it)
   against scores from the copy queries inside the context only; for each target removed fraction, the share of
   removed entries (global bottom-k, recent window kept, as ``benchmarks.fidelity``) on which the two disagree.

    .venv/bin/python -m benchmarks.oracle_context [--tasks niah_single qa_prose] [--length 4096] [--seed 0]

Writes ``benchmarks/results/oracle_context.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import baselines
from benchmarks.tasks import TASKS, encode, make_sample

RATIOS = (0.5, 0.75, 0.9)
OUT = Path(__file__).parent / "results" / "oracle_context.json"


def copy_accuracy(model, input_ids: torch.Tensor, copy: slice, limit: int) -> dict:
    """Teacher-forced argmax accuracy on the copy's tokens at positions ≥ ``limit`` vs as many just before it."""
    with torch.inference_mode():
        # Row k of the kept logits predicts token copy.start + k (logits of the previous position).
        logits = model(input_ids[None], logits_to_keep=copy.stop - copy.start + 1).logits[0, :-1]
    targets = input_ids[copy]
    correct = logits.argmax(-1) == targets
    positions = torch.arange(copy.start, copy.stop)
    beyond = positions >= limit
    count = int(beyond.sum())
    if count == 0:
        return {"tokens_beyond": 0}
    before = (positions < limit) & (positions >= limit - count)
    return {
        "tokens_beyond": count,
        "accuracy_beyond": round(float(correct[beyond].float().mean()), 4),
        "accuracy_just_before": round(float(correct[before].float().mean()), 4),
        "accuracy_whole_copy": round(float(correct.float().mean()), 4),
    }


def ranking_change(model, repeat, limit: int, window: int) -> dict:
    """Removed-set disagreement between the oracle on every copy query and on the in-context copy queries only."""
    full = baselines.kvzip_plus_scores(model, repeat).scores
    inside = dataclasses.replace(repeat, copy=slice(repeat.copy.start, min(repeat.copy.stop, limit)))
    clipped = baselines.kvzip_plus_scores(model, inside).scores
    result = {"scores_changed": round(float((full != clipped).float().mean()), 4)}
    for ratio in RATIOS:
        removed_full = ~baselines.keep_lowest_removed(full, ratio, window)
        removed_clipped = ~baselines.keep_lowest_removed(clipped, ratio, window)
        differ = int((removed_full ^ removed_clipped).sum()) // 2  # each swap counts once on either side
        result[f"removed_differ_at_{ratio:.2f}"] = round(differ / max(int(removed_full.sum()), 1), 5)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oracle_context", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "qa_prose"], choices=TASKS)
    parser.add_argument("--length", type=int, default=4096, help="fidelity sample length in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.length < 256:
        parser.error("--length must be >= 256")

    from kvzap_sglang.scoring import load_reference_model

    torch.set_num_threads(args.threads)
    ref = load_reference_model("smollm2-135m", dtype=torch.float32)  # fp32, as the fidelity benchmark runs
    limit = int(ref.model.config.max_position_embeddings)
    rows = []
    for task in args.tasks:
        started = time.perf_counter()
        context_ids, _ = encode(make_sample(task, ref.tokenizer, args.length, args.seed), ref.tokenizer)
        repeat = baselines.oracle_repeat_prompt(ref.tokenizer, context_ids)
        row = {"task": task, "length": args.length, "seed": args.seed, "context_tokens": len(context_ids),
               "repeat_tokens": int(repeat.input_ids.numel()), "max_position_embeddings": limit}  # fmt: skip
        row |= copy_accuracy(ref.model, repeat.input_ids, repeat.copy, limit)
        if row["tokens_beyond"]:
            row |= ranking_change(ref.model, repeat, limit, baselines.DEFAULT_WINDOW)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"window": baselines.DEFAULT_WINDOW, "ratios": RATIOS, "rows": rows}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
