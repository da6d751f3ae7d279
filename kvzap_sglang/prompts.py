"""Offline prompt generators, deterministic by (task, target token length, seed, tokenizer).

Used for surrogate training, the ``prune`` demo, benchmarks and calibration. Everything is built from text
that exists on every project machine, so no data set is downloaded:

* ``retrieval`` — RULER ``niah_single``-style magic-number needle in a haystack with RULER's preamble and an
  answer prefix (the variant SmolLM2 solves 30/30 at 1–4k tokens, environment notes §5). Filler ``essay`` is
  the GNU GPL-3 text with whitespace collapsed (``/usr/share/common-licenses/GPL-3``; Python's language
  reference topics if that file is absent); filler ``noise`` is RULER's repeated "The grass is green..." text.
* ``prose`` — a window of English prose: the Debian license texts under ``/usr/share/common-licenses`` followed
  by Python's language reference (``pydoc_data.topics`` of the running interpreter's standard library).
* ``code`` — a window of the Python standard library's top-level ``*.py`` sources, in file-name order.

The seed picks the window start (snapped to a line start), the needle word, number and depth. Lengths are
exact in tokens of the given tokenizer up to boundary effects (the result's ``num_tokens`` is measured).
"""

from __future__ import annotations

import functools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

TASKS = ("retrieval", "prose", "code")
FILLERS = ("essay", "noise")
LICENSES_DIR = Path("/usr/share/common-licenses")
# Distinct texts only (GPL, LGPL and GFDL are aliases of the newest versions there).
LICENSE_NAMES = (
    "GPL-3", "GPL-2", "GPL-1", "LGPL-3", "LGPL-2.1", "LGPL-2", "Apache-2.0", "MPL-2.0", "MPL-1.1",
    "GFDL-1.3", "GFDL-1.2", "Artistic", "BSD", "CC0-1.0",
)  # fmt: skip

RULER_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
RULER_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_KEY_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "curious", "damp", "eager", "faint", "fierce", "gentle",
    "glossy", "hollow", "humble", "icy", "jolly", "keen", "lively", "loud", "mellow", "misty", "noble", "odd",
    "pale", "proud", "quiet", "rapid", "rusty", "shy", "silent", "sour", "steady", "tame", "tidy", "vast", "witty",
)  # fmt: skip
_KEY_NOUNS = (
    "anchor", "badger", "barrel", "beacon", "canyon", "castle", "cedar", "comet", "falcon", "fountain", "garden",
    "harbor", "helmet", "island", "jungle", "kettle", "lantern", "meadow", "mirror", "orchard", "otter", "parrot",
    "pebble", "pillow", "quarry", "river", "saddle", "spruce", "tavern", "thistle", "tunnel", "violin", "walnut",
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    """A user message plus what a benchmark needs to ask and grade it.

    ``text`` is the user message; ``answer_prefix`` is appended after the assistant turn opens ("" if none);
    ``answer`` is the gold string for retrieval (None otherwise); ``num_tokens`` counts ``text`` alone.
    """

    task: str
    text: str
    num_tokens: int
    seed: int
    answer: str | None = None
    answer_prefix: str = ""

    def render_chat(self, tokenizer) -> str:
        """The chat-templated request a server receives: user turn, open assistant turn, answer prefix."""
        messages = [{"role": "user", "content": self.text}]
        opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return opened + self.answer_prefix

    def is_correct(self, completion: str) -> bool:
        """Retrieval grading as RULER's ``string_match_all``: the gold number appears in the completion."""
        if self.answer is None:
            raise ValueError(f"{self.task} prompts have no gold answer")
        return self.answer.lower() in completion.lower()


def make_prompt(task: str, tokenizer, num_tokens: int, seed: int = 0, filler: str = "essay") -> Prompt:
    """Build a ``task`` prompt of about ``num_tokens`` tokens; ``filler`` applies to ``retrieval`` only."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if num_tokens < 64:
        raise ValueError(f"num_tokens must be >= 64, got {num_tokens}")
    if task == "retrieval":
        return retrieval_prompt(tokenizer, num_tokens, seed, filler)
    stream = _prose_stream() if task == "prose" else _code_stream()
    text = _token_window(tokenizer, stream, num_tokens, random.Random(f"{task}:{seed}"))
    return Prompt(task=task, text=text, num_tokens=_count(tokenizer, text), seed=seed)


def retrieval_prompt(tokenizer, num_tokens: int, seed: int = 0, filler: str = "essay") -> Prompt:
    """RULER niah_single-style prompt: preamble, haystack with one magic-number needle, question."""
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; expected one of {FILLERS}")
    rng = random.Random(f"retrieval:{filler}:{seed}")
    key = f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}"
    value = str(rng.randrange(1_000_000, 10_000_000))
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    frame_tokens = _count(tokenizer, f"{RULER_PREAMBLE}\n{needle}\n{question}")
    haystack_tokens = max(num_tokens - frame_tokens, 8)
    if filler == "noise":
        repeats = max(1, round(haystack_tokens / _count(tokenizer, RULER_NOISE + " ")))
        haystack = " ".join([RULER_NOISE] * repeats)
    else:
        haystack = _token_window(tokenizer, _essay_stream(), haystack_tokens, rng)
    text = f"{RULER_PREAMBLE}\n{_insert_needle(haystack, needle, rng.random())}\n{question}"
    return Prompt(
        task="retrieval",
        text=text,
        num_tokens=_count(tokenizer, text),
        seed=seed,
        answer=value,
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
    )


def _insert_needle(haystack: str, needle: str, depth: float) -> str:
    """Insert ``needle`` at the sentence boundary nearest to ``depth`` (0 = start, 1 = end) of the haystack."""
    target = int(depth * len(haystack))
    boundaries = [0, len(haystack)] + [i + 2 for i in range(len(haystack) - 1) if haystack[i : i + 2] == ". "]
    cut = min(boundaries, key=lambda b: (abs(b - target), b))
    before, after = haystack[:cut].rstrip(), haystack[cut:].lstrip()
    return " ".join(part for part in (before, needle, after) if part)


def _token_window(tokenizer, stream: str, num_tokens: int, rng: random.Random) -> str:
    """``num_tokens`` tokens of ``stream`` starting at a seed-chosen line start (wrapping around the end)."""
    start = rng.randrange(len(stream))
    newline = stream.find("\n", start)
    start = newline + 1 if newline >= 0 else 0
    span = num_tokens * 8 + 256  # characters: comfortably more than num_tokens for text and code
    wrapped = stream[start:] + "\n\n" + stream * (1 + span // max(len(stream), 1))
    ids = tokenizer(wrapped[:span], add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids).strip()


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _language_reference() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@functools.cache
def _prose_stream() -> str:
    texts = [(LICENSES_DIR / name).read_text() for name in LICENSE_NAMES if (LICENSES_DIR / name).is_file()]
    return "\n\n".join([*texts, _language_reference()])


@functools.cache
def _essay_stream() -> str:
    gpl = LICENSES_DIR / "GPL-3"
    return " ".join((gpl.read_text() if gpl.is_file() else _language_reference()).split())


@functools.cache
def _code_stream() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python sources under {stdlib}: cannot build code prompts")
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)
