"""dSFT examples: an UltraChat row {messages: [{role, content}, ...]} -> token ids and a loss mask.

loss_on="all" learns every token after BOS (the Zephyr recipe); "assistant" learns only assistant replies,
each with its closing `</s>`. `</s>` is never masked out as padding (TRL's unpacked SFT masks it, its pad being EOS;
the recipe's packed rows learned it, as here).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from zephyr_jax.data.conversation import check_messages, encode_conversation
from zephyr_jax.data.errors import BadRow, DroppedRow, missing_key

LOSS_ON = ("all", "assistant")
TOO_LONG = ("truncate", "drop")


class SFTExample(NamedTuple):
    ids: np.ndarray  # int32 [L], starts with BOS
    loss_mask: np.ndarray  # bool [L]: True where ids[t] is a training target (predicted from ids[:t])
    truncated: bool


def sft_example(row, index, tok, *, loss_on="all", max_length=2048, too_long="truncate",
                source=None) -> SFTExample:
    """Tokenizes one row; raises BadRow (with the row index and reason) for rows it cannot use."""
    if loss_on not in LOSS_ON or too_long not in TOO_LONG:
        raise ValueError(f"loss_on={loss_on!r} (expected {LOSS_ON}), too_long={too_long!r} (expected {TOO_LONG})")
    if not isinstance(row, dict) or "messages" not in row:
        raise BadRow(index, missing_key(row, "messages"), source)
    messages = check_messages(row["messages"], index, source)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(index, "no assistant turn", source)
    if messages[-1]["role"] != "assistant":
        raise BadRow(index, "the dialogue ends with a user turn that has no reply", source)
    ids, assistant = encode_conversation(tok, messages, index, source)
    loss_mask = assistant.copy() if loss_on == "assistant" else np.ones(len(ids), bool)
    loss_mask[0] = False  # BOS is context, never a target
    truncated = len(ids) > max_length
    if truncated:
        if too_long == "drop":
            raise DroppedRow(index, f"longer than max_length={max_length}", source)
        ids, loss_mask = ids[:max_length], loss_mask[:max_length]
        if not loss_mask[1:].any():  # a usable row, too long: counted like a dropped one, never stops a run
            raise DroppedRow(index, f"no target left after truncation to max_length={max_length}", source)
    return SFTExample(ids, loss_mask, truncated)
