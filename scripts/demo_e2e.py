"""End-to-end KVzap demo (the README's main job): traffic → calibration → live τ → measured memory.

With no manual step, on the embedded SmolLM2-135M-Instruct (CPU):

1. starts the calibration service (``uvicorn service.app:app``, loopback, free port, its own Redis key prefix and a
   throw-away admin key) and the SGLang server with KVzap (bundled MLP surrogate, default τ, sampling every request
   into the service's Redis, polling τ every second);
2. sends a batch of mixed ~1k-token requests (retrieval / prose / code from ``kvzap_sglang.prompts``);
3. calls ``POST /calibrate`` for the target removed fraction (``min_samples`` = the batch size, below the
   service's default of 20 so that a small batch suffices), which stores τ in Redis;
4. waits for the server's watcher to apply that τ live (no restart), sends held-out requests (other seeds), and
5. prints target vs achieved removed fraction (from each request's ``meta_info["kvzap"]``), τ before/after and the
   KV memory held — then stops both servers (also on Ctrl-C or an error) and deletes its Redis keys.

    .venv/bin/python scripts/demo_e2e.py [--target 0.6] [--calibration-requests 12] [--check-requests 6]

Exit status: 0 when every step ran, 1 with a message naming the failed step (logs are kept then), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it, too

MODEL = "smollm2-135m"
TASK = "demo"
TASKS = ("retrieval", "prose", "code")
CPU_SERVER_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native",
    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
    "--dtype", "bfloat16",
    "--page-size", "1", "--max-total-tokens", "16384", "--mem-fraction-static", "0.3", "--skip-server-warmup",
    "--random-seed", "0", "--log-level", "info", "--host", "127.0.0.1",
]  # fmt: skip
HELD_OUT_SEED = 1000  # check-batch seeds start here: no prompt of the calibration batch is reused


class DemoError(RuntimeError):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Outcome:
    """One request's KVzap figures from ``meta_info["kvzap"]``."""

    task: str
    tokens: int
    removed_fraction: float
    cells_held: int
    cells_full: int


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def child_process(name: str, cmd: list[str], env: dict[str, str], logs: dict[str, Path]):
    """A child in its own process group; on exit SIGTERM, then SIGKILL for anything left in the group."""
    log_path = Path(tempfile.mkstemp(prefix=f"kvzap-demo-{name}-", suffix=".log")[1])
    logs[name] = log_path
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # SGLang drains and stops its scheduler/detokenizer on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the group still holds (the group id is the child's pid)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_healthy(proc: subprocess.Popen, url: str, name: str, log: Path, timeout_s: float) -> float:
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise DemoError(f"{name} exited with status {proc.returncode} while starting:\n{tail(log)}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        if time.monotonic() - started > timeout_s:
            raise DemoError(f"{name} not healthy after {timeout_s:.0f} s:\n{tail(log)}")
        time.sleep(0.5)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without KVzap settings (a stray KVZAP_* variable must not reconfigure the demo's servers);
    the model cache and venv locations stay."""
    keep = ("KVZAP_CACHE_DIR", "KVZAP_VENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVZAP_") or k in keep}
    return {**env, **extra}


# ---------------------------------------------------------------------------- traffic


def build_prompts(model_path: Path, per_task: int, tokens: int, first_seed: int) -> list[tuple[str, str]]:
    """``per_task`` chat-formatted prompts of each task, interleaved: ``[(task, text)]``."""
    from transformers import AutoTokenizer

    from kvzap_sglang.prompts import make_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = []
    for seed in range(first_seed, first_seed + per_task):
        for task in TASKS:
            prompt = make_prompt(task, tokenizer, tokens, seed=seed)
            chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
            prompts.append((task, chat + prompt.answer_prefix))
    return prompts


def server_state(url: str) -> dict:
    return requests.get(f"{url}/server_info", timeout=60).json()["internal_states"][0]


def send_batch(url: str, prompts: list[tuple[str, str]], max_new_tokens: int, concurrency: int) -> tuple[list[Outcome], int]:
    """Send every prompt (``concurrency`` at a time); returns the outcomes and the peak cells in use meanwhile."""
    peak, done = [0], threading.Event()

    def watch_cells() -> None:  # the pool's occupancy while the batch runs (finished requests free theirs)
        while not done.wait(0.5):
            try:
                peak[0] = max(peak[0], server_state(url)["kvzap"]["cells_in_use"])
            except (requests.RequestException, KeyError, ValueError):
                pass

    def one(item: tuple[str, str]) -> Outcome:
        task, text = item
        body = {"text": text, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}
        response = requests.post(f"{url}/generate", json=body, timeout=900)
        if response.status_code != 200:
            raise DemoError(f"/generate returned {response.status_code}: {response.text[:300]}")
        figures = response.json()["meta_info"].get("kvzap")
        if figures is None:
            raise DemoError("/generate returned no meta_info['kvzap']: is the KVzap plugin installed and on?")
        return Outcome(task, figures["tokens"], figures["removed_fraction"], figures["cells_held"], figures["cells_full"])

    watcher = threading.Thread(target=watch_cells, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            outcomes = list(pool.map(one, prompts))
    finally:
        done.set()
        watcher.join()
    return outcomes, peak[0]


def wait_for(predicate, timeout_s: float, what: str):
    started = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


# ---------------------------------------------------------------------------- report


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def per_task(outcomes: list[Outcome]) -> str:
    return " / ".join(f"{mean(o.removed_fraction for o in outcomes if o.task == t):.3f}" for t in TASKS)


def mib(cells: int, bytes_per_cell: int) -> str:
    return f"{cells * bytes_per_cell / 2**20:.1f} MiB"


def print_report(args, tau_before: float, fit: dict, first: list[Outcome], second: list[Outcome], peaks: tuple[int, int],
                 pool: dict, bytes_per_cell: int, pickup_s: float) -> None:  # fmt: skip
    achieved = mean(o.removed_fraction for o in second)
    rows = [
        ("", "batch 1 (calibration)", "batch 2 (held-out)"),
        ("τ (log-score)", f"{tau_before:g} (bundled default)", f"{fit['tau']:g} (calibrated, applied live)"),
        ("requests (retrieval/prose/code)", _counts(first), _counts(second)),
        ("prompt tokens, mean", f"{mean(o.tokens for o in first):.0f}", f"{mean(o.tokens for o in second):.0f}"),
        ("removed fraction, mean", f"{mean(o.removed_fraction for o in first):.3f}", f"{achieved:.3f}"),
        ("  per task (r / p / c)", per_task(first), per_task(second)),
        ("  min - max", _span(first), _span(second)),
        ("target / predicted [95% CI]", "-",
         f"{args.target:.3f} / {fit['predicted_removed_fraction']:.3f} [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]"),
        ("|achieved - target|", "-", f"{abs(achieved - args.target):.3f}"),
        ("KV held at finish / dense", _held(first, bytes_per_cell), _held(second, bytes_per_cell)),
        ("peak cells in use / pool", _peak(peaks[0], pool), _peak(peaks[1], pool)),
    ]  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    print(f"KVzap end to end: SmolLM2-135M-Instruct on CPU, calibrated on {fit['n_requests']} sampled requests "
          f"for target removed fraction {args.target:g}")  # fmt: skip
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in width))
    print(f"τ picked up by the server {pickup_s:.1f} s after /calibrate stored it (poll interval {args.tau_poll_s:g} s); "
          f"one KV cell = 1 (layer, KV head, token) entry = {bytes_per_cell} B of K+V.")  # fmt: skip


def _counts(outcomes: list[Outcome]) -> str:
    return f"{len(outcomes)} ({'/'.join(str(sum(o.task == t for o in outcomes)) for t in TASKS)})"


def _span(outcomes: list[Outcome]) -> str:
    values = [o.removed_fraction for o in outcomes]
    return f"{min(values):.3f} - {max(values):.3f}"


def _held(outcomes: list[Outcome], bytes_per_cell: int) -> str:
    held, full = sum(o.cells_held for o in outcomes), sum(o.cells_full for o in outcomes)
    return f"{mib(held, bytes_per_cell)} / {mib(full, bytes_per_cell)} ({full / max(held, 1):.2f}x smaller)"


def _peak(cells: int, pool: dict) -> str:
    return f"{cells:,} / {pool['cells_total']:,} ({cells / pool['cells_total']:.1%})"


# ---------------------------------------------------------------------------- the run


def default_tau() -> float:
    defaults = json.loads((ROOT / "kvzap_sglang/checkpoints" / MODEL / "defaults.json").read_text())
    return float(defaults["threshold"][defaults.get("surrogate", "mlp")])


def run(args: argparse.Namespace) -> int:
    from calibrator.sample_store import SampleStore
    from calibrator.series import connect
    from kvzap_sglang.models import resolve_model_path

    started = time.monotonic()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    redis = connect(args.redis_url)
    try:
        redis.ping()
    except Exception as error:  # noqa: BLE001 — any failure here means the same thing to the user
        raise DemoError(f"Redis at {args.redis_url} is unreachable ({error}); run `bash scripts/ensure-redis.sh`") from None
    prefix = f"kvzap-demo-{os.getpid()}-{secrets.token_hex(3)}:"
    admin_key = secrets.token_urlsafe(24)
    model_path = resolve_model_path(MODEL)
    tau_before = default_tau()
    step(f"model {model_path}; Redis {args.redis_url}, key prefix {prefix}")
    calibration_prompts = build_prompts(model_path, args.calibration_requests // 3, args.prompt_tokens, 0)
    check_prompts = build_prompts(model_path, args.check_requests // 3, args.prompt_tokens, HELD_OUT_SEED)
    logs: dict[str, Path] = {}
    try:
        with ExitStack() as stack:
            service_url = f"http://127.0.0.1:{free_port()}"
            service_env = clean_env(KVZAP_REDIS_URL=args.redis_url, KVZAP_REDIS_PREFIX=prefix,
                                    KVZAP_ADMIN_API_KEYS=json.dumps([admin_key]), KVZAP_KNOWN_MODELS=json.dumps([MODEL]))  # fmt: skip
            service = stack.enter_context(child_process("service", [
                sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
                "--port", service_url.rsplit(":", 1)[1], "--log-level", "warning"], service_env, logs))  # fmt: skip
            server_url = f"http://127.0.0.1:{free_port()}"
            server = stack.enter_context(child_process("sglang", [
                sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), *CPU_SERVER_FLAGS,
                "--port", server_url.rsplit(":", 1)[1],
                "--kvzap-threshold", str(tau_before), "--kvzap-surrogate", "mlp",
                "--kvzap-redis-url", args.redis_url, "--kvzap-redis-prefix", prefix, "--kvzap-sample-rate", "1",
                "--kvzap-task", TASK, "--kvzap-tau-poll-s", str(args.tau_poll_s)],
                clean_env(SGLANG_USE_CPU_ENGINE="1"), logs))  # fmt: skip
            step("starting the calibration service and the SGLang server with KVzap ...")
            up = wait_healthy(service, f"{service_url}/healthz", "calibration service", logs["service"], 120)
            step(f"calibration service up ({service_url}, {up:.1f} s)")
            up = wait_healthy(server, f"{server_url}/health", "SGLang server", logs["sglang"], args.start_timeout_s)
            state = server_state(server_url)
            if "kvzap_calibration" not in state:
                raise DemoError("the server runs without the KVzap calibration link (no kvzap_calibration state)")
            pool = state["kvzap"]
            bytes_per_cell = _bytes_per_cell(model_path)
            step(f"SGLang server up ({server_url}, {up:.1f} s), τ = {state['kvzap']['threshold']:g}")

            step(f"batch 1: {len(calibration_prompts)} mixed ~{args.prompt_tokens}-token requests ...")
            first, peak_first = send_batch(server_url, calibration_prompts, args.max_new_tokens, args.concurrency)
            step(f"batch 1 done: mean removed fraction {mean(o.removed_fraction for o in first):.3f}")
            samples = SampleStore(redis, prefix)
            wait_for(lambda: samples.curves(MODEL, TASK).num_requests >= len(first), 30, "the sampled summaries in Redis")
            step(f"{len(first)} score summaries stored in Redis; POST /calibrate target {args.target:g} ...")
            fit = calibrate(service_url, admin_key, args.target, len(first))
            tau_after = fit["tau"]
            step(f"/calibrate: τ = {tau_after:g}, predicted {fit['predicted_removed_fraction']:.3f} "
                 f"[{fit['ci_low']:.3f}, {fit['ci_high']:.3f}], p10/p90 {fit['p10']:.3f}/{fit['p90']:.3f}")  # fmt: skip
            _, pickup_s = wait_for(lambda: server_state(server_url)["kvzap"]["threshold"] == tau_after, 30,
                                   "the server to apply the calibrated τ")  # fmt: skip
            step(f"server now prunes at τ = {tau_after:g}; batch 2: {len(check_prompts)} held-out requests ...")
            second, peak_second = send_batch(server_url, check_prompts, args.max_new_tokens, args.concurrency)
            print_report(args, tau_before, fit, first, second, (peak_first, peak_second), pool, bytes_per_cell, pickup_s)
            step("stopping the servers")
    except BaseException:
        for name, path in logs.items():
            print(f"log of the {name}: {path}", file=sys.stderr)
        raise
    finally:
        _delete_keys(redis, prefix)
    for path in logs.values():
        path.unlink(missing_ok=True)
    print(f"done in {time.monotonic() - started:.0f} s; no process left running")
    return 0


def calibrate(service_url: str, admin_key: str, target: float, min_samples: int) -> dict:
    body = {"model": MODEL, "task": TASK, "target_ratio": target, "min_samples": min_samples}
    response = requests.post(f"{service_url}/calibrate", json=body, headers={"X-API-Key": admin_key}, timeout=120)
    if response.status_code != 200:
        raise DemoError(f"POST /calibrate returned {response.status_code}: {response.text[:500]}")
    result = response.json()
    return {**result["report"], "tau": result["threshold"]["tau"]}


def _bytes_per_cell(model_path: Path) -> int:
    config = json.loads((model_path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * head_dim * 2  # K and V, bf16


def _delete_keys(redis, prefix: str) -> None:
    from calibrator.series import delete_prefix

    try:
        delete_prefix(redis, prefix)
    except Exception as error:  # noqa: BLE001 — clean-up must not hide the run's own outcome
        print(f"could not delete the demo's Redis keys ({prefix}*): {error}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.6, help="target removed fraction in [0, 1) (default 0.6)")
    parser.add_argument("--calibration-requests", type=int, default=12, help="batch 1 size, a multiple of 3")
    parser.add_argument("--check-requests", type=int, default=6, help="held-out batch 2 size, a multiple of 3")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="tokens per prompt (default 1000)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--tau-poll-s", type=float, default=1.0, help="the server's τ poll interval")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--start-timeout-s", type=float, default=600.0, help="SGLang start-up limit (busy machines)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.target < 1.0:
        parser.error(f"--target must be in [0, 1), got {args.target}")
    for name in ("calibration_requests", "check_requests"):
        value = getattr(args, name)
        if value < 3 or value % 3:
            parser.error(f"--{name.replace('_', '-')} must be a positive multiple of 3 (one per task), got {value}")
    if args.prompt_tokens < 200 or args.max_new_tokens < 1 or args.concurrency < 1 or args.tau_poll_s <= 0:
        parser.error("--prompt-tokens >= 200, --max-new-tokens >= 1, --concurrency >= 1 and --tau-poll-s > 0 are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        return run(args)
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 — e.g. a server that died mid-request; the servers are stopped
        traceback.print_exc()
        print(f"\ndemo failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _interrupt(signum, frame) -> None:
    """SIGTERM / SIGHUP unwind like Ctrl-C, so the same finally blocks stop the servers."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
