"""The calibration loop inside the real HTTP server (CPU, SmolLM2, bundled MLP surrogate, the real Redis).

One server per module, started with ``--kvzap-redis-url`` pointing at a loopback TCP relay to the real Redis at
127.0.0.1:6379 (unique key prefix, deleted afterwards). Closing the relay is the injected failure: its port then
refuses connections exactly like a Redis that went away, without mocking anything in the server.

Checked: every finished request (sample rate 1) lands in Redis as a summary whose removed fraction at the
server's τ equals the one ``meta_info`` reports; a τ written to Redis is applied within a few seconds and new
requests are pruned at it (exactly as the earlier summary predicts); with Redis unreachable the server keeps
serving at the last known τ and follows Redis again once it is back. Start-up validation of the calibration
flags / Engine kwargs runs without a server.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid

import pytest
import requests

from calibrator.sample_store import SampleStore
from calibrator.series import SeriesKey, connect, delete_prefix
from calibrator.summary import ScoreSummary, removed_fraction_at
from calibrator.threshold_store import ThresholdRecord, ThresholdStore
from kvzap_sglang.plugin.settings import CalibrationSettings, KVzapConfigError

REDIS = ("127.0.0.1", 6379)
MODEL, TASK, WINDOW = "smollm2-135m", "calib-test", 16
TAU_START, TAU_LIVE, TAU_WHILE_AWAY = -4.5, -3.0, -5.0  # bin edges: histogram predictions are exact there
POLL_S = 0.5

pytestmark = pytest.mark.engine  # starts the real SGLang server: deselect with -m 'not engine'


@pytest.fixture(autouse=True)
def kvzap_env_restored():
    saved = {k: v for k, v in os.environ.items() if k.startswith("KVZAP_")}
    yield
    for key in [k for k in os.environ if k.startswith("KVZAP_")]:
        del os.environ[key]
    os.environ.update(saved)


# ---------------------------------------------------------------------------- start-up validation (no server)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(redis_url="http://127.0.0.1:6379"), "redis url"),
        (dict(redis_url="127.0.0.1:6379"), "redis url"),
        (dict(redis_url="redis://h:notaport/0"), "could not be cast to integer"),
        (dict(redis_url="redis://h:99999/0"), "out of range"),
        (dict(redis_url="redis://h:6379/zero"), "database must be a number"),
        (dict(redis_url="redis://h:6379/0?db=abc"), "Invalid value for 'db'"),
        (dict(redis_url="redis://h:6379/0?foo=bar"), "unexpected keyword argument 'foo'"),
        (dict(redis_url="redis://h", sample_rate=1.5), "sample rate"),
        (dict(redis_url="redis://h", sample_rate=-0.1), "sample rate"),
        (dict(redis_url="redis://h", tau_poll_s=0), "poll"),
        (dict(redis_url="redis://h", tau_poll_s=float("inf")), "poll"),
        (dict(redis_url="redis://h", task="two words"), "task"),
        (dict(redis_url="redis://h", model_id="a b"), "model id"),
    ],
)
def test_calibration_settings_reject_bad_values(fields, message):
    with pytest.raises(KVzapConfigError, match=message):
        CalibrationSettings(**fields)


def test_calibration_settings_from_env_parse_and_default():
    env = {"KVZAP_REDIS_URL": "redis://127.0.0.1:6379/0", "KVZAP_SAMPLE_RATE": "0.5", "KVZAP_TAU_POLL_S": "3"}
    assert CalibrationSettings.from_env(env, task="chat") == CalibrationSettings(
        "redis://127.0.0.1:6379/0", sample_rate=0.5, task="chat", tau_poll_s=3.0
    )
    assert CalibrationSettings.from_env({}) is None  # no Redis URL: no sampling, fixed τ
    with pytest.raises(KVzapConfigError, match="sample rate must be a number"):
        CalibrationSettings.from_env({**env, "KVZAP_SAMPLE_RATE": "often"})


@pytest.fixture(scope="module")
def plugins_loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the real entry point, as SGLang runs it in the launching process


def _parse(model_path, *flags):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", str(model_path), "--device", "cpu", "--attention-backend",
                                "torch_native", *flags])  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kvzap-threshold", "-4", "--kvzap-redis-url", "http://127.0.0.1:6379"], "redis url"),
        (["--kvzap-threshold", "-4", "--kvzap-redis-url", "redis://h", "--kvzap-sample-rate", "2"], "sample rate"),
        (["--kvzap-threshold", "-4", "--kvzap-redis-url", "redis://h", "--kvzap-tau-poll-s", "0"], "poll"),
        (["--kvzap-threshold", "-4", "--kvzap-sample-rate", "0.5"], "need a calibration Redis"),
        (["--kvzap-redis-url", "redis://127.0.0.1:6379/0"], "only apply with KVzap on"),
    ],
)
def test_cli_rejects_bad_calibration_flags_with_exit_2(plugins_loaded, smollm2_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        _parse(smollm2_path, *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert CalibrationSettings.from_env() is None  # nothing exported for a scheduler to pick up


def test_cli_without_redis_py_fails_fast_with_the_install_hint(plugins_loaded, smollm2_path, capsys, monkeypatch):
    """Injected failure: ``sys.modules["redis"] = None`` stands in for an install without the ``service`` extra
    (redis-py absent). Every scheduler used to stop at start-up on an ImportError traceback instead."""
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(SystemExit) as exit_info:
        _parse(smollm2_path, "--kvzap-threshold", "-4", "--kvzap-redis-url", "redis://127.0.0.1:6379/0")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs the redis package" in err and "kvzap-sglang[service]" in err, err
    assert CalibrationSettings.from_env() is None


def test_cli_validates_calibration_env_when_kvzap_is_on_by_env(plugins_loaded, smollm2_path, capsys, monkeypatch):
    for key, value in {"KVZAP_THRESHOLD": "-4", "KVZAP_REDIS_URL": "redis://h", "KVZAP_SAMPLE_RATE": "3"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        _parse(smollm2_path)
    assert exit_info.value.code == 2 and "sample rate" in capsys.readouterr().err


def test_cli_exports_calibration_settings_with_the_model_folder_as_id(plugins_loaded, smollm2_path):
    _parse(smollm2_path, "--kvzap-threshold", "-4", "--kvzap-redis-url", "redis://127.0.0.1:6379/3",
           "--kvzap-sample-rate", "0.5", "--kvzap-task", "chat")  # fmt: skip
    assert CalibrationSettings.from_env() == CalibrationSettings(
        "redis://127.0.0.1:6379/3", sample_rate=0.5, task="chat", model_id=smollm2_path.name
    )
    assert smollm2_path.name == MODEL  # the embedded model's converted folder


def test_engine_kwargs_are_validated_before_anything_is_exported(plugins_loaded, smollm2_path):
    from sglang.srt.entrypoints import engine

    base = dict(model_path=str(smollm2_path), device="cpu", attention_backend="torch_native")
    with pytest.raises(KVzapConfigError, match="sample rate"):
        engine.Engine.server_args_class(**base, kvzap_threshold=-4, kvzap_redis_url="redis://h", kvzap_sample_rate=7)
    with pytest.raises(KVzapConfigError, match="only apply with KVzap on"):
        engine.Engine.server_args_class(**base, kvzap_redis_url="redis://127.0.0.1:6379/0")
    assert CalibrationSettings.from_env() is None
    engine.Engine.server_args_class(**base, kvzap_threshold=-4, kvzap_redis_url="redis://127.0.0.1:6379/0")
    assert CalibrationSettings.from_env().model_id == MODEL


# ---------------------------------------------------------------------------- the loop in a real server


class RedisRelay:
    """Loopback TCP relay to the real Redis. ``close()`` is the injected failure: the port refuses connections and
    the server's open connections drop, as when Redis goes away; ``open()`` brings the same port back."""

    def __init__(self, target=REDIS) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> RedisRelay:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="module")
