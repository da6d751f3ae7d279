"""Refuse prompts SGLang 0.5.23 would crash on, with a 400, while KVzap is on.

These requests kill a stock SGLang 0.5.23 scheduler (measured on CPU, with and without KVzap): a ``/generate`` text
that tokenizes to nothing (``{"text": ""}`` with SmolLM2's tokenizer, which adds no BOS: the first forward reshapes
a 0-token batch and raises), ``input_ids`` outside the vocabulary (the embedding lookup raises ``IndexError``) and,
with ``--disable-radix-cache``, ``input_embeds`` rows that are not ``hidden_size`` long (the model raises
``ValueError`` in the scheduler). With ``return_logprob``, two more: ``top_logprobs_num`` (OpenAI's
``top_logprobs``) above the vocabulary size (``torch.topk`` raises "selected index k out of range") and a
``logprob_start_len`` below -1 once the prompt's prefix is cached (an assertion in
``add_input_logprob_return_values``). The scheduler dies, and with it every running request and the server. SGLang
checks none of these in ``TokenizerManager._validate_one_request``, which runs in the HTTP process before
anything is queued and whose ``ValueError`` is already answered with a 400; so the check goes there. Stock servers
(KVzap off) are left as they are.

Two more requests are refused there only because of KVzap: beam search (``beam_width > 1``: SGLang frees its extra
rows without ``release_kv_cache``, so their windows would stay referenced and the idle check stop the scheduler),
and, with tenants, an ``extra_key`` naming a tenant namespace that the tenant middleware did not write
(``tenants.refuse_unvouched_tenant_keys``).
"""

from __future__ import annotations

from kvzap_sglang.plugin.settings import KVzapSettings, kvzap_enabled
from kvzap_sglang.plugin.tenants import refuse_unvouched_tenant_keys
from kvzap_sglang.tenants import TenantsConfig


KVZAP_ON_ATTR = "_kvzap_on"  # set on each TokenizerManager when it is built
TENANT_NAMES_ATTR = "_kvzap_tenant_names"  # ... with its tenants' names (None without --kvzap-tenants)


def remember_whether_kvzap_is_on(result, self, *args, **kwargs):
    """AFTER ``TokenizerManager.__init__``: whether this server or Engine runs KVzap, and its tenants, read while its
    launch's settings are in the environment. Read per request instead, another ``sglang.Engine`` built later in the
    same process (even one whose constructor failed) rewrote the environment and switched a running KVzap Engine's
    checks off: its next empty prompt stopped its scheduler."""
    settings = KVzapSettings.from_env() if kvzap_enabled() else None  # validated at launch: cannot raise here
    setattr(self, KVZAP_ON_ATTR, settings is not None)
    names = None if settings is None or settings.tenants is None else TenantsConfig.load(settings.tenants).names()
    setattr(self, TENANT_NAMES_ATTR, names)


def refuse_crashing_prompts(original, self, obj, input_ids):
    """AROUND ``TokenizerManager._validate_one_request``: a prompt with no tokens, a token id outside
    ``[0, vocab_size)``, embeddings not ``[tokens, hidden_size]`` or logprob options out of range is a
    ``ValueError`` (HTTP 400) before SGLang's own checks."""
    kvzap_on = getattr(self, KVZAP_ON_ATTR, None)
    if kvzap_on is None:  # a TokenizerManager built before KVzap's hooks were applied: the environment decides
        kvzap_on = kvzap_enabled()
    if kvzap_on:
        check_no_beam_search(obj)
        check_logprob_params(obj, self.model_config.vocab_size)
        refuse_unvouched_tenant_keys(obj)
        embeds = getattr(obj, "input_embeds", None)
        if embeds is not None:
            check_prompt_embeds(embeds, self.model_config.hidden_size)
        elif input_ids is not None:
            check_prompt_ids(input_ids, self.model_config.vocab_size)
    return original(self, obj, input_ids)


def check_no_beam_search(obj) -> None:
    """SGLang's beam search forks and frees extra request rows outside ``release_kv_cache`` (``beam_search/fork``),
    so their KVzap windows would never be released and the next idle check would stop the scheduler."""
    params = getattr(obj, "sampling_params", None)
    width = params.get("beam_width") if isinstance(params, dict) else None
    if isinstance(width, int) and width > 1:
        raise ValueError("beam search (sampling_params.beam_width > 1) is not supported with KVzap on")


def check_logprob_params(obj, vocab_size: int) -> None:
    """Logprob options the scheduler would die on (module docstring); only read with ``return_logprob``, as SGLang
    ignores them otherwise."""
    if not getattr(obj, "return_logprob", False):
        return
    top = getattr(obj, "top_logprobs_num", None)
    if isinstance(top, int) and not 0 <= top <= vocab_size:
        raise ValueError(f"top_logprobs_num (OpenAI: top_logprobs) must be in [0, {vocab_size}], the model's "
                         f"vocabulary size; got {top}")
    start = getattr(obj, "logprob_start_len", None)
    if isinstance(start, int) and start < -1:
        raise ValueError(f"logprob_start_len must be -1 (the default) or a prompt position >= 0, got {start}")


def check_prompt_ids(input_ids: list[int], vocab_size: int) -> None:
    if len(input_ids) == 0:
        raise ValueError("the prompt has no tokens (an empty text tokenizes to nothing): nothing to generate from")
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")


def check_prompt_embeds(embeds, hidden_size: int) -> None:
    if not isinstance(embeds, list):
        return  # a tensor from sglang.Engine: SGLang's own path
    if len(embeds) == 0:
        raise ValueError("input_embeds must be a non-empty list of [hidden_size] rows, one per prompt token")
    for index, row in enumerate(embeds):
        if not isinstance(row, list) or len(row) != hidden_size:
            length = len(row) if isinstance(row, list) else type(row).__name__
            raise ValueError(f"input_embeds row {index} has {length} values; the model's hidden size is {hidden_size}")
