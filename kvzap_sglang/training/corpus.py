"""The offline training corpus: 750–1250-token prompts built from text present on every project machine.

The paper trains on Nemotron pretraining samples (method notes §4.1), which these machines cannot download.
Substitute, in a fixed rotation so every split mixes all kinds (see :mod:`kvzap_sglang.prompts` for sources):

    1/6 retrieval, GPL-3 essay filler   (RULER niah_single-style needle, synthetic)
    1/3 prose                           (Debian license texts + Python's language reference)
    1/3 code                            (Python standard-library sources)
    1/6 retrieval, RULER noise filler   (highly repetitive text, as in RULER)

Each prompt's length is drawn uniformly in [800, 1200] tokens and must land strictly inside (750, 1250), the
paper's filter ("so attention weight denominators aren't influenced by length"). Training and held-out
prompts come from separate seed streams, so the held-out set does not change with the number of training
prompts and the split is by prompt, never by position.
"""

from __future__ import annotations

import random

from kvzap_sglang.prompts import Prompt, make_prompt

MIN_TOKENS, MAX_TOKENS = 750, 1250  # exclusive bounds, as kvpress ``load_nemotron_dataset``
TARGET_RANGE = (800, 1200)
ROTATION = (("retrieval", "essay"), ("prose", None), ("code", None), ("retrieval", "noise"), ("prose", None), ("code", None))
SPLITS = ("train", "held_out")


def corpus_prompts(tokenizer, count: int, split: str, seed: int = 0) -> list[Prompt]:
    """``count`` prompts of ``split`` ("train" or "held_out"); deterministic by (split, index, seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [_corpus_prompt(tokenizer, split, idx, seed) for idx in range(count)]


def _corpus_prompt(tokenizer, split: str, idx: int, seed: int) -> Prompt:
    task, filler = ROTATION[idx % len(ROTATION)]
    rng = random.Random(f"corpus:{split}:{seed}:{idx}")
    prompt_seed = rng.randrange(2**31)
    for _ in range(8):  # a window can fall short (e.g. at a stream boundary); redraw its length and start
        prompt = make_prompt(task, tokenizer, rng.randint(*TARGET_RANGE), prompt_seed, filler or "essay")
        if MIN_TOKENS < prompt.num_tokens < MAX_TOKENS:
            return prompt
        prompt_seed = rng.randrange(2**31)
    raise RuntimeError(f"could not build a {task} prompt within ({MIN_TOKENS}, {MAX_TOKENS}) tokens")
