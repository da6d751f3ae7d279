"""How the bundled SmolLM2 surrogates' default τ was picked: the τ that removes about half of the KV entries.

Scores ``--seeds`` generated ~1k-token prompts of each task (retrieval, prose, code; chat template included,
as ``kvzap-sglang prune`` does) with both bundled surrogates in one forward per prompt, then sweeps τ and
prints the removed fraction per task (window 128, strict ``<``). The default is the τ, rounded to 0.1, at
which the mean removed fraction over all prompts is closest to ``--target`` (0.5).

    .venv/bin/python benchmarks/default_threshold.py [--seeds 2] [--tokens 1000] [--target 0.5]
"""

from __future__ import annotations

import argparse

import torch

from kvzap_sglang.hidden_states import AttentionInput, attention_input_hooks, run_decoder
from kvzap_sglang.policy import keep_mask, removed_fraction
from kvzap_sglang.prompts import TASKS, make_prompt
from kvzap_sglang.scoring import load_reference_model
from kvzap_sglang.surrogate import KINDS, KVzapSurrogate, bundled_checkpoint

MODEL = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ref = load_reference_model(MODEL, dtype=torch.float32)
    surrogates = {kind: KVzapSurrogate.from_pretrained(bundled_checkpoint(MODEL, kind)) for kind in KINDS}
    scores: dict[str, list[tuple[str, torch.Tensor]]] = {kind: [] for kind in KINDS}
    for task in TASKS:
        for seed in range(args.seeds):
            prompt = make_prompt(task, ref.tokenizer, args.tokens, seed)
            ids = torch.tensor(ref.tokenizer(prompt.render_chat(ref.tokenizer), add_special_tokens=False)["input_ids"])
            per_kind = {kind: torch.empty(30, 3, ids.numel()) for kind in KINDS}

            def score(inp: AttentionInput) -> None:
                for kind, surrogate in surrogates.items():
                    per_kind[kind][inp.layer_idx] = surrogate.score(inp.hidden_states[0], inp.layer_idx).T

            with attention_input_hooks(ref.model, score):
                run_decoder(ref.model, ids)
            for kind in KINDS:
                scores[kind].append((task, per_kind[kind]))
    grid = [round(-12 + 0.1 * i, 1) for i in range(121)]
    for kind in KINDS:
        removed = {tau: [(task, removed_fraction(keep_mask(s, tau, args.window))) for task, s in scores[kind]] for tau in grid}
        mean = {tau: sum(f for _, f in rows) / len(rows) for tau, rows in removed.items()}
        best = min(grid, key=lambda tau: abs(mean[tau] - args.target))
        print(f"\n{kind}: default τ = {best} (mean removed {mean[best]:.3f} over {len(scores[kind])} prompts)")
        print("| τ | " + " | ".join(TASKS) + " | mean |")
        print("|---|" + "---|" * (len(TASKS) + 1))
        for tau in [t for t in grid if abs(t - best) <= 1.0 + 1e-9 and round(t * 10) % 5 == 0] + [best]:
            per_task = [sum(f for t, f in removed[tau] if t == task) / args.seeds for task in TASKS]
            print(f"| {tau} | " + " | ".join(f"{v:.3f}" for v in per_task) + f" | {mean[tau]:.3f} |")


if __name__ == "__main__":
    main()
