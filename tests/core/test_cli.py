"""``kvzap-sglang train`` / ``prune``: end to end on a tiny local model folder, bad input -> exit 2, one SmolLM2 run."""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the suite runs with --import-mode=importlib
from _tiny_models import tiny_llama, tiny_tokenizer  # noqa: E402

from kvzap_sglang.cli import main  # noqa: E402
from kvzap_sglang.policy import keep_mask, removed_fraction  # noqa: E402
from kvzap_sglang.prompts import make_prompt  # noqa: E402
from kvzap_sglang.scoring import score_tokens  # noqa: E402
from kvzap_sglang.surrogate import KVzapConfig, KVzapSurrogate  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A local HF folder of the tiny Llama (+ tokenizer with chat template) and a random surrogate that fits it."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama()
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    torch.manual_seed(0)
    surrogate = KVzapSurrogate(KVzapConfig(input_dim=64, output_dim=2, n_modules=2, hidden_dim=8))
    surrogate.save_pretrained(root / "surrogate")
    KVzapSurrogate(KVzapConfig(input_dim=576, output_dim=3, n_modules=30)).save_pretrained(root / "smollm2-shaped")
    return root


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_prints_the_removed_fraction_of_the_policy(tiny_folders, capsys):
    model_dir, surrogate_dir = str(tiny_folders / "model"), str(tiny_folders / "surrogate")
    code, out, _ = run(
        capsys, "prune", "--model", model_dir, "--surrogate", surrogate_dir, "--threshold", "0.0",
        "--window", "16", "--task", "prose", "--tokens", "300", "--seed", "2",
    )  # fmt: skip
    assert code == 0, out
    printed = float(re.search(r"removed fraction: ([0-9.]+)", out).group(1))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = make_prompt("prose", tokenizer, 300, 2)
    ids = torch.tensor(tokenizer(prompt.render_chat(tokenizer), add_special_tokens=False)["input_ids"])
    expected = removed_fraction(keep_mask(score_tokens(model, KVzapSurrogate.from_pretrained(surrogate_dir), ids), 0.0, 16))
    assert printed == pytest.approx(expected, abs=1e-4)
    assert 0.0 < printed < 1.0
    assert "per layer: min" in out and "layers  0- 1:" in out


@pytest.mark.parametrize("command", ["prune", "train"])
def test_a_model_folder_with_truncated_weights_exits_2_with_one_line(tiny_folders, tmp_path, capsys, command):
    """A copied model folder whose model.safetensors was cut short printed a SafetensorError traceback (review)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folders / "model", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    args = (["--surrogate", str(tiny_folders / "surrogate"), "--threshold", "0", "--tokens", "64"] if command == "prune"
            else ["--kind", "linear", "--out", str(tmp_path / "out"), "--num-prompts", "2", "--held-out-prompts", "1"])
    code, _, err = run(capsys, command, "--model", str(broken), *args)
    assert code == 2 and "cannot load the model in" in err and str(broken) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_prune_reads_a_prompt_file(tiny_folders, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The grass is green. " * 40)
    code, out, _ = run(
        capsys, "prune", "--model", str(tiny_folders / "model"), "--surrogate", str(tiny_folders / "surrogate"),
        "--threshold", "100", "--window", "0", "--prompt-file", str(prompt_file),
    )  # fmt: skip
    assert code == 0 and "removed fraction: 1.0000" in out  # every score < 100 and no window


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
        (["--window", "-1"], "--window must be >= 0"),
        (["--tokens", "3"], "--tokens must be >= 64"),
        (["--surrogate", "/nonexistent/ckpt"], "neither linear/mlp nor a checkpoint folder"),
        (["--surrogate", "{smollm2_shaped}"], "does not fit"),
        (["--surrogate", "{tiny}", "--threshold", None], "pass --threshold"),
        (["--threshold", "inf"], "--threshold must be a finite number, got inf"),
        (["--tokens", "5000"], "--tokens must be <= 4096 (the context length of"),  # the tiny Llama's context
    ],
)
def test_prune_bad_input_exits_2_with_a_message(tiny_folders, capsys, argv, message):
    options = {"--surrogate": str(tiny_folders / "surrogate"), "--threshold": "0"}
    for flag, value in zip(argv[::2], argv[1::2]):
        options[flag] = value
    named = {"{smollm2_shaped}": str(tiny_folders / "smollm2-shaped"), "{tiny}": str(tiny_folders / "surrogate")}
    flat = [part for flag, value in options.items() if value is not None for part in (flag, named.get(value, value))]
    code, _, err = run(capsys, "prune", "--model", str(tiny_folders / "model"), *flat)
    assert code == 2 and message in err, err


def test_train_linear_without_scikit_learn_fails_before_any_oracle_work(tiny_folders, tmp_path, capsys, monkeypatch):
    """Injected failure: ``sys.modules["sklearn"] = None`` stands in for an install without the ``train`` extra. The
    ImportError used to come after the oracle forwards, with a traceback."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    code, _, err = run(capsys, "train", "--model", str(tiny_folders / "model"), "--kind", "linear",
                       "--out", str(tmp_path / "out"), "--num-prompts", "2", "--held-out-prompts", "1")  # fmt: skip
    assert code == 2 and "needs scikit-learn" in err and "kvzap-sglang[train]" in err, err
    assert not (tmp_path / "out").exists()


