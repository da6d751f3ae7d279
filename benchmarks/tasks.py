"""Offline RULER-style task generators for the fidelity benchmark, deterministic by (task, target length, seed).

Each sample is split the way kvpress's ``evaluate.py`` splits RULER samples: a **context** (prunable: it is
prefilled densely and then compressed) and a **question** (never pruned: it is asked after compression, so
pruning is query-agnostic). The answer prefix opens the assistant turn, as in RULER.

Tasks (RULER names where they exist; templates follow RULER's, the haystacks are texts found on every machine,
so nothing is downloaded):

* ``niah_single`` — one magic-number needle in the GPL-3 essay haystack (RULER preamble + answer prefix).
* ``niah_multikey`` — four needles with distinct keys (three distractors); one key is asked.
* ``niah_multivalue`` — four numbers for the same key, all asked for.
* ``vt`` — variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A`` … hidden in RULER's noise text.
* ``qa_prose`` — facts about three people written as prose sentences inside Python's language reference;
  the question asks one person's city.

Scoring is RULER's ``string_match_all``: the fraction of gold strings found (case-insensitive) in the output.
The target length counts the user message (context + question) in tokens of the given tokenizer; real lengths
are within a few tokens of it and are recorded.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvzap_sglang.prompts import RULER_NOISE, RULER_PREAMBLE

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "qa_prose")
MIN_TARGET_TOKENS = 256
GPL_PATH = Path("/usr/share/common-licenses/GPL-3")

_WORDS = (
    "apple", "badge", "cabin", "delta", "ember", "fable", "grove", "hinge", "ivory", "jewel", "knack", "lemon",
    "maple", "nectar", "olive", "pearl", "quill", "raven", "sable", "tulip", "umber", "vigor", "wheat", "yarrow",
    "zephyr", "amber", "birch", "coral", "dune", "flint", "glade", "heron", "iris", "juniper", "kelp", "lilac",
)  # fmt: skip
_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jonas", "Keiko", "Luis")
_CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Montreal", "Adelaide", "Krakow", "Valparaiso",
    "Marrakesh", "Reykjavik", "Bergen", "Cusco", "Tallinn", "Osaka",
)  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One benchmark item. ``context`` is pruned, ``question`` is not; ``answers`` are the gold strings."""

    task: str
    target_tokens: int
    seed: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int


def string_match_all(prediction: str, answers: tuple[str, ...]) -> float:
    """RULER's ``string_match_all`` for one sample: share of gold strings contained in the prediction."""
    if not answers:
        raise ValueError("a sample needs at least one gold answer")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def encode(sample: Sample, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated sample split into (context, question) as kvpress splits them.

    The user turn is ``context + "\n" + question``; everything up to the end of the context (system prompt and
    user-turn opening included) is the context, the rest (question, end of turn, assistant opening, answer
    prefix) is the question. Both halves are tokenised separately, as kvpress does.
    """
    separator = "\x00KVZAP-SPLIT\x00"
    messages = [{"role": "user", "content": f"{sample.context}{separator}\n{sample.question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    context_text, question_text = text.split(separator)
    return _ids(tokenizer, context_text), _ids(tokenizer, question_text + sample.answer_prefix)


def make_sample(task: str, tokenizer, target_tokens: int, seed: int) -> Sample:
    """Build sample ``seed`` of ``task`` whose user message is about ``target_tokens`` tokens long."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if target_tokens < MIN_TARGET_TOKENS:
        raise ValueError(f"target length must be >= {MIN_TARGET_TOKENS} tokens, got {target_tokens}")
    rng = random.Random(f"{task}:{target_tokens}:{seed}")
    return _BUILDERS[task](tokenizer, target_tokens, seed, rng)


# --- task builders -----------------------------------------------------------------------------------------


def _niah_single(tokenizer, target: int, seed: int, rng: random.Random) -> Sample:
    key, value = _key(rng), _magic_number(rng)
    return _niah(tokenizer, target, seed, rng, "niah_single", [(key, value)], key, (value,))


def _niah_multikey(tokenizer, target: int, seed: int, rng: random.Random) -> Sample:
    keys = _distinct(rng, _key, 4)
    pairs = [(key, _magic_number(rng)) for key in keys]
    asked, value = pairs[rng.randrange(4)]
    return _niah(tokenizer, target, seed, rng, "niah_multikey", pairs, asked, (value,))


def _niah_multivalue(tokenizer, target: int, seed: int, rng: random.Random) -> Sample:
    key = _key(rng)
    values = _distinct(rng, _magic_number, 4)
    return _niah(tokenizer, target, seed, rng, "niah_multivalue", [(key, v) for v in values], key, tuple(values))


def _niah(tokenizer, target, seed, rng, task, pairs, asked_key, answers) -> Sample:
    needles = [f"One of the special magic numbers for {key} is: {value}." for key, value in pairs]
    if len(answers) > 1:
        question = f"What are all the special magic numbers for {asked_key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked_key} mentioned in the provided text are"
    else:
        question = f"What is the special magic number for {asked_key} mentioned in the provided text?"
        prefix = f"The special magic number for {asked_key} mentioned in the provided text is"
    frame = f"{RULER_PREAMBLE}\n{' '.join(needles)}\n{question}"
    haystack = _window(tokenizer, _essay(), max(target - _count(tokenizer, frame), 16), rng)
    context = f"{RULER_PREAMBLE}\n{_insert(haystack, needles, rng)}"
    # A 7-digit answer is ~9 tokens for this tokenizer (one per digit); four of them with separators ~40.
    new_tokens = 16 if len(answers) == 1 else 48
    return Sample(task, target, seed, context, question, prefix, answers, new_tokens)


def _vt(tokenizer, target: int, seed: int, rng: random.Random) -> Sample:
    names = _distinct(rng, lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), 5)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    preamble = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
        f"are assigned the value {value}, they are:"
    )
    frame = f"{preamble}\n{' '.join(chain)}\n{question}"
    repeats = max(1, round((target - _count(tokenizer, frame)) / _count(tokenizer, RULER_NOISE + " ")))
    haystack = " ".join([RULER_NOISE] * repeats)
    context = f"{preamble}\n{_insert(haystack, chain, rng, ordered=True)}"
    return Sample("vt", target, seed, context, question, prefix, tuple(names), 32)


