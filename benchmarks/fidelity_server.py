"""Fidelity through the real SGLang HTTP server with the KVzap plugin, checked against a reference twin.

The server does what a serving engine does with one request: the whole prompt (context + question) is
prefilled densely, the DMS rule decides each token when it leaves the last ``window`` tokens of the request,
and the answer is decoded from the pruned cache (``--kvzap-no-decode``: generated tokens are kept). That is
not the query-agnostic protocol of :mod:`benchmarks.fidelity` (there the question attends to the pruned
context), so the server is compared with a **reference twin** that runs the server's semantics on the
transformers path: same prompt ids, dense prefill, the same surrogate scores, and at every decode step the
mask the server's delayed eviction has reached (``score < τ`` and position ``< length_before_step − window``).

Per (setting, sample) it records both answers, their RULER scores, whether the token ids agree, and both
removed fractions (server: ``meta_info["kvzap"]``; twin: the same count from its masks). Both run in fp32.

Cells right after the prefill: before the answer, the same prompt is sent once more with ``max_new_tokens=1`` (the
request ends with its prefill forward, so no decode step prunes or writes anything). Its ``meta_info["kvzap"]``
gives the cells the request held when released (``prefill_cells_held / prefill_cells_full``), and the server-wide
counters of ``/server_info`` around it give the pool's own count: cells reserved minus cells pruned by that request
(``pool_cells_after_prefill``), plus ``cells_in_use`` once it is gone (0 = nothing leaked). The summary compares the
mean used-cell ratio after prefill with ``1 - removed fraction``. ``--no-twin`` skips the reference twin (then
``twin_*`` fields are null and ``same_tokens`` is not judged).

    .venv/bin/python -m benchmarks.fidelity_server --methods kvzap_mlp --taus -6 -5 --tasks niah_single --lengths 1024 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import baselines
from benchmarks.tasks import TASKS, encode, make_sample, string_match_all
from kvzap_sglang.policy import DEFAULT_WINDOW
from kvzap_sglang.plugin.server_process import kvzap_state, launched_server

SERVER_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native",
    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
    "--dtype", "float32",
    "--page-size", "1", "--max-total-tokens", "16384", "--mem-fraction-static", "0.3", "--skip-server-warmup",
    "--random-seed", "0", "--log-level", "warning", "--host", "127.0.0.1",
    # One prefill chunk per prompt: a later chunk would attend to an already pruned earlier chunk. For the same
    # reason no prefix cache: a cached prefix (shared RULER preamble) is a prefill split at the cache boundary.
    "--chunked-prefill-size", "16384", "--disable-radix-cache",
]  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    method: str
    tau: float
    task: str
    length: int
    seed: int
    prompt_tokens: int
    server_prediction: str
    twin_prediction: str
    server_score: float
    twin_score: float | None
    same_tokens: bool | None
    server_removed_fraction: float
    twin_removed_fraction: float | None
    server_tokens: int = 0  # tokens the answer request held at release (prompt + generated)
    prefill_cells_held: int = 0  # meta_info of the max_new_tokens=1 request: cells held right after prefill
    prefill_cells_full: int = 0
    pool_cells_after_prefill: int = 0  # /server_info: entries_reserved - entries_pruned of that request
    pool_cells_in_use_after: int = -1  # /server_info cells_in_use once both requests are gone


@contextmanager
def running_server(model_path: Path, flags: list[str], timeout_s: float = 600.0):
    """``python -m sglang.launch_server`` with this benchmark's flags; yields its URL; always terminated."""
    with launched_server(model_path, [*SERVER_FLAGS, *flags], timeout_s) as url:
        yield url


