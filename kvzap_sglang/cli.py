"""The ``kvzap-sglang`` command line. Each subcommand exits 0 on success, 2 with a message on bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

from kvzap_sglang.models import DEFAULT_MODEL, ModelNotFoundError, resolve_model_path

TASK_CHOICES = ("retrieval", "prose", "code")
SURROGATE_KINDS = ("linear", "mlp")
DTYPES = ("float32", "bfloat16")
ADMIN_KEY_ENV = "KVZAP_ADMIN_API_KEY"  # `status`: the server's --admin-api-key, read from the environment, not argv


class UsageError(Exception):
    """Bad input from the user: printed as ``error: ...`` with exit code 2."""


def _cmd_model_path(args: argparse.Namespace) -> int:
    print(resolve_model_path(args.model))
    return 0


def _limit_threads() -> None:
    import torch

    # Project machines have 2 cores shared with other work; more threads only add contention.
    torch.set_num_threads(min(2, torch.get_num_threads()))


def _cmd_train(args: argparse.Namespace) -> int:
    from kvzap_sglang.training.fit import MLPSettings
    from kvzap_sglang.training.pipeline import TrainSettings, train_surrogate

    if args.kind == "linear" and importlib.util.find_spec("sklearn") is None:  # the Ridge fit comes after minutes
        raise UsageError("--kind linear needs scikit-learn: pip install 'kvzap-sglang[train]'")  # of oracle forwards
    settings = TrainSettings(
        model=args.model,
        kind=args.kind,
        out=Path(args.out.strip()),
        num_prompts=args.num_prompts,
        held_out_prompts=args.held_out_prompts,
        positions=args.positions,
        seed=args.seed,
        mlp=MLPSettings(epochs=args.epochs, lr=args.lr, seed=args.seed),
    )
    # Everything is checked here: training takes minutes, and a bad flag must not cost them (or their result).
    if settings.mlp.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if not (math.isfinite(settings.mlp.lr) and settings.mlp.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    _check_out_folder(settings.out)
    _limit_threads()
    metrics = train_surrogate(settings)
    held = metrics["held_out"]
    print(f"saved {args.kind} surrogate to {args.out}")
    print(f"held-out R² (squared Pearson) mean over (layer, head): {held['r2_mean']:.3f}; train {metrics['train']['r2_mean']:.3f}")
    print("held-out R² per layer: " + " ".join(f"{value:.2f}" for value in held["r2_per_layer"]))
    return 0


def _check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that save_pretrained could not create or write into (it runs only after training)."""
    if out == Path("."):  # also --out "" (Path("") is "."): the checkpoint would land among other files
        raise UsageError("--out must name the checkpoint's folder (not empty, not the current directory)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be created: {existing} is not a writable folder")


