"""Offline prompt generators: deterministic, close to the target length, RULER niah_single shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the suite runs with --import-mode=importlib
from _tiny_models import tiny_tokenizer  # noqa: E402

from kvzap_sglang.prompts import RULER_PREAMBLE, TASKS, make_prompt  # noqa: E402


@pytest.mark.parametrize("task", TASKS)
def test_same_arguments_give_the_same_prompt_and_seeds_differ(task):
    tokenizer = tiny_tokenizer()
    first, again = make_prompt(task, tokenizer, 400, seed=3), make_prompt(task, tokenizer, 400, seed=3)
    assert first == again
    assert make_prompt(task, tokenizer, 400, seed=4).text != first.text


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [300, 1000])
def test_length_is_close_to_the_target(task, target):
    tokenizer = tiny_tokenizer()
    for seed in range(3):
        prompt = make_prompt(task, tokenizer, target, seed)
        assert prompt.num_tokens == len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
        assert abs(prompt.num_tokens - target) <= 0.02 * target + 5, (seed, prompt.num_tokens)


@pytest.mark.parametrize("filler", ["essay", "noise"])
def test_retrieval_prompt_has_the_ruler_niah_single_shape(filler):
    tokenizer = tiny_tokenizer()
    prompt = make_prompt("retrieval", tokenizer, 600, seed=7, filler=filler)
    assert prompt.text.startswith(RULER_PREAMBLE + "\n")
    assert prompt.answer is not None and len(prompt.answer) == 7 and prompt.answer.isdigit()
    key = prompt.answer_prefix.removeprefix("The special magic number for ").split(" ")[0]
    assert prompt.text.count(f"One of the special magic numbers for {key} is: {prompt.answer}.") == 1
    assert prompt.text.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert prompt.is_correct(f"{prompt.answer_prefix} {prompt.answer}.")
    assert not prompt.is_correct("The special magic number is 1234.")
    rendered = prompt.render_chat(tokenizer)
    assert rendered.endswith("<|im_start|>assistant\n" + prompt.answer_prefix)


def test_needle_depth_varies_with_the_seed():
    tokenizer = tiny_tokenizer()
    depths = set()
    for seed in range(6):
        prompt = make_prompt("retrieval", tokenizer, 500, seed)
        depths.add(round(prompt.text.index("One of the special magic") / len(prompt.text), 1))
    assert len(depths) >= 3


def test_code_and_prose_are_windows_of_their_offline_sources():
    from kvzap_sglang.prompts import _code_stream, _prose_stream

    tokenizer = tiny_tokenizer()
    for seed in range(3):
        code = make_prompt("code", tokenizer, 800, seed).text
        prose = make_prompt("prose", tokenizer, 800, seed).text
        assert code[:300] in _code_stream() and code[:300] not in _prose_stream()
        assert prose[:300] in _prose_stream() and prose[:300] not in _code_stream()


def test_bad_arguments_are_rejected():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown task"):
        make_prompt("poetry", tokenizer, 500)
    with pytest.raises(ValueError, match="num_tokens"):
        make_prompt("prose", tokenizer, 10)
    with pytest.raises(ValueError, match="unknown filler"):
        make_prompt("retrieval", tokenizer, 500, filler="lorem")
    with pytest.raises(ValueError, match="no gold answer"):
        make_prompt("prose", tokenizer, 500).is_correct("x")
