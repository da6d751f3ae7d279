"""``kvzap-sglang train`` / ``prune``: end to end on a tiny local model folder, bad input -> exit 2, one SmolLM2 run."""

from __future__ import annotations

import json
import re
import sys
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


def test_status_of_an_unreachable_server_exits_1_with_the_reason(capsys):
    from kvzap_sglang.plugin.server_process import free_port

    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "cannot read" in capsys.readouterr().err