def _read_prompt_file(path: Path) -> str:
    """The user message in ``--prompt-file``: UTF-8 text that is not blank (refused before the model loads)."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UsageError(f"prompt file {path} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"prompt file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise UsageError(f"prompt file {path} is empty")
    return text


def _cmd_prune(args: argparse.Namespace) -> int:
    if args.window < 0:
        raise UsageError(f"--window must be >= 0, got {args.window}")
    if args.tokens < 64:
        raise UsageError(f"--tokens must be >= 64, got {args.tokens}")
    user_text = None if args.prompt_file is None else _read_prompt_file(Path(args.prompt_file))  # before the model
    model_path = resolve_model_path(args.model)  # an unknown model is the error, not its missing bundled surrogate
    surrogate_path, threshold = _surrogate_and_threshold(args)

    import torch

    from kvzap_sglang.policy import keep_mask, removed_fraction
    from kvzap_sglang.prompts import Prompt, make_prompt
    from kvzap_sglang.scoring import load_reference_model, score_tokens
    from kvzap_sglang.surrogate import KVzapSurrogate

    from transformers import AutoConfig

    from kvzap_sglang.hidden_states import AttentionShape

    _limit_threads()
    surrogate = KVzapSurrogate.from_pretrained(surrogate_path)
    model_config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    shape = AttentionShape.of(model_config)
    surrogate.check_fits(shape.num_layers, shape.hidden_size, shape.num_kv_heads, what=str(model_path))  # before loading
    context = _context_length(model_config)
    if args.prompt_file is None and context is not None and args.tokens > context:
        # A prompt past the context is meaningless, and a huge one gets the process killed for memory.
        raise UsageError(f"--tokens must be <= {context} (the context length of {args.model}), got {args.tokens}")
    started = time.perf_counter()
    ref = load_reference_model(str(model_path), dtype=getattr(torch, args.dtype))
    if user_text is not None:
        prompt = Prompt(task="file", text=user_text, num_tokens=0, seed=0)
        source = str(args.prompt_file)
    else:
        prompt = make_prompt(args.task, ref.tokenizer, args.tokens, args.seed)
        source = f"{args.task}, {prompt.num_tokens} tokens, seed {args.seed}"
    input_ids = torch.tensor(ref.tokenizer(prompt.render_chat(ref.tokenizer), add_special_tokens=False)["input_ids"])
    if context is not None and input_ids.numel() > context:
        raise UsageError(
            f"prompt ({source}) is {input_ids.numel()} tokens with the chat template, "
            f"more than the context length {context} of {args.model}"
        )
    loaded = time.perf_counter()
    scores = score_tokens(ref.model, surrogate, input_ids)  # [L, H, T]
    keep = keep_mask(scores, threshold, args.window)
    scored = time.perf_counter()

    per_layer = [removed_fraction(keep[layer]) for layer in range(keep.shape[0])]
    print(f"model: {args.model} ({ref.path}), {args.dtype}")
    print(f"surrogate: {surrogate.kind} ({surrogate_path}); threshold τ = {threshold:g}; window = {args.window}")
    print(f"prompt: {source}; {input_ids.numel()} tokens with the chat template")
    print(
        f"removed fraction: {removed_fraction(keep):.4f} "
        f"({int((~keep).sum())} of {keep.numel()} entries = {shape.num_layers} layers × {shape.num_kv_heads} KV heads × "
        f"{input_ids.numel()} tokens)"
    )
    ranked = sorted(range(len(per_layer)), key=per_layer.__getitem__)
    print(
        f"per layer: min {per_layer[ranked[0]]:.3f} (layer {ranked[0]}), "
        f"median {per_layer[ranked[len(ranked) // 2]]:.3f}, max {per_layer[ranked[-1]]:.3f} (layer {ranked[-1]})"
    )
    for first in range(0, len(per_layer), 10):
        chunk = per_layer[first : first + 10]
        print(f"  layers {first:2d}-{first + len(chunk) - 1:2d}: " + " ".join(f"{value:.2f}" for value in chunk))
    print(f"time: load {loaded - started:.1f} s, score {scored - loaded:.1f} s")
    return 0


def _context_length(model_config) -> int | None:
    """``max_position_embeddings`` when the config states a usable one, else ``None`` (no bound is known)."""
    value = getattr(model_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _surrogate_and_threshold(args: argparse.Namespace) -> tuple[Path, float]:
    """Resolve ``--surrogate`` (kind or folder) and ``--threshold`` (default: the bundled checkpoint's τ)."""
    from kvzap_sglang.surrogate import BUNDLED_CHECKPOINTS, bundled_checkpoint

    defaults_file = BUNDLED_CHECKPOINTS / args.model / "defaults.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
    choice = args.surrogate or defaults.get("surrogate", "mlp")
    if choice in SURROGATE_KINDS:
        path = bundled_checkpoint(args.model, choice)
        default_threshold = defaults.get("threshold", {}).get(choice)
    else:
        path = Path(choice)
        if not path.is_dir():
            raise FileNotFoundError(f"--surrogate {choice!r} is neither {'/'.join(SURROGATE_KINDS)} nor a checkpoint folder")
        default_threshold = None
    threshold = args.threshold if args.threshold is not None else default_threshold
    if threshold is None:
        raise UsageError("no default threshold for this surrogate: pass --threshold")
    # Finite, as the server's KVzapSettings requires: τ = ±inf keeps or drops everything outside the window.
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold!r}")
    return path, float(threshold)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse exits 2 with the message otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 3600] seconds, got {text!r}")
    return value