def test_prune_of_an_unknown_model_names_the_model(capsys):
    """It blamed the missing bundled surrogate of 'nosuch' first, and suggested training one for it."""
    code, _, err = run(capsys, "prune", "--model", "nosuch")
    assert code == 2 and "unknown model 'nosuch'" in err and "surrogate" not in err, err


def test_prune_refuses_a_prompt_file_longer_than_the_context(tiny_folders, tmp_path, capsys):
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text("The grass is green. " * 1000)  # ~5000 tokens, past the tiny Llama's 4096
    code, _, err = run(
        capsys, "prune", "--model", str(tiny_folders / "model"), "--surrogate", str(tiny_folders / "surrogate"),
        "--threshold", "0", "--prompt-file", str(prompt_file),
    )  # fmt: skip
    assert code == 2 and "more than the context length 4096" in err and str(prompt_file) in err, err


def _set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _nan_weight(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["layers.0.2.bias"][0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda folder: _set_config(folder, input_dim=None), "config.json: input_dim must be an integer >= 1"),
        (lambda folder: (folder / "config.json").write_text("[1]"), "config.json: expected a JSON object"),
        (lambda folder: _set_config(folder, output_dim=-2), "config.json: output_dim must be an integer >= 1"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b"garbage!" * 8), "model.safetensors: not a readable"),
        (_nan_weight, "model.safetensors: layers.0.2.bias holds NaN or infinite values"),
    ],
    ids=["null input_dim", "config list", "negative output_dim", "garbage weights", "NaN weight"],
)
def test_prune_with_a_malformed_checkpoint_exits_2_naming_the_file(tiny_folders, tmp_path, capsys, corrupt, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_folders / "surrogate", folder)
    corrupt(folder)
    code, _, err = run(capsys, "prune", "--model", str(tiny_folders / "model"), "--surrogate", str(folder), "--threshold", "0")
    assert code == 2 and f"{folder}/{message}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content, message", [(b"  \n", "is empty"), (b"\xff\xfe not utf-8", "is not UTF-8 text"),
                                              (None, "is a folder, not a file")])  # fmt: skip
