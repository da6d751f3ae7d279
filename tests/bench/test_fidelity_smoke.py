"""Fidelity benchmark: task generators, mask rules, the masked reference path and a tiny end-to-end run.

The real SmolLM2 model runs at 256-token contexts only, so the whole file stays well under 90 s on 2 cores.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import baselines, fidelity
from benchmarks.tasks import TASKS, encode, make_sample, string_match_all
from kvzap_sglang.policy import keep_mask, removed_fraction

SHORT = 256


@pytest.fixture(scope="module")
def model(smollm2_path):
    from transformers import AutoModelForCausalLM

    from benchmarks import reference_pruning

    torch.set_num_threads(2)
    loaded = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, local_files_only=True).eval()
    reference_pruning.install(loaded)
    return loaded


@pytest.fixture(scope="module")
def needle_case(tokenizer, model):
    """niah_single at 256 tokens: ids, plain ``generate`` output and the dense prefill."""
    from benchmarks.reference_pruning import prefill_context

    sample = make_sample("niah_single", tokenizer, SHORT, seed=0)
    context_ids, question_ids = encode(sample, tokenizer)
    prompt = torch.tensor([context_ids + question_ids])
    with torch.inference_mode():
        generated = model.generate(prompt, max_new_tokens=sample.max_new_tokens, do_sample=False)[0, prompt.shape[1] :]
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    plain = [int(t) for t in generated]
    plain = plain[: next((i for i, t in enumerate(plain) if t in stop), len(plain))]
    return sample, context_ids, question_ids, plain, stop, prefill_context(model, torch.tensor(context_ids))


# --- generators and rules (no model) -----------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_sized_and_contain_their_answers(tokenizer, task):
    sample = make_sample(task, tokenizer, 1024, seed=3)
    assert sample == make_sample(task, tokenizer, 1024, seed=3)
    assert sample != make_sample(task, tokenizer, 1024, seed=4)
    context_ids, question_ids = encode(sample, tokenizer)
    user_tokens = len(tokenizer(sample.context + "\n" + sample.question, add_special_tokens=False)["input_ids"])
    assert abs(user_tokens - 1024) <= 0.05 * 1024
    assert all(answer in sample.context for answer in sample.answers)
    assert not any(answer in sample.question + sample.answer_prefix for answer in sample.answers)
    assert tokenizer.decode(question_ids).endswith(sample.answer_prefix)


def test_string_match_all_is_the_share_of_gold_strings_found():
    assert string_match_all("It is 123 and 456.", ("123", "456")) == 1.0
    assert string_match_all("it is ABC", ("abc", "xyz")) == 0.5
    assert string_match_all("nothing", ("1",)) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", ())


def test_bad_task_or_length_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("niah_bogus", tokenizer, 1024, 0)
    with pytest.raises(ValueError, match="target length"):
        make_sample("niah_single", tokenizer, 100, 0)


def test_global_bottom_k_hits_the_ratio_and_spares_the_window():
    scores = torch.randn(4, 3, 1000, generator=torch.Generator().manual_seed(0))
    keep = baselines.keep_lowest_removed(scores, 0.5, window=128)
    assert removed_fraction(keep) == pytest.approx(0.5, abs=1e-4)
    assert keep[..., -128:].all()
    pruned, kept = scores[..., :-128][~keep[..., :-128]], scores[..., :-128][keep[..., :-128]]
    assert pruned.max() <= kept.min()  # exactly the lowest scores go
    capped = baselines.keep_lowest_removed(scores, 0.95, window=128)
    assert removed_fraction(capped) == pytest.approx(1 - 128 / 1000, abs=1e-4)


def test_per_head_bottom_k_removes_the_same_count_in_every_head():
    scores = torch.randn(2, 3, 300, generator=torch.Generator().manual_seed(1))
    keep = baselines.keep_lowest_removed(scores, 0.25, window=16, per_head=True)
    assert ((~keep).sum(dim=-1) == 75).all()
    assert keep[..., -16:].all()


def test_streaming_llm_keeps_sinks_and_the_recent_tokens():
    keep = baselines.streaming_llm_keep((2, 3, 100), 0.5)
    assert keep[..., :4].all() and not keep[..., 4:54].any() and keep[..., 54:].all()


def test_calibrated_tau_reproduces_the_target_share():
    scores = torch.randn(30, 3, 1024, generator=torch.Generator().manual_seed(2)) * 2 - 5
    for ratio in (0.25, 0.5, 0.75):
        tau = fidelity.tau_for_ratio(scores, ratio, window=128)
        assert removed_fraction(keep_mask(scores, tau, 128)) == pytest.approx(ratio, abs=0.005)


def test_oracle_repeat_prompt_copies_the_context_text_token_for_token(tokenizer):
    sample = make_sample("niah_single", tokenizer, SHORT, seed=0)
    context_ids, _ = encode(sample, tokenizer)
    repeat = baselines.oracle_repeat_prompt(tokenizer, context_ids)
    ids = repeat.input_ids.tolist()
    assert ids[repeat.prompt] == context_ids
    copy = ids[repeat.copy]
    assert copy == context_ids[-len(copy) :] and sample.context.strip() in tokenizer.decode(copy)


def test_bad_command_line_exits_2(tmp_path, capsys):
    assert fidelity.main(["--tasks", "niah_bogus", "--out", str(tmp_path)]) == 2
    assert fidelity.main(["--methods", "full", "h2o", "--out", str(tmp_path)]) == 2
    assert fidelity.main(["--lengths", "100000", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert fidelity.main(["--backend", "server", "--methods", "oracle", "--out", str(tmp_path)]) == 2
    assert "KVzap methods only" in capsys.readouterr().err


def test_readme_section_is_replaced_without_touching_other_sections(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## service\nkeep me\n")
    fidelity.replace_section(readme, "fidelity", "first")
    fidelity.replace_section(readme, "fidelity", "second")
    text = readme.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count("<!-- fidelity:begin -->") == 1


def test_claim_lines_leave_out_tasks_the_full_cache_fails_and_flag_losses():
    def row(method, setting, task, accuracy, removed, samples=3):
        return {"method": method, "setting": setting, "task": task, "length": 2048, "samples": samples,
                "accuracy": accuracy, "removed_fraction": removed}  # fmt: skip

    summary = [row("full", "full", "niah_single", 100.0, 0.0), row("full", "full", "niah_multikey", 0.0, 0.0),
               row("full", "full", "niah_multivalue", 75.0, 0.0),
               row("kvzap_mlp", "tau=-1.900", "niah_single", 66.67, 0.7), row("kvzap_mlp", "tau=-1.900", "niah_multikey", 0.0, 0.7),
               row("kvzap_mlp", "tau=-1.900", "niah_multivalue", 75.0, 0.7),
               row("kvzap_mlp", "tau=-4.100", "niah_single", 100.0, 0.5), row("kvzap_mlp", "tau=-4.100", "niah_multivalue", 75.0, 0.5)]  # fmt: skip
    text = "\n".join(fidelity.claim_lines(summary))
    assert "niah_multikey scores 0 even with the full cache" in text
    assert "Retrieval = mean of niah_single, niah_multivalue: 87.5" in text and "16.7 pt" in text
    assert "kvzap_mlp tau=-1.900: 70 % removed, retrieval 87.5 → 70.8 (loss 16.7 pt" in text and "OUTSIDE" in text
    assert "tau=-4.100" not in text  # below 60 % removed


def test_restore_seeds_the_cache_but_never_under_another_surrogate_checkpoint(tmp_path):
    def record(method, value):
        setting = fidelity.Setting(method, value)
        return fidelity.Record(method=method, setting=setting.label, value=value, task="niah_single", length=1024, seed=0,
                               removed_fraction=0.5, score=1.0, prediction=" 1", answers=["1"], context_tokens=1030,
                               question_tokens=39, answer_seconds=1.0)  # fmt: skip

    rows = [record("full", None), record("kvzap_linear", -4.1), record("kvzap_mlp", -4.1), record("random", 0.5)]
    report = tmp_path / "fidelity.json"
    surrogates = {"kvzap_linear": {"sha256_10": "aaaa"}, "kvzap_mlp": {"sha256_10": "old"}}
    report.write_text(json.dumps({"meta": {"surrogates": surrogates}, "records": [fidelity.asdict(r) for r in rows]}))
    ids = {"kvzap_linear": "aaaa", "kvzap_mlp": "bbbb"}
    out = tmp_path / "out"
    existing = fidelity.cache_path(out, fidelity.Setting("random", 0.5), "niah_single", 1024, 0)
    existing.parent.mkdir(parents=True)
    existing.write_text("kept")

    assert fidelity.restore_cache(report, out, ids) == 2  # full and linear; the MLP's weights differ, random exists
    linear = fidelity.cache_path(out, fidelity.Setting("kvzap_linear", -4.1), "niah_single", 1024, 0, "aaaa")
    assert fidelity.Record(**json.loads(linear.read_text())) == rows[1]
    assert not fidelity.cache_path(out, fidelity.Setting("kvzap_mlp", -4.1), "niah_single", 1024, 0, "bbbb").exists()
    assert existing.read_text() == "kept"
    assert fidelity.restore_cache(report, out, ids) == 0  # idempotent

    report.write_text("{not json")
    with pytest.raises(fidelity.UsageError, match="not a fidelity.json report"):
        fidelity.restore_cache(report, out, ids)
    assert fidelity.main(["--restore", str(tmp_path / "missing.json"), "--out", str(out)]) == 2


# --- the masked reference path (real model) ----------------------------------------------------------------


def test_all_true_mask_reproduces_plain_greedy_generation(model, needle_case):
    from benchmarks.reference_pruning import answer

    sample, context_ids, question_ids, plain, stop, prefill = needle_case
    keep = torch.ones(30, 3, len(context_ids), dtype=torch.bool)
    assert answer(model, prefill, torch.tensor(question_ids), keep, sample.max_new_tokens, stop) == plain
    assert answer(model, prefill, torch.tensor(question_ids), None, sample.max_new_tokens, stop) == plain
    lengths_seen = []
    per_step = lambda cache_len: lengths_seen.append(cache_len) or keep  # noqa: E731 - the server twin's form
    assert answer(model, prefill, torch.tensor(question_ids), per_step, sample.max_new_tokens, stop) == plain
    assert lengths_seen[:2] == [len(context_ids), len(context_ids) + len(question_ids)]
    assert prefill.cache.get_seq_length() == len(context_ids)  # cropped back after each answer


def test_pruning_the_needle_everywhere_changes_the_answer(model, tokenizer, needle_case):
    from benchmarks.reference_pruning import answer

    sample, context_ids, question_ids, plain, stop, prefill = needle_case
    assert sample.answers[0] in tokenizer.decode(plain)  # the full cache finds it
    keep = torch.ones(30, 3, len(context_ids), dtype=torch.bool)
    needle = _token_span(tokenizer, context_ids, f"is: {sample.answers[0]}.")
    keep[:, :, needle] = False
    pruned = answer(model, prefill, torch.tensor(question_ids), keep, sample.max_new_tokens, stop)
    assert pruned != plain and sample.answers[0] not in tokenizer.decode(pruned)


def _token_span(tokenizer, ids: list[int], text: str) -> slice:
    """Smallest token span of ``ids`` whose decoded text contains ``text``."""
    end = next(i for i in range(len(ids) + 1) if text in tokenizer.decode(ids[:i]))
    start = next(i for i in range(end, -1, -1) if text in tokenizer.decode(ids[i:end]))
    return slice(start, end)


# --- end-to-end smoke run ----------------------------------------------------------------------------------


def test_oracle_context_check_sees_the_clipped_queries_and_nothing_else(model, tokenizer, needle_case):
    from benchmarks import oracle_context

    context_ids = needle_case[1]
    repeat = baselines.oracle_repeat_prompt(tokenizer, context_ids)
    length = int(repeat.input_ids.numel())
    copying = oracle_context.copy_accuracy(model, repeat.input_ids, repeat.copy, limit=length - 4)
    assert copying["tokens_beyond"] == 4 and copying["accuracy_whole_copy"] > 0.5  # the model copies its context
    assert oracle_context.copy_accuracy(model, repeat.input_ids, repeat.copy, limit=length) == {"tokens_beyond": 0}
    unclipped = oracle_context.ranking_change(model, repeat, limit=length, window=16)
    assert unclipped["scores_changed"] == 0 and unclipped["removed_differ_at_0.50"] == 0
    clipped = oracle_context.ranking_change(model, repeat, limit=repeat.copy.start + 8, window=16)
    assert clipped["scores_changed"] > 0.5 and clipped["removed_differ_at_0.50"] > 0  # 8 queries rank differently


def test_smoke_run_writes_results_and_full_cache_scores_what_the_model_answers(tmp_path, tokenizer, needle_case):
    sample, _, _, plain, _, _ = needle_case
    argv = ["--tasks", "niah_single", "--lengths", str(SHORT), "--seeds", "0", "--methods", "full", "streaming_llm",
            "--ratios", "0.5", "--out", str(tmp_path), "--readme", str(tmp_path / "README.md")]  # fmt: skip
    assert fidelity.main(argv) == 0
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert set(report) == {"meta", "summary", "records"}
    assert {"date", "machine", "model", "command"} <= set(report["meta"])
    assert {(r["method"], r["setting"]) for r in report["records"]} == {("full", "full"), ("streaming_llm", "r=0.50")}
    full = next(r for r in report["records"] if r["method"] == "full")
    streaming = next(r for r in report["records"] if r["method"] == "streaming_llm")
    assert full["removed_fraction"] == 0.0 and streaming["removed_fraction"] == pytest.approx(0.5, abs=0.01)
    plain_text = tokenizer.decode(plain, skip_special_tokens=True)
    assert plain_text.startswith(full["prediction"])
    assert full["score"] == string_match_all(plain_text, sample.answers) == 1.0
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2
    assert (tmp_path / "fidelity_niah_single.png").stat().st_size > 0
    assert "| full | full | 0.0 | 100 |" in (tmp_path / "README.md").read_text()
    # resumable: a second run reads the cache instead of recomputing
    mtimes = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json"))
    assert fidelity.main(argv) == 0
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")) == mtimes
    # --cached-only reports the cached part of a larger grid and computes nothing
    more_seeds = [*argv[: argv.index("--seeds") + 1], "0", "1", *argv[argv.index("--seeds") + 2 :], "--cached-only"]
    assert fidelity.main(more_seeds) == 0
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert {r["seed"] for r in report["records"]} == {0} and report["meta"]["seeds_per_length"] == {str(SHORT): [0]}
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")) == mtimes
    assert f"### {SHORT} tokens (1 sample per task and point: seeds 0)" in (tmp_path / "README.md").read_text()
    assert fidelity.main([*more_seeds[: more_seeds.index("--seeds") + 1], "5", *more_seeds[more_seeds.index("--seeds") + 3 :]]) == 2
