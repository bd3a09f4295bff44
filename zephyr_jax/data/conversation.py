"""Chat conversations -> token ids, with a per-token mask of which tokens belong to assistant replies.

The conversation is rendered once with the chat template and encoded once (one BOS: the tokenizer's, or the
template's own where it writes one), so the ids are exactly what the model sees at inference. Which tokens belong
to an assistant reply (its text plus its closing `</s>`) is read from the tokenizer's character offsets, never by
encoding pieces separately: Mistral's tokenizer starts each text piece with "▁", so piecewise encoding would not
reproduce the whole.
The template's newline after the final `</s>` is not encoded: every sequence ends in `</s>`.
"""

from __future__ import annotations

import weakref

import jinja2
import numpy as np

from zephyr_jax.data.errors import BadRow
from zephyr_jax.tokenizer import CHAT_ROLES, adds_bos, render_template

# Strings the tokenizer would read as control tokens if they appeared inside message text ("<unk>" is id 0: a
# reply that mentions it would teach the model to emit the unknown token).
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")


def has_special_text(text: str) -> bool:
    return any(s in text for s in SPECIAL_TEXTS)


_SPECIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, special_texts)


def special_texts(tok) -> tuple[str, ...]:
    """SPECIAL_TEXTS and the text of every special token `tok` adds (a ChatML "<|im_end|>"): each would be read as
    its control token inside message text. Kept per tokenizer while its size stays (hundreds of reserved tokens
    took 0.6 ms a row to list)."""
    cached = _SPECIALS.get(tok)
    if cached is None or cached[0] != len(tok):
        added = (t.content for t in tok.added_tokens_decoder.values() if t.special)
        cached = _SPECIALS[tok] = (len(tok), tuple(dict.fromkeys((*SPECIAL_TEXTS, *added))))
    return cached[1]


def check_messages(messages, index, source, field="messages") -> list[dict]:
    """Validates a message list; raises BadRow naming the row and the reason."""
    if not isinstance(messages, (list, tuple)) or not messages:
        found = ("missing (null: a row without the key, where other rows have it)" if messages is None else
                 "an empty list" if isinstance(messages, (list, tuple)) else
                 "a str (JSON-encoded text?)" if isinstance(messages, str) else f"a {type(messages).__name__}")
        raise BadRow(index, f"{field} is {found}, not a non-empty list of {{role, content}} turns", source)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(index, f"{field}[{i}] lacks 'role' or 'content'", source)
        if m["role"] not in CHAT_ROLES:
            raise BadRow(index, f"unknown role {m['role']!r} in {field}[{i}] (expected {', '.join(CHAT_ROLES[:-1])} "
                                f"or {CHAT_ROLES[-1]})", source)
        if not isinstance(m["content"], str):
            raise BadRow(index, f"{field}[{i}].content is not a string", source)
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # valid JSON ("\\ud83d", a cut emoji) that no tokenizer takes
            raise BadRow(index, f"{field}[{i}].content is not valid Unicode (a lone surrogate)", source) from None
        if m["role"] != "system" and not m["content"].strip():
            raise BadRow(index, f"empty content in {field}[{i}]", source)
        if has_special_text(m["content"]):
            raise BadRow(index, f"{field}[{i}] contains special-token text {SPECIAL_TEXTS}", source)
        if m["role"] == "system" and i != 0:
            raise BadRow(index, f"system message at {field}[{i}] (only the first may be)", source)
    # Turns alternate user, assistant, user, ... after the system message (UltraChat's and UltraFeedback's
    # schema): two user turns in a row, or a reply with no question, is a row put together wrong.
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        want = ("user", "assistant")[(i - first) % 2]
        if messages[i]["role"] != want:
            raise BadRow(index, f"{field}[{i}] is {messages[i]['role']!r} where {want!r} belongs (turns alternate "
                                "user, assistant after an optional system message)", source)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_conversation(tok, messages, index=None, source=None, add_generation_prompt=False):
    """(ids int32 [L], assistant_mask bool [L]) for a checked conversation, rendered as inference renders it
    (tokenizer.render_template: the Zephyr template with an empty system turn first; one BOS).

    assistant_mask marks each assistant reply's tokens and its closing `</s>`.
    """
    specials = special_texts(tok)
    for k, m in enumerate(messages):  # check_messages knows only SPECIAL_TEXTS; this tokenizer may add others
        found = next((s for s in specials if s in m["content"]), None)
        if found is not None:
            raise BadRow(index, f"messages[{k}] contains special-token text {found!r}", source)
    try:
        messages, text = render_template(tok, messages, add_generation_prompt)
        # where each message's text ends
        ends = [len(tok.apply_chat_template(messages[:k + 1], tokenize=False)) for k in range(len(messages))]
    except jinja2.TemplateError as e:  # e.g. a template that wants strictly alternating turns
        raise BadRow(index, f"the chat template refused the conversation: {e}", source) from None
    eos = tok.eos_token
    if not add_generation_prompt and text.endswith(eos + "\n"):
        text = text[:-1]
    spans, start = [], 0  # character spans of assistant text + </s>
    for k, (m, end) in enumerate(zip(messages, ends)):
        if m["role"] == "assistant":
            at = text.find(m["content"] + eos, start, end)
            if at < 0 and text.find(m["content"], start, end) >= 0:  # e.g. ChatML's <|im_end|>, as text
                raise BadRow(index, f"the chat template does not end messages[{k}] (an assistant reply) with the "
                             f"tokenizer's EOS {eos!r}, which training learns as the stop and generation stops at: "
                             "use a template that writes eos_token after each reply", source)
            if at < 0:
                raise BadRow(index, f"the chat template did not render messages[{k}] verbatim", source)
            spans.append((at, at + len(m["content"]) + len(eos)))
        start = end
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=adds_bos(tok, text))
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), bool)
    for lo, hi in spans:
        inside = (offsets[:, 0] >= lo) & (offsets[:, 1] <= hi) & (offsets[:, 1] > offsets[:, 0])
        straddles = (offsets[:, 0] < lo) & (offsets[:, 1] > lo)
        if straddles.any():
            raise BadRow(index, "a token spans the start of an assistant reply", source)
        mask |= inside
    if len(ids) < 2 or ids[0] != tok.bos_token_id or (ids == tok.bos_token_id).sum() != 1:
        raise BadRow(index, "conversation did not encode to one BOS followed by text", source)
    return ids, mask
