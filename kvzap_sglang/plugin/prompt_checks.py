"""Refuse prompts SGLang 0.5.23 would crash on, with a 400, while KVzap is on.

Two requests kill a stock SGLang 0.5.23 scheduler (measured on CPU, with and without KVzap): a ``/generate`` text
that tokenizes to nothing (``{"text": ""}`` with SmolLM2's tokenizer, which adds no BOS: the first forward reshapes
a 0-token batch and raises) and ``input_ids`` outside the vocabulary (the embedding lookup raises
``IndexError``). The scheduler dies, and with it every running request and the server. SGLang checks neither in
``TokenizerManager._validate_one_request``, which runs in the HTTP process before anything is queued and whose
``ValueError`` is already answered with a 400; so the check goes there. Stock servers (KVzap off) are left as they
are.
"""

from __future__ import annotations

from kvzap_sglang.plugin.settings import KVzapSettings


def refuse_crashing_prompts(original, self, obj, input_ids):
    """AROUND ``TokenizerManager._validate_one_request``: a prompt with no tokens, or with a token id outside
    ``[0, vocab_size)``, is a ``ValueError`` (HTTP 400) before SGLang's own checks."""
    if input_ids is not None and getattr(obj, "input_embeds", None) is None and KVzapSettings.from_env() is not None:
        check_prompt_ids(input_ids, self.model_config.vocab_size)
    return original(self, obj, input_ids)


def check_prompt_ids(input_ids: list[int], vocab_size: int) -> None:
    if len(input_ids) == 0:
        raise ValueError("the prompt has no tokens (an empty text tokenizes to nothing): nothing to generate from")
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
