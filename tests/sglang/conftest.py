"""Fixtures that run the real SGLang engine / HTTP server on CPU with SmolLM2 (the CPU recipe of environment.md §7).

Each test module starts at most one engine or server (≈15–25 s on 2 cores) and shuts it down at module end;
no engine is left idle. KVzap settings travel to SGLang's spawned scheduler through the environment
(`kvzap_sglang.plugin.settings`), so fixtures restore the environment afterwards.
"""

from __future__ import annotations

import atexit
import functools
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from kvzap_sglang.plugin.server_process import launched_server

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"  # is_cpu() reads it; without it the model build fails on vllm ops

# Smallest settings that start reliably: bf16 (≈3x faster prefill with AMX), a small pool, no warm-up request.
CPU_ENGINE_ARGS = dict(
    device="cpu",
    attention_backend="torch_native",
    cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled",
    dtype="bfloat16",
    page_size=1,
    max_total_tokens=8192,
    mem_fraction_static=0.3,
    skip_server_warmup=True,
    random_seed=0,
    log_level="error",
)

CPU_SERVER_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native",
    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
    "--dtype", "bfloat16",
    "--page-size", "1", "--max-total-tokens", "8192", "--mem-fraction-static", "0.3", "--skip-server-warmup",
    "--random-seed", "0", "--log-level", "warning", "--host", "127.0.0.1",
]  # fmt: skip


@contextmanager
def kvzap_env_restored():
    """Undo the KVZAP_* variables an Engine(kvzap_...=...) call exports for its scheduler process."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("KVZAP_")}
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("KVZAP_")]:
            del os.environ[key]
        os.environ.update(saved)


@contextmanager
def running_engine(model_path: Path, **overrides):
    """A real `sglang.Engine` on CPU; always shut down."""
    import sglang

    with kvzap_env_restored():
        engine = sglang.Engine(model_path=str(model_path), **{**CPU_ENGINE_ARGS, **overrides})
        try:
            yield engine
        finally:
            engine.shutdown()
            # sglang.Engine also registers shutdown() with atexit; run again at interpreter exit it logs to the
            # streams pytest has closed by then ("--- Logging error ---" after the summary).
            atexit.unregister(engine.shutdown)


@contextmanager
def running_server(model_path: Path, extra_flags: list[str] = (), timeout_s: float = 180.0, deep_checks: bool = False):
    """`python -m sglang.launch_server` on CPU as a child process; yields its base URL; always terminated
    (``KVZAP_KEEP_SERVER_LOG=1`` keeps its log file). ``deep_checks``: the idle self-check also recounts the whole
    store (``KVZAP_CHECK_INVARIANTS=1``, set for that server only)."""
    keep_log = bool(os.environ.get("KVZAP_KEEP_SERVER_LOG"))
    env = {"KVZAP_CHECK_INVARIANTS": "1"} if deep_checks else None
    with launched_server(model_path, [*CPU_SERVER_FLAGS, *extra_flags], timeout_s, keep_log=keep_log, env=env) as url:
        yield url


@functools.lru_cache(maxsize=1)
def _hf_model(model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()


def hf_greedy_ids(model_path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with HF transformers (bf16, SDPA), the reference SGLang must match."""
    import torch

    model = _hf_model(model_path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2
        )
    return out[0, len(prompt_ids) :].tolist()


# bf16 greedy decoding can meet exact ties: on an AMX (Sapphire Rapids) host, HF's bf16 log-probs of " Paris" and "*"
# after "The capital of France is" are both -1.730 (fp32: 0.023 apart), so which one wins depends on the kernels'
# summation order. A tie that wide is numerical noise, not a difference between two implementations.
TIE_NATS = 0.05


def greedy_mismatch(model_path: Path, prompt_ids: list[int], output_ids: list[int], reference_ids: list[int]) -> str | None:
    """``None`` when ``output_ids`` equal the reference greedy ``reference_ids`` up to their first position where the
    reference's own log-probs put both chosen tokens within ``TIE_NATS`` (after that the contexts differ); else why
    not. Without such a tie, any difference is reported."""
    import torch

    same = next((i for i, (a, b) in enumerate(zip(output_ids, reference_ids)) if a != b), None)
    if same is None:
        return None if len(output_ids) == len(reference_ids) else f"lengths differ: {output_ids} vs {reference_ids}"
    with torch.no_grad():
        logits = _hf_model(model_path)(torch.tensor([prompt_ids + reference_ids[:same]])).logits[0, -1].float()
    logprobs = logits.log_softmax(-1)
    gap = float(logprobs[reference_ids[same]] - logprobs[output_ids[same]])
    if abs(gap) <= TIE_NATS:
        print(f"greedy tie at output position {same}: tokens {reference_ids[same]} and {output_ids[same]} are "
              f"{gap:.3f} nats apart under the reference; outputs agree before it")
        return None
    return f"output {output_ids} differs from the reference {reference_ids} at position {same} by {gap:.3f} nats"


@pytest.fixture(scope="session")
def greedy_check():
    return greedy_mismatch


# Test modules cannot import this conftest (pytest imports it under its own name), so the helpers are fixtures.
@pytest.fixture(scope="session")
def engine_factory():
    return running_engine


@pytest.fixture(scope="session")
def server_factory():
    return running_server


@pytest.fixture(scope="session")
def hf_greedy():
    return hf_greedy_ids


def make_constant_surrogate(folder: Path, head_scores: list[float], num_layers: int = 30, hidden: int = 576) -> Path:
    """A real KVzap-Linear checkpoint (kvpress layout) whose weights are 0 and whose bias is ``head_scores``: every
    token of every layer scores ``head_scores[h]`` on KV head ``h``. Pruning outcomes are then known exactly."""
    import torch

    from kvzap_sglang.surrogate import KVzapConfig, KVzapSurrogate

    surrogate = KVzapSurrogate(KVzapConfig(input_dim=hidden, output_dim=len(head_scores), n_modules=num_layers))
    with torch.no_grad():
        for layer in surrogate.layers:
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor(head_scores))
    return surrogate.save_pretrained(folder)


@pytest.fixture(scope="session")
def head0_surrogate(tmp_path_factory):
    """Scores 0, 1, 2 on KV heads 0, 1, 2: with τ = 0.5 exactly KV head 0 is pruned outside the window."""
    return make_constant_surrogate(tmp_path_factory.mktemp("surrogate") / "head0", [0.0, 1.0, 2.0])


@pytest.fixture(scope="session")
def surrogate_factory():
    return make_constant_surrogate