def _qa_prose(tokenizer, target: int, seed: int, rng: random.Random) -> Sample:
    people = _distinct(rng, lambda r: r.choice(_NAMES), 3)
    cities = _distinct(rng, lambda r: r.choice(_CITIES), 3)
    facts = [
        f"{person} grew up far from any harbour and, after many detours, finally settled in {city}."
        for person, city in zip(people, cities)
    ]
    asked = rng.randrange(3)
    preamble = "Read the following document carefully; a question about it follows."
    question = f"In which city did {people[asked]} finally settle, according to the document?"
    prefix = f"According to the document, {people[asked]} finally settled in"
    frame = f"{preamble}\n{' '.join(facts)}\n{question}"
    haystack = _window(tokenizer, _prose(), max(target - _count(tokenizer, frame), 16), rng)
    context = f"{preamble}\n{_insert(haystack, facts, rng)}"
    return Sample("qa_prose", target, seed, context, question, prefix, (cities[asked],), 12)


_BUILDERS: dict[str, Callable[..., Sample]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "vt": _vt,
    "qa_prose": _qa_prose,
}


# --- text helpers ------------------------------------------------------------------------------------------


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"


def _magic_number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _distinct(rng: random.Random, draw: Callable[[random.Random], str], count: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < count:
        item = draw(rng)
        if item not in seen:
            seen.append(item)
    return seen


def _insert(haystack: str, needles: list[str], rng: random.Random, ordered: bool = False) -> str:
    """Put each needle at a random sentence boundary (RULER: uniform depths); ``ordered`` keeps list order."""
    boundaries = [0] + [i + 2 for i in range(len(haystack) - 1) if haystack[i : i + 2] == ". "] + [len(haystack)]
    cuts = sorted(rng.choice(boundaries) for _ in needles)
    if not ordered:
        needles = rng.sample(needles, len(needles))
    pieces, last = [], 0
    for cut, needle in zip(cuts, needles):
        pieces += [haystack[last:cut].strip(), needle]
        last = cut
    pieces.append(haystack[last:].strip())
    return " ".join(piece for piece in pieces if piece)


def _window(tokenizer, stream: str, num_tokens: int, rng: random.Random) -> str:
    """About ``num_tokens`` tokens of ``stream`` from a seed-chosen sentence start, wrapping around the end."""
    start = stream.find(". ", rng.randrange(len(stream)))
    start = start + 2 if start >= 0 else 0
    span = num_tokens * 8 + 256  # characters: comfortably more than num_tokens of English text
    text = (stream[start:] + " " + stream * (1 + span // len(stream)))[:span]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids).strip()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _count(tokenizer, text: str) -> int:
    return len(_ids(tokenizer, text))


@functools.cache
def _essay() -> str:
    """RULER's essay haystack stands in as the GPL-3 text (whitespace collapsed), else Python's reference."""
    return " ".join((GPL_PATH.read_text() if GPL_PATH.is_file() else _prose()).split())


@functools.cache
def _prose() -> str:
    from pydoc_data.topics import topics

    return " ".join(" ".join(topics[name].split()) for name in sorted(topics))


def make_shared_document(tokenizer, target_tokens: int, num_questions: int, seed: int) -> tuple[str, list[Sample]]:
    """One RULER-style document of about ``target_tokens`` tokens holding ``num_questions`` needles, and one
    single-key retrieval sample per needle (same ``context``, different questions): the prefix-sharing workload
    (one document, many questions)."""
    if target_tokens < MIN_TARGET_TOKENS:
        raise ValueError(f"target length must be >= {MIN_TARGET_TOKENS} tokens, got {target_tokens}")
    rng = random.Random(f"shared:{target_tokens}:{num_questions}:{seed}")
    keys = _distinct(rng, _key, num_questions)
    pairs = [(key, _magic_number(rng)) for key in keys]
    needles = [f"One of the special magic numbers for {key} is: {value}." for key, value in pairs]
    frame = f"{RULER_PREAMBLE}\n{' '.join(needles)}"
    haystack = _window(tokenizer, _essay(), max(target_tokens - _count(tokenizer, frame), 16), rng)
    context = f"{RULER_PREAMBLE}\n{_insert(haystack, needles, rng)}"
    samples = [
        Sample("niah_shared", target_tokens, seed, context,
               f"What is the special magic number for {key} mentioned in the provided text?",
               f"The special magic number for {key} mentioned in the provided text is", (value,), 16)
        for key, value in pairs
    ]  # fmt: skip
    return context, samples