def test_a_bad_prompt_file_is_refused_before_the_model_loads(tmp_path, capsys, content, message):
    """The model named does not exist: the prompt file's error must come first (it came after loading the model)."""
    path = tmp_path / "prompt.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, _, err = run(capsys, "prune", "--model", str(tmp_path / "no-model"), "--prompt-file", str(path))
    assert code == 2 and f"prompt file {path} {message}" in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--out", "{file}"], "exists and is not a folder"),
        (["--out", "{file}/sub"], "cannot be created"),
        (["--out", ""], "--out must name the checkpoint's folder"),
        (["--out", "."], "--out must name the checkpoint's folder"),
    ],
)
def test_train_refuses_bad_arguments_before_any_work(tmp_path, capsys, argv, message):
    """A missing model would be the first thing training trips on: the argument error must come before it."""
    (tmp_path / "file").write_text("keep me")
    argv = [part.replace("{file}", str(tmp_path / "file")) for part in argv]
    options = {"--out": str(tmp_path / "out"), **dict(zip(argv[::2], argv[1::2]))}
    flat = [part for pair in options.items() for part in pair]
    code, _, err = run(capsys, "train", "--model", str(tmp_path / "no-model"), "--kind", "mlp", *flat)
    assert code == 2 and message in err, err
    assert (tmp_path / "file").read_text() == "keep me" and not (tmp_path / "out").exists()