def _server_url(text: str) -> str:
    """An http(s) base URL (argparse exits 2 with the message otherwise)."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be an http(s) URL such as http://127.0.0.1:30000, got {text!r}")
    return text.rstrip("/")


def _cmd_status(args: argparse.Namespace) -> int:
    """Server-wide and per-tenant KVzap figures of a running server (its ``/server_info``)."""
    import requests

    from kvzap_sglang.plugin.server_process import kvzap_state

    try:
        state = kvzap_state(args.url, timeout_s=args.timeout, api_key=args.admin_api_key)
    except requests.RequestException as error:
        print(f"error: cannot read {args.url}/server_info: {error}", file=sys.stderr)
        return 1
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"τ {state['threshold']}  window {state['window']}  surrogate {state['surrogate']}  "
          f"cells {state['cells_in_use']}/{state['cells_total']} in use ({state.get('cells_cached', 0)} cached)  "
          f"removed fraction {state['removed_fraction']:.3f}  requests finished {state['requests_finished']}")  # fmt: skip
    tenants = state.get("tenants") or {}
    if tenants:
        print(f"{'tenant':<16} {'τ':>7} {'τ base':>7} {'window':>6} {'cells held':>10} {'budget':>10} {'queued':>6} "
              f"{'refused':>7} {'removed':>7}")  # fmt: skip
        for name, t in tenants.items():
            budget = "-" if t["budget_cells"] is None else str(t["budget_cells"])
            base = t.get("threshold_base", t["threshold"])
            print(f"{name:<16} {t['threshold']:>7.3f} {base:>7.3f} {t['window']:>6} {t['cells_held']:>10} {budget:>10} "
                  f"{t['queued_requests']:>6} {t.get('refused_requests', 0):>7} {t['removed_fraction']:>7.3f}")  # fmt: skip
    elif state.get("tenants_hidden"):
        print(f"tenants: hidden without the admin key (--admin-api-key or ${ADMIN_KEY_ENV})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvzap-sglang", description=__doc__.replace("``", ""))  # no RST markup
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="embedded models").add_subparsers(dest="model_command", required=True)
    path = model.add_parser("path", help="print the local Hugging Face folder of a model (converting on first use)")
    path.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"embedded name or folder (default {DEFAULT_MODEL})")
    path.set_defaults(handler=_cmd_model_path)

    train = commands.add_parser("train", help="train a KVzap surrogate on KVzip+ oracle scores (offline corpus)")
    train.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or local HF folder")
    train.add_argument("--kind", required=True, choices=SURROGATE_KINDS)
    train.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, metrics.json)")
    train.add_argument("--num-prompts", type=int, default=90, help="training prompts (default 90)")
    train.add_argument("--held-out-prompts", type=int, default=20, help="held-out prompts for R² (default 20)")
    train.add_argument("--positions", type=int, default=500, help="sampled tokens per prompt (default 500)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=15, help="MLP epochs (default 15)")
    train.add_argument("--lr", type=float, default=5e-3, help="MLP learning rate (default 5e-3)")
    train.set_defaults(handler=_cmd_train)

    prune = commands.add_parser("prune", help="score one real prompt with a surrogate and print the removed fraction")
    prune.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or local HF folder")
    prune.add_argument("--surrogate", help="linear, mlp (bundled checkpoint) or a checkpoint folder")
    prune.add_argument("--threshold", type=float, help="τ (natural-log score units); default: the bundled one")
    prune.add_argument("--window", type=int, default=128, help="recent tokens always kept (default 128)")
    source = prune.add_mutually_exclusive_group()
    source.add_argument("--prompt-file", help="user message read from a text file")
    source.add_argument("--task", choices=TASK_CHOICES, default="retrieval", help="generated prompt (default retrieval)")
    prune.add_argument("--tokens", type=int, default=1000, help="generated prompt length (default 1000)")
    prune.add_argument("--seed", type=int, default=0, help="generated prompt seed")
    # fp32 is the default: on the project's torch 2.14.1+cu130 CPU build, bf16 matmuls measured ~4x slower.
    prune.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    prune.set_defaults(handler=_cmd_prune)

    status = commands.add_parser("status", help="print a running server's KVzap figures, per tenant")
    status.add_argument("--url", type=_server_url, default="http://127.0.0.1:30000",
                        help="the SGLang server (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--timeout", type=_seconds, default=10.0, help="seconds (default %(default)s)")
    status.add_argument("--admin-api-key", default=os.environ.get(ADMIN_KEY_ENV) or None,
                        help=f"the server's --admin-api-key: with --kvzap-tenants, per-tenant figures are shown to it "
                             f"only (default: ${ADMIN_KEY_ENV}, which keeps the key out of ps)")  # fmt: skip
    status.set_defaults(handler=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, ModelNotFoundError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