def server_generate(url: str, prompt_ids: list[int], max_new_tokens: int) -> dict:
    import requests

    body = {"input_ids": prompt_ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
    response = requests.post(f"{url}/generate", json=body, timeout=1800)
    response.raise_for_status()
    return response.json()


def prefill_cells(url: str, prompt_ids: list[int]) -> tuple[dict, int]:
    """``(meta_info["kvzap"], pool cells after prefill)`` of the prompt sent with ``max_new_tokens=1``.

    The server must be otherwise idle: the pool figure is the difference of server-wide counters.
    """
    before = kvzap_state(url)
    figures = server_generate(url, prompt_ids, 1)["meta_info"].get("kvzap", {})
    after = kvzap_state(url)
    reserved = after["entries_reserved"] - before["entries_reserved"]
    pruned = after["entries_pruned"] - before["entries_pruned"]
    return figures, reserved - pruned


def twin_answer(model, scores_fn, prompt_ids: list[int], tau: float, window: int, max_new: int, stop: set[int]):
    """The server's semantics on the reference path: ``(generated ids, pruned entries at the end)``.

    ``scores_fn(attention_inputs) -> [L, H, P-1]``. The prompt minus its last token is prefilled densely; the
    last token then attends densely too (it belongs to the server's prefill). Every later forward, with the
    cache holding ``n`` tokens, sees entries ``score < τ`` at positions ``< n − window`` removed.
    """
    from benchmarks.reference_pruning import answer, prefill_context

    prefill = prefill_context(model, torch.tensor(prompt_ids[:-1]))
    below = scores_fn(prefill.attention_inputs) < tau  # [L, H, P-1]
    positions = torch.arange(below.shape[-1])
    seen: list[int] = []

    def keep_at(cache_len: int) -> torch.Tensor | None:
        seen.append(cache_len)
        if cache_len < len(prompt_ids):
            return None
        return ~(below & (positions < cache_len - window))

    tokens = answer(model, prefill, torch.tensor(prompt_ids[-1:]), keep_at, max_new, stop)
    final = max(seen) + 1  # tokens written by the last forward: its own exits are decided after its attention
    pruned = int((below & (positions < final - window)).sum())
    return tokens, pruned


def compare(args: argparse.Namespace) -> list[Comparison]:
    from benchmarks import reference_pruning
    from kvzap_sglang.scoring import load_reference_model
    from kvzap_sglang.surrogate import KVzapSurrogate, bundled_checkpoint

    torch.set_num_threads(2)
    ref = load_reference_model("smollm2-135m", dtype=torch.float32)  # the twin's model; also the tokenizer/path
    if not args.no_twin:
        reference_pruning.install(ref.model)
    tokenizer = ref.tokenizer
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    results = []
    for method in args.methods:
        kind = method.removeprefix("kvzap_")
        folder = args.surrogate or (args.checkpoints / kind if args.checkpoints else bundled_checkpoint("smollm2-135m", kind))
        surrogate = KVzapSurrogate.from_pretrained(folder)
        layers, heads = ref.model.config.num_hidden_layers, ref.model.config.num_key_value_heads
        for tau in args.taus:
            flags = ["--kvzap-threshold", str(tau), "--kvzap-surrogate", str(folder), "--kvzap-window", str(args.window),
                     "--kvzap-no-decode"]  # fmt: skip
            with running_server(ref.path, flags) as url:
                for task in args.tasks:
                    for length in args.lengths:
                        for seed in args.seeds:
                            sample = make_sample(task, tokenizer, length, seed)
                            context_ids, question_ids = encode(sample, tokenizer)
                            prompt = context_ids + question_ids
                            at_prefill, pool_cells = prefill_cells(url, prompt)
                            out = server_generate(url, prompt, sample.max_new_tokens)
                            in_use_after = kvzap_state(url)["cells_in_use"]
                            server_ids = [t for t in out["output_ids"] if t not in stop]
                            figures = out["meta_info"].get("kvzap", {})
                            server_text = tokenizer.decode(server_ids, skip_special_tokens=True)
                            twin_text = twin_score = twin_removed = None
                            same = None
                            if not args.no_twin:
                                twin_ids, pruned = twin_answer(
                                    ref.model, lambda xs: baselines.kvzap_scores(surrogate, xs), prompt, tau,
                                    args.window, sample.max_new_tokens, stop,
                                )  # fmt: skip
                                twin_text = tokenizer.decode(twin_ids, skip_special_tokens=True)
                                twin_score = string_match_all(twin_text, sample.answers)
                                twin_removed = pruned / (layers * heads * max(figures.get("tokens", len(prompt)), 1))
                                same = server_ids == twin_ids
                            results.append(Comparison(
                                method, tau, task, length, seed, len(prompt), server_text, twin_text,
                                string_match_all(server_text, sample.answers), twin_score,
                                same, float(figures.get("removed_fraction", float("nan"))), twin_removed,
                                int(figures.get("tokens", 0)), int(at_prefill.get("cells_held", -1)),
                                int(at_prefill.get("cells_full", -1)), pool_cells, int(in_use_after),
                            ))  # fmt: skip
                            print(json.dumps(asdict(results[-1])), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["kvzap_mlp"], choices=baselines.THRESHOLD_METHODS)
    parser.add_argument("--taus", nargs="+", type=float, required=True)
    parser.add_argument("--surrogate", type=Path, help="checkpoint folder (default: the bundled one per method)")
    parser.add_argument("--checkpoints", type=Path, help="folder with linear/ and mlp/ surrogates")
    parser.add_argument("--tasks", nargs="+", default=["niah_single"], choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--no-twin", action="store_true", help="skip the reference twin (server answers only)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fidelity_server.json")
    args = parser.parse_args(argv)
    if any(not 256 <= n <= 8192 for n in args.lengths) or args.window < 0:
        print("error: lengths must be within [256, 8192] and window >= 0", file=sys.stderr)
        return 2
    try:
        results = compare(args)
    except FileNotFoundError as missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    summary = summarize(results)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "summary": summary,
                                    "comparisons": [asdict(r) for r in results]}, indent=1) + "\n")  # fmt: skip
    for row in summary:
        print(json.dumps(row))
    return 0