def test_unknown_choices_exit_2(capsys):
    for argv in (["prune", "--task", "poetry"], ["train", "--kind", "tree", "--out", "x"], ["prune", "--surrogate"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    capsys.readouterr()


def test_train_rejects_bad_counts_before_loading_anything(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--kind", "linear", "--out", str(tmp_path), "--num-prompts", "0")
    assert code == 2 and "num-prompts must be >= 1" in err


def test_train_end_to_end_on_a_local_folder(tiny_folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVZAP_CACHE_DIR", str(tmp_path / "cache"))
    out_dir = tmp_path / "mlp"
    code, out, _ = run(
        capsys, "train", "--model", str(tiny_folders / "model"), "--kind", "mlp", "--out", str(out_dir),
        "--num-prompts", "2", "--held-out-prompts", "1", "--positions", "30", "--epochs", "1",
    )  # fmt: skip
    assert code == 0 and "held-out R² per layer:" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["data"]["train_rows"] == 60 and metrics["kind"] == "mlp"
    assert KVzapSurrogate.from_pretrained(out_dir).config.hidden_dim == 8  # D / 8


def test_prune_on_the_real_smollm2_with_the_bundled_surrogate(smollm2_path, capsys):
    """The one test that runs the real model: a short generated prompt through the default path."""
    code, out, err = run(capsys, "prune", "--task", "retrieval", "--tokens", "300")
    assert code == 0, err
    fraction = float(re.search(r"removed fraction: ([0-9.]+)", out).group(1))
    # 30 layers × 3 heads; the last 128 of ~330 tokens are protected, so at most ~61 % can go.
    assert 0.0 < fraction < 0.62
    assert "30 layers × 3 KV heads" in out


@pytest.mark.parametrize("flags, message", [(["--timeout", "inf"], "--timeout: must be in (0, 3600]"),
                                           (["--timeout", "-1"], "--timeout: must be in (0, 3600]"),
                                           (["--url", "notaurl"], "--url: must be an http(s) URL"),
                                           (["--url", "ftp://x"], "--url: must be an http(s) URL")])  # fmt: skip
def test_status_with_a_bad_timeout_or_url_exits_2_with_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["status", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_status_of_an_unreachable_server_exits_1_with_the_reason(capsys):
    from kvzap_sglang.plugin.server_process import free_port

    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.fixture
def fake_server():
    """A real local HTTP server answering ``/server_info`` with ``fake_server.body`` (set by the test)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            server.authorization = self.headers.get("Authorization")
            payload = json.dumps(server.body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


KVZAP_STATE = {"threshold": -4.0, "window": 128, "surrogate": "mlp", "cells_total": 1000, "cells_in_use": 10,
               "cells_cached": 4, "removed_fraction": 0.25, "requests_finished": 3}  # fmt: skip
TENANT = {"threshold": -4.0, "threshold_base": -4.5, "window": 64, "cells_held": 5, "budget_cells": None,
          "queued_requests": 0, "refused_requests": 1, "removed_fraction": 0.5}  # fmt: skip


def test_status_prints_a_kvzap_servers_figures(fake_server, capsys):
    fake_server.body = {"internal_states": [{"kvzap": {**KVZAP_STATE, "tenants": {"alice": TENANT}}}]}
    code, out, err = run(capsys, "status", "--url", fake_server.url, "--timeout", "5")
    assert code == 0, err
    assert "τ -4.0  window 128  surrogate mlp  cells 10/1000 in use (4 cached)" in out
    assert re.search(r"alice\s+-4.000\s+-4.500\s+64\s+5\s+-\s+0\s+1\s+0.500", out), out


def test_status_sends_the_admin_key_from_the_environment_and_says_when_tenants_are_hidden(fake_server, capsys,
                                                                                       monkeypatch):
    """A server with --kvzap-tenants shows per-tenant figures to its admin key only; the key comes from
    $KVZAP_ADMIN_API_KEY (or --admin-api-key), and without it the output says the tenants are hidden."""
    hidden = "per-tenant figures are shown to the admin API key only"
    fake_server.body = {"internal_states": [{"kvzap": {**KVZAP_STATE, "tenants_hidden": hidden}}]}
    monkeypatch.delenv("KVZAP_ADMIN_API_KEY", raising=False)
    code, out, err = run(capsys, "status", "--url", fake_server.url)
    assert code == 0 and "tenants: hidden without the admin key" in out, (out, err)
    assert fake_server.authorization is None
    monkeypatch.setenv("KVZAP_ADMIN_API_KEY", "admin-secret")
    assert run(capsys, "status", "--url", fake_server.url)[0] == 0
    assert fake_server.authorization == "Bearer admin-secret"
    run(capsys, "status", "--url", fake_server.url, "--admin-api-key", "other")
    assert fake_server.authorization == "Bearer other"


@pytest.mark.parametrize(
    "body, problem",
    [
        ([KVZAP_STATE], "a JSON list instead of an object"),
        ({"internal_states": [None]}, "internal_states is [None], not a list of objects"),
        ({"internal_states": {"kvzap": 1}}, "internal_states is {'kvzap': 1}, not a list of objects"),
        ({"internal_states": [{"kvzap": [1]}]}, "kvzap state is list, not an object"),
        ({"internal_states": [{"kvzap": {"threshold": -4.0}}]}, "kvzap state has no 'window'"),
        ({"internal_states": [{"kvzap": {**KVZAP_STATE, "removed_fraction": None}}]}, "kvzap state 'removed_fraction' is None"),
        ({"internal_states": [{"kvzap": {**KVZAP_STATE, "cells_cached": None}}]}, "kvzap state 'cells_cached' is None"),
        ({"internal_states": [{"kvzap": {**KVZAP_STATE, "window": True}}]}, "kvzap state 'window' is True"),
        ({"internal_states": [{"kvzap": {**KVZAP_STATE, "tenants": [TENANT]}}]}, "kvzap tenants is not an object"),
        ({"internal_states": [{"kvzap": {**KVZAP_STATE, "tenants": {"bob": {**TENANT, "threshold_base": None}}}}]},
         "kvzap tenant 'bob' 'threshold_base' is None"),
        ({"internal_states": [{"kvzap": {**KVZAP_STATE, "tenants": {"bob": {"threshold": -4.0}}}}]},
         "kvzap tenant 'bob' has no 'window'"),
    ],
)
def test_status_of_a_server_with_an_odd_reply_exits_1_with_one_line(fake_server, capsys, body, problem):
    fake_server.body = body
    for json_flag in ([], ["--json"]):
        code, out, err = run(capsys, "status", "--url", fake_server.url, "--timeout", "5", *json_flag)
        assert code == 1 and out == "", out
        assert err == f"error: {fake_server.url}/server_info replied with something a KVzap server does not send: {problem}\n"


def test_status_of_a_server_without_kvzap_still_says_so(fake_server, capsys):
    fake_server.body = {"internal_states": [{"last_gen_throughput": 1.0}]}
    assert main(["status", "--url", fake_server.url, "--timeout", "5"]) == 1
    assert "does not run KVzap" in capsys.readouterr().err
