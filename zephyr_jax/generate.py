"""Batch generation in one call, on the engine (zephyr_jax/engine.py: continuous batching over KV-cache slots).

`generate` takes strings or chat message lists and a tokenizer; `generate_ids` takes token ids and is what the
parity tests compare with transformers' `generate`. Each prompt is its own request: rows never pad to each
other, and a short reply frees its slot for the next prompt.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from zephyr_jax.engine import Engine, Request, SamplingParams


LENGTH_STEP = 512  # KV-cache lengths of generate() calls are multiples of this (several calls share programs)


def request_seed(seed: int, index: int) -> int:
    """A separate random stream per prompt of a batch, from the call's seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a whole number >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def keyed_seed(*parts) -> int:
    """A 32-bit seed fixed by `parts` (JSON values: a run's seed and what names one request, such as a question
    id), the same in every process and whatever else shares the call."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "big")


def request_seeds(seed, count: int) -> list[int]:
    """Each prompt's seed: request_seed(seed, i) for an int `seed`; a list is one seed per prompt, taken as given
    (a caller whose prompts are met in other batches, such as MT-Bench's per-temperature groups, keys them itself)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"seed holds {len(seed)} seeds for {count} prompts")
        for s in seed:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2 ** 32:
                raise ValueError(f"seed={s!r}: a prompt's seed must be a whole number in [0, 2**32)")
        return [int(s) for s in seed]
    return [request_seed(seed, i) for i in range(count)]


def _prompt_list(prompts, what: str) -> None:
    """TypeError for one prompt where a list of them belongs: a string ran one request per character."""
    if isinstance(prompts, (str, dict)):
        raise TypeError(f"prompts is one {what} ({type(prompts).__name__}): pass a list of them, e.g. [prompt]")


def run(model, prompts: list[list[int]], params: list[SamplingParams], tokenizer=None, *, max_slots: int = 64,
        max_length: int | None = None, eos_id: int | None = None, progress: bool = False,
        **engine_options) -> list[Request]:
    """The finished requests for token-id prompts, on an engine sized for them (at most max_slots cache rows,
    each of max_length tokens: by default the longest prompt + reply, rounded up to LENGTH_STEP)."""
    _prompt_list(prompts, "prompt")
    if len(prompts) == 0:  # (an array of prompts has no truth value)
        return []
    longest = max(len(p) + s.max_tokens for p, s in zip(prompts, params))
    if max_length is None:  # rounded up, as the slots are: the cache's shape, and so the compiled calls, repeat
        # (never past max_position_embeddings unless a prompt and its reply need it: then the Engine warns)
        max_length = max(longest, min(-(-longest // LENGTH_STEP) * LENGTH_STEP, model.config.max_position_embeddings))
    slots = min(max_slots, 1 << (len(prompts) - 1).bit_length())
    engine = Engine(model, tokenizer, max_slots=slots, max_length=max_length, eos_id=eos_id, **engine_options)
    return engine.generate([Request(p, s) for p, s in zip(prompts, params)], progress=progress)


def generate_ids(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | list[int] = 0, eos_id: int | None = None,
                 **engine_options) -> list[list[int]]:
    """The new token ids after each prompt (a list of ids), up to and excluding `eos_id` (None: never stop).
    `seed`: as generate's."""
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=s) for s in request_seeds(seed, len(prompts))]
    return [r.tokens for r in run(model, prompts, params, eos_id=eos_id, **engine_options)]


def generate(model, tokenizer, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | list[int] = 0, stop: str | tuple[str, ...] = (), progress: bool = False,
             **engine_options) -> list[str]:
    """Completions for `prompts`: strings (encoded as they are, with one BOS) or chat message lists (rendered
    with the chat template and the assistant generation prompt). Each stops at EOS, a `stop` string (cut
    before it) or max_new_tokens. `seed`: an int gives prompt i the stream request_seed(seed, i), so a prompt's
    draws follow its position in the call; a list gives each prompt its own seed, whatever else is in the call."""
    from zephyr_jax.tokenizer import check_chat, encode_text, render_chat

    _prompt_list(prompts, "prompt (a string or a message list)")
    texts = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            check_chat(p, f"prompts[{i}]")
            if not p:
                raise ValueError(f"prompts[{i}] is an empty conversation")
        texts.append(p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True))
    encoded = [encode_text(tokenizer, t) for t in texts]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=s, stop=stop) for s in request_seeds(seed, len(prompts))]
    done = run(model, encoded, params, tokenizer, eos_id=tokenizer.eos_token_id, progress=progress,
               **engine_options)
    return [r.text for r in done]