def summarize(results: list[Comparison]) -> list[dict]:
    """One row per (method, τ): accuracies, removed fractions, cells after prefill vs ``1 - removed``."""

    def mean(values) -> float | None:
        values = list(values)
        return sum(values) / len(values) if values else None

    rows = []
    for method, tau in dict.fromkeys((r.method, r.tau) for r in results):
        rs = [r for r in results if (r.method, r.tau) == (method, tau)]
        twins = [r for r in rs if r.twin_score is not None]
        prefill_ratio = mean(r.prefill_cells_held / r.prefill_cells_full for r in rs if r.prefill_cells_full > 0)
        pool_ratio = mean(r.pool_cells_after_prefill / r.prefill_cells_full for r in rs if r.prefill_cells_full > 0)
        removed = mean(r.server_removed_fraction for r in rs)
        rows.append({
            "method": method,
            "tau": tau,
            "samples": len(rs),
            "server_accuracy": 100 * mean(r.server_score for r in rs),
            "twin_accuracy": 100 * mean(r.twin_score for r in twins) if twins else None,
            "same_tokens": sum(bool(r.same_tokens) for r in twins) if twins else None,
            "server_removed_fraction": removed,
            "max_removed_fraction_gap": max((abs(r.server_removed_fraction - r.twin_removed_fraction) for r in twins),
                                            default=None),
            "prefill_used_cells_ratio": prefill_ratio,
            "pool_used_cells_ratio": pool_ratio,
            "one_minus_removed": 1 - removed,
            "prefill_ratio_over_one_minus_removed": (prefill_ratio / (1 - removed)
                                                     if prefill_ratio is not None and removed < 1 else None),
            "max_cells_in_use_when_idle": max(r.pool_cells_in_use_after for r in rs),
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
