"""dDPO examples: an ultrafeedback_binarized row {chosen: [...], rejected: [...]} -> prompt and completion ids.

The prompt is every message before the final assistant reply, rendered with the generation prompt
(`<|assistant|>\\n`). Each completion's ids are the tail of the WHOLE conversation's encoding after the prompt's
ids, so prompt + completion is exactly the encoding of the conversation (no re-tokenization seam).
Too long (prompt + longer completion > max_length): the prompt is cut from the left to max_prompt_length
(BOS kept), then the completions from the right to max_length - max_prompt_length, as TRL's DPOTrainer of the
recipe (0.7.x) cuts them, however short the prompt.

Departures from the recipe's tokens (alignment-handbook's apply_chat_template task="dpo" + TRL's DPOTrainer):
- its 2024-01 revision (:handbook; TRL 0.7.7's tokenize_row): the prompt ends at the last user turn's `</s>\\n` and
  each completion is `<|assistant|>\\n` (7 tokens) + reply + `</s>` + `\\n` (2 tokens) + an appended `</s>`: 10
  tokens more than here, counted against max_length - max_prompt_length; its left cut of a long prompt drops BOS.
  The shared `<|assistant|>\\n` cancels in the DPO margin z (same tokens, same context on both sides); the three
  trailing ones do not, and logps/* metrics and IPO's per-token means differ by them.
- its 2023-11 recipe, the paper's values (TRL 0.7.4's DPODataCollatorWithPadding; 0.7.2, of the released model's
  time, tokenizes alike): the prompt ends in `<|assistant|>\\n`, as here, and each completion is reply + `</s>` +
  `\\n` + an appended `</s>` (3 tokens more), with no BOS anywhere, the completion tokenized apart from its prompt
  (so its first piece takes sentencepiece's leading "▁": "▁Hello", id 22557, where the model writes "Hello", 16230,
  after `<|assistant|>\\n`), and every `</s>` of prompt and completion but the appended one masked out of attention
  (pad = EOS).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from zephyr_jax.data.conversation import check_messages, encode_conversation
from zephyr_jax.data.errors import BadRow, missing_key


class PreferenceExample(NamedTuple):
    prompt: np.ndarray  # int32, starts with BOS
    chosen: np.ndarray  # int32 completion, ends in </s> unless truncated
    rejected: np.ndarray
    truncated: bool
    reference: np.ndarray | None = None  # precomputed reference log-probs (chosen, rejected), if any


def split_prompt(row, index, source=None):
    """(prompt messages, chosen reply, rejected reply) from a binarized row; checks both share the prompt, and
    that a string `prompt` column (ultrafeedback_binarized's) is one of its user turns."""
    for key in ("chosen", "rejected"):
        if not isinstance(row, dict) or key not in row:
            raise BadRow(index, missing_key(row, key), source)
    chosen = check_messages(row["chosen"], index, source, "chosen")
    rejected = check_messages(row["rejected"], index, source, "rejected")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):  # alternating turns: a reply has a user turn
        if msgs[-1]["role"] != "assistant":
            raise BadRow(index, f"{key} does not end with an assistant reply", source)
    if chosen[:-1] != rejected[:-1]:
        raise BadRow(index, "chosen and rejected have different prompts", source)
    prompt = row.get("prompt")  # ultrafeedback_binarized's copy of the user turn: a row joined wrong differs
    if isinstance(prompt, str) and prompt.strip() not in [m["content"].strip() for m in chosen if m["role"] == "user"]:
        raise BadRow(index, "the 'prompt' column is none of chosen's user turns", source)
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRow(index, "chosen == rejected", source)
    return chosen[:-1], chosen[-1], rejected[-1]


def preference_example(row, index, tok, *, max_length=1024, max_prompt_length=512,
                       source=None) -> PreferenceExample:
    prompt_msgs, chosen_msg, rejected_msg = split_prompt(row, index, source)
    prompt, _ = encode_conversation(tok, prompt_msgs, index, source, add_generation_prompt=True)
    completions = []
    for reply in (chosen_msg, rejected_msg):
        ids, _ = encode_conversation(tok, prompt_msgs + [reply], index, source)
        # The prompt ends in "\n" (a byte token that never merges), so its ids are a prefix of the whole's.
        if not np.array_equal(ids[:len(prompt)], prompt):
            raise BadRow(index, "prompt ids are not a prefix of the conversation's ids", source)
        completions.append(ids[len(prompt):])
    return truncate_pair(prompt, *completions, max_length, max_prompt_length)


def truncate_pair(prompt, chosen, rejected, max_length: int, max_prompt_length: int) -> PreferenceExample:
    """A pair cut to fit max_length only when it is too long: the prompt from the left (BOS kept) to
    max_prompt_length, then both completions to max_length - max_prompt_length (TRL 0.7's rule: the recipe's).
    A completion keeps at least one token (a room below 1 is refused), so none is cut to nothing."""
    truncated = len(prompt) + max(len(chosen), len(rejected)) > max_length
    if truncated:
        if len(prompt) > max_prompt_length:  # keep BOS, drop the oldest context
            prompt = np.concatenate([prompt[:1], prompt[len(prompt) - max_prompt_length + 1:]])
        room = max_length - max(len(prompt), max_prompt_length)
        if room < 1:  # a negative room would slice the completions from their end
            raise ValueError(f"max_prompt_length={max_prompt_length} leaves no room below max_length={max_length} "
                             "for the completions of a pair that must be cut")
        chosen, rejected = chosen[:room], rejected[:room]
    return PreferenceExample(prompt, chosen, rejected, truncated)
