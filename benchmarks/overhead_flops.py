"""KVzap scoring overhead: analytic FLOPs (paper App. B, Table 3) and measured CPU time on the reference path.

Analytic, per token and layer (linear projections only, attention scores excluded as in the paper)::

    C     = 4·D·(H_q·d + H·d) + 6·D·D_int      # q/k/v/o projections + gated MLP
    C_MLP = 2·D·h + 2·h·H                      # h = MLP width (D/8 in the paper)
    C_Lin = 2·D·H

Measured: the same prompt's decoder forward (the model itself, fp32, no LM head) against scoring its captured
attention inputs with every layer's surrogate, timed interleaved, median of ``--repeats``. The surrogate's
weights do not change its cost, so an untrained one of the right shape is used when no checkpoint is bundled.

    .venv/bin/python -m benchmarks.overhead_flops [--tokens 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """What the formula needs: hidden ``D``, query/KV heads, head dim ``d``, MLP intermediate ``D_int``."""

    name: str
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    surrogate_width: int  # KVzap-MLP hidden width used for this model

    def layer_flops(self) -> int:
        d = self.head_dim
        return 4 * self.hidden * (self.q_heads * d + self.kv_heads * d) + 6 * self.hidden * self.intermediate

    def mlp_flops(self) -> int:
        return 2 * self.hidden * self.surrogate_width + 2 * self.surrogate_width * self.kv_heads

    def linear_flops(self) -> int:
        return 2 * self.hidden * self.kv_heads


# The paper's models (public configs; MLP widths from paper Table 2: 512 for the 8B models, 640 for 32B).
PAPER_MODELS = (
    Geometry("Qwen3-8B", 4096, 32, 8, 128, 12288, 512),
    Geometry("Llama-3.1-8B", 4096, 32, 8, 128, 14336, 512),
    Geometry("Qwen3-32B", 5120, 64, 8, 128, 25600, 640),
)
PAPER_RATIOS = {"Qwen3-8B": ("1.09%", "0.02%"), "Llama-3.1-8B": ("0.96%", "0.02%"), "Qwen3-32B": ("0.67%", "0.01%")}


def smollm2_geometry(config, surrogate_width: int) -> Geometry:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Geometry("SmolLM2-135M", config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                    head_dim, config.intermediate_size, surrogate_width)  # fmt: skip


def print_analytic(models: list[Geometry]) -> None:
    print("Analytic FLOPs per token per layer (paper App. B formula)")
    print(f"{'model':<14} {'C (layer)':>12} {'C_MLP':>10} {'C_MLP/C':>8} {'C_Lin':>8} {'C_Lin/C':>8}  paper (MLP/Lin)")
    for g in models:
        c = g.layer_flops()
        paper = "/".join(PAPER_RATIOS.get(g.name, ("-", "-")))
        print(f"{g.name:<14} {c:>12,} {g.mlp_flops():>10,} {g.mlp_flops() / c:>8.2%} {g.linear_flops():>8,} "
              f"{g.linear_flops() / c:>8.2%}  {paper}")  # fmt: skip


def load_surrogates(config):
    """(kind -> surrogate, note) — bundled checkpoints if present, else untrained ones of the same shape."""
    from kvzap_sglang.surrogate import KVzapConfig, KVzapSurrogate, bundled_checkpoint

    surrogates, notes = {}, []
    for kind in ("linear", "mlp"):
        try:
            surrogates[kind] = KVzapSurrogate.from_pretrained(bundled_checkpoint("smollm2-135m", kind))
            notes.append(f"{kind}: bundled checkpoint")
        except FileNotFoundError:
            width = None if kind == "linear" else config.hidden_size // 8
            surrogates[kind] = KVzapSurrogate(
                KVzapConfig(config.hidden_size, config.num_key_value_heads, config.num_hidden_layers, width)
            ).eval()
            notes.append(f"{kind}: untrained (no bundled checkpoint; cost is weight-independent)")
    return surrogates, notes


def measure(tokens: int, repeats: int) -> None:
    from kvzap_sglang.hidden_states import attention_input_hooks, run_decoder
    from kvzap_sglang.prompts import make_prompt
    from kvzap_sglang.scoring import load_reference_model

    torch.set_num_threads(2)
    ref = load_reference_model("smollm2-135m", dtype=torch.float32)
    surrogates, notes = load_surrogates(ref.model.config)
    width = surrogates["mlp"].config.hidden_dim or ref.model.config.hidden_size // 8
    print_analytic([*PAPER_MODELS, smollm2_geometry(ref.model.config, width)])

    prompt = make_prompt("prose", ref.tokenizer, tokens, seed=0)
    ids = torch.tensor(ref.tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    inputs: list[torch.Tensor] = []
    with attention_input_hooks(ref.model, lambda inp: inputs.append(inp.hidden_states[0].detach())):
        run_decoder(ref.model, ids)
    forward, scoring = [], {kind: [] for kind in surrogates}
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both sides alike
        start = time.perf_counter()
        run_decoder(ref.model, ids)
        forward.append(time.perf_counter() - start)
        for kind, surrogate in surrogates.items():
            start = time.perf_counter()
            with torch.inference_mode():
                for layer_idx, x in enumerate(inputs):
                    surrogate.layers[layer_idx](x)
            scoring[kind].append(time.perf_counter() - start)
    base = statistics.median(forward)
    print(f"\nMeasured on CPU (fp32, 2 threads, {ids.numel()} tokens, median of {repeats}; {'; '.join(notes)})")
    print(f"decoder forward (30 layers, attention included): {base * 1000:.1f} ms")
    for kind, times in scoring.items():
        t = statistics.median(times)
        print(f"KVzap-{kind} scoring, all layers: {t * 1000:.2f} ms = {t / base:.2%} of the forward")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead_flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length for the measured part")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--analytic-only", action="store_true", help="print the FLOP table only (no model)")
    args = parser.parse_args(argv)
    if args.tokens < 64 or args.repeats < 1:
        print("error: --tokens must be >= 64 and --repeats >= 1", file=sys.stderr)
        return 2
    if args.analytic_only:
        from transformers import AutoConfig

        from kvzap_sglang.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m"), local_files_only=True)
        print_analytic([*PAPER_MODELS, smollm2_geometry(config, config.hidden_size // 8)])
        return 0
    measure(args.tokens, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