def redis_client():
    client = connect(f"redis://{REDIS[0]}:{REDIS[1]}/0")
    client.ping()
    return client


@pytest.fixture(scope="module")
def loop(smollm2_path, server_factory, redis_client):
    """(server URL, relay, key prefix) of a KVzap server sampling every request into Redis."""
    prefix = f"kvzap-test-{uuid.uuid4().hex[:12]}:"
    relay = RedisRelay().open()
    # Radix cache off: the same prompt is sent again after a τ change and must be decided afresh at the new τ (with
    # the cache on, its cached prefix would keep the decisions of the old τ: docs/design.md, prefix sharing).
    flags = ["--disable-radix-cache", "--kvzap-threshold", str(TAU_START), "--kvzap-window", str(WINDOW),
             "--kvzap-redis-url", f"redis://127.0.0.1:{relay.port}/0", "--kvzap-redis-prefix", prefix,
             "--kvzap-sample-rate", "1", "--kvzap-task", TASK, "--kvzap-tau-poll-s", str(POLL_S)]  # fmt: skip
    try:
        with server_factory(smollm2_path, flags) as url:
            yield url, relay, prefix
    finally:
        relay.close()
        delete_prefix(redis_client, prefix)


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    """Three short prompts (retrieval, prose, code) of distinct lengths, all longer than the window."""
    from transformers import AutoTokenizer

    from kvzap_sglang.prompts import TASKS, make_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    return [make_prompt(task, tokenizer, 120 + 40 * i, seed=3).text for i, task in enumerate(TASKS)]


def generate(url: str, text: str) -> dict:
    body = {"text": text, "sampling_params": {"temperature": 0.0, "max_new_tokens": 2}}
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["meta_info"]["kvzap"]


def state(url: str) -> dict:
    internal = requests.get(f"{url}/server_info", timeout=60).json()["internal_states"][0]
    return {"tau": internal["kvzap"]["threshold"], **internal["kvzap_calibration"]}


def wait_for(predicate, timeout_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def stored_summaries(redis_client, prefix: str) -> list[ScoreSummary]:
    return SampleStore(redis_client, prefix).raw(SeriesKey(MODEL, TASK, "default"), count=1000)


def set_tau(redis_client, prefix: str, tau: float) -> None:
    ThresholdStore(redis_client, prefix).put(ThresholdRecord(model=MODEL, task=TASK, tau=tau, source="manual"))


def test_the_plugins_torch_histogram_is_the_calibrators_exactly():
    """The plugin counts a request's scores with torch (``bucket_counts``) instead of ``summarize``'s numpy path;
    both must put every score, on an edge, next to one, out of range, infinite or NaN, in the same bucket."""
    import numpy as np
    import torch

    from calibrator.bins import EDGES
    from calibrator.summary import summarize
    from kvzap_sglang.plugin.calibration import bucket_counts

    edges = torch.from_numpy(EDGES.astype(np.float32))  # a copy: EDGES is read-only
    special = torch.cat([edges, torch.nextafter(edges, torch.full_like(edges, -np.inf)),
                         torch.nextafter(edges, torch.full_like(edges, np.inf)),
                         torch.tensor([-1e30, -33.0, 17.0, 1e30, -np.inf, np.inf, np.nan, -0.0, 0.0])])  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        noise = (torch.randn(4000, generator=generator) * 12 - 4).to(dtype)
        values = torch.cat([special.to(dtype), noise])
        scores = values[: len(values) // 6 * 6].reshape(-1, 2, 3)  # [T, L, H], as the store keeps them
        reference = summarize(scores.permute(1, 2, 0).float().numpy(), 0, model="m", task="t").dense_counts()
        assert np.array_equal(bucket_counts(scores), reference), dtype


def test_finished_requests_are_summarised_into_redis_matching_meta_info(loop, prompts, redis_client):
    url, _, prefix = loop
    assert state(url)["tau"] == TAU_START
    figures = [generate(url, text) for text in prompts]
    summaries = wait_for(lambda: (s := stored_summaries(redis_client, prefix)) and len(s) >= 3 and s,
                         what="3 summaries in Redis")  # fmt: skip
    # Exactly the 3 requests: /health probes (polled every second at start-up) are not sampled.
    assert len(summaries) == 3
    assert all(s.window == WINDOW and (s.num_layers, s.num_kv_heads) == (30, 3) for s in summaries)
    reported = sorted((f["tokens"], f["removed_fraction"]) for f in figures)
    predicted = sorted((s.num_tokens, removed_fraction_at(s, TAU_START)) for s in summaries)
    assert [t for t, _ in predicted] == [t for t, _ in reported]
    assert [r for _, r in predicted] == pytest.approx([r for _, r in reported], abs=1e-12)
    assert all(0.05 < r < 0.95 for _, r in reported)  # τ prunes some but not all eligible entries
    assert SampleStore(redis_client, prefix).curves(MODEL, TASK).num_requests == 3
    # The sink counts a batch as sent once the Redis write has returned, so the counter may trail Redis briefly.
    wait_for(lambda: state(url)["samples"]["sent"] >= 3, timeout_s=5, what="the sink to count 3 sent")
    assert state(url)["samples"]["sent"] == 3


def test_tau_written_to_redis_is_applied_live(loop, prompts, redis_client):
    url, _, prefix = loop
    text = prompts[1]
    before = generate(url, text)
    summary = wait_for(lambda: next((s for s in stored_summaries(redis_client, prefix)
                                     if s.num_tokens == before["tokens"]), None), what="the request's summary")  # fmt: skip
    tau_before = state(url)["tau"]
    set_tau(redis_client, prefix, TAU_LIVE)
    written = time.monotonic()
    wait_for(lambda: state(url)["tau"] == TAU_LIVE, timeout_s=10, what="the server to apply the stored τ")
    assert time.monotonic() - written < 10 * POLL_S + 5  # a few polls, not a restart
    after = generate(url, text)
    assert tau_before != TAU_LIVE
    assert after["removed_fraction"] > before["removed_fraction"]  # higher τ removes more
    # The request is pruned at the new τ exactly as its earlier summary predicted.
    assert after["removed_fraction"] == pytest.approx(removed_fraction_at(summary, TAU_LIVE), abs=1e-12)
    assert state(url)["tau_source"] == "manual" and state(url)["tau_changes"] >= 1


def test_unreachable_redis_keeps_serving_at_the_last_tau_then_recovers(loop, prompts, redis_client):
    url, relay, prefix = loop
    set_tau(redis_client, prefix, TAU_LIVE)
    wait_for(lambda: state(url)["tau"] == TAU_LIVE, timeout_s=10, what="τ before the failure")
    # Everything offered so far is shipped before the failure, so the counters below count only this test's requests.
    wait_for(lambda: (s := state(url)["samples"])["sent"] == s["offered"], timeout_s=10, what="the sink to drain")
    relay.close()  # injected failure: Redis unreachable from the server
    try:
        set_tau(redis_client, prefix, TAU_WHILE_AWAY)  # the server cannot see this write
        wait_for(lambda: state(url)["redis_poll_failures"] >= 2, timeout_s=10, what="failed τ polls")
        sent_before = state(url)["samples"]["sent"]
        figures = [generate(url, text) for text in prompts[:2]]
        summaries = {s.num_tokens: s for s in stored_summaries(redis_client, prefix)}
        for f in figures:  # still pruned at the last known τ
            assert f["removed_fraction"] == pytest.approx(removed_fraction_at(summaries[f["tokens"]], TAU_LIVE), abs=1e-12)
        wait_for(lambda: state(url)["samples"]["dropped_send_error"] >= 2, timeout_s=10, what="dropped samples")
        now = state(url)
        assert now["tau"] == TAU_LIVE and now["samples"]["sent"] == sent_before
        assert "unavailable" in (now["redis_last_error"] or "")
    finally:
        relay.open()
    wait_for(lambda: state(url)["tau"] == TAU_WHILE_AWAY, timeout_s=15, what="τ after Redis came back")
    assert state(url)["redis_poll_failures"] == 0


def test_an_invalid_stored_tau_is_shown_and_never_applied_and_the_server_serves_on(loop, prompts, redis_client):
    """Anyone with Redis access can write the thresholds hash. A τ of 1e300 stopped the scheduler (and again at every
    restart while it stayed); ``true`` or ``"-3"`` were applied as numbers. Now each is refused with its reason in
    ``/server_info`` while the τ in use stays."""
    url, _, prefix = loop
    set_tau(redis_client, prefix, TAU_LIVE)
    wait_for(lambda: state(url)["tau"] == TAU_LIVE, timeout_s=10, what="τ before the bad records")
    hash_key, field = f"{prefix}thresholds", SeriesKey(MODEL, TASK).encode()
    record = '{"model": "%s", "task": "%s", "source": "manual", "tau": %s}'
    for tau in ("1e300", "-1e39", "true", '"-3.5"'):
        redis_client.hset(hash_key, field, record % (MODEL, TASK, tau))
        time.sleep(4 * POLL_S)  # a few polls
        now = state(url)
        assert now["tau"] == TAU_LIVE and "unreadable" in (now["stored_record_error"] or ""), (tau, now)
        assert generate(url, prompts[0])["tokens"] > 0
    # The series this server's samples land in, (model, task, default), decides before (model, task).
    store = ThresholdStore(redis_client, prefix)
    store.put(ThresholdRecord(model=MODEL, task=TASK, tenant="default", tau=TAU_START, source="manual"))
    try:
        wait_for(lambda: state(url)["tau"] == TAU_START, timeout_s=10, what="the default tenant's τ")
        assert state(url)["stored_record_error"] is None
    finally:
        redis_client.hdel(hash_key, SeriesKey(MODEL, TASK, "default").encode())
        set_tau(redis_client, prefix, TAU_LIVE)
