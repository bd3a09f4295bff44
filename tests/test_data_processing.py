"""SFT and preference tokenization, packing, batches and the loader, on the real Mistral-7B-v0.1 tokenizer."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zephyr_jax.data import (BadRow, Loader, default_buckets, pack, pack_pairs, pad_sft, preference_example,
                             process_rows, sft_example)
from zephyr_jax.data import pipeline
from zephyr_jax.data.errors import DroppedRow
from zephyr_jax.data.loader import examples_digest, padded_batcher
from zephyr_jax.data.preference import PreferenceExample, split_prompt, truncate_pair
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.tokenizer import load_tokenizer

DIALOGUE = [
    {"role": "user", "content": "Write a haiku about the sea."},
    {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
    {"role": "user", "content": "Now one about mountains, please"},
    {"role": "assistant", "content": "Stone shoulders in cloud."},
]
PAIR = {
    "prompt": "What is 2 + 2?",
    "chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 5"}],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _whole_conversation_ids(tok, messages):
    """The conversation encoded in one go by transformers (the template's final newline dropped)."""
    text = tok.apply_chat_template([{"role": "system", "content": ""}, *messages], tokenize=False)
    assert text.endswith("</s>\n")
    return tok(text[:-1]).input_ids


def _runs(mask):
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_sft_assistant_targets_decode_to_the_replies(tok):
    ex = sft_example({"messages": DIALOGUE}, 0, tok, loss_on="assistant")
    batch = pad_sft([ex], 128)
    targets, mask = batch["targets"][0], batch["loss_mask"][0].astype(bool)
    replies = [tok.decode(targets[a:b]) for a, b in _runs(mask)]
    assert replies == [m["content"] + "</s>" for m in DIALOGUE if m["role"] == "assistant"]
    assert list(ex.ids) == _whole_conversation_ids(tok, DIALOGUE)


# Mistral-Instruct's template: no system turn, strictly alternating turns, [INST] markers.
INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def test_other_templates_train_on_what_inference_renders(tok):
    """A template without a system turn, or one that writes its own BOS, encodes as the inference path encodes it
    (one BOS); a conversation the template refuses is a bad row naming the template's reason."""
    from zephyr_jax.tokenizer import encode_text, render_chat

    other = load_tokenizer()
    other.chat_template = INSTRUCT_TEMPLATE
    ex = sft_example({"messages": DIALOGUE}, 0, other, loss_on="assistant")
    assert list(ex.ids) == encode_text(other, render_chat(other, DIALOGUE))
    targets, mask = pad_sft([ex], 128)["targets"][0], pad_sft([ex], 128)["loss_mask"][0].astype(bool)
    assert [other.decode(targets[a:b]) for a, b in _runs(mask)] == [
        m["content"] + "</s>" for m in DIALOGUE if m["role"] == "assistant"]
    with pytest.raises(BadRow, match="row 4: the chat template refused the conversation: Conversation roles must"):
        sft_example({"messages": [{"role": "system", "content": "Be brief."}] + DIALOGUE}, 3, other)  # no system
    other.chat_template = tok.chat_template + (  # accepts whole conversations only, not the prefixes read for the mask
        "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('must end with a reply') }}{% endif %}")
    with pytest.raises(BadRow, match="row 5: the chat template refused the conversation: must end with a reply"):
        sft_example({"messages": DIALOGUE}, 4, other)
    other.chat_template = "{{ bos_token }}" + tok.chat_template  # the Zephyr template, writing its own <s>
    assert list(sft_example({"messages": DIALOGUE}, 0, other).ids) == _whole_conversation_ids(tok, DIALOGUE)
    other.chat_template = CHATML_TEMPLATE  # replies end in <|im_end|>, not the EOS generation stops at: say so
    with pytest.raises(BadRow, match=r"row 1: the chat template does not end messages\[1\] \(an assistant reply\) "
                                     r"with the tokenizer's EOS '</s>'"):
        sft_example({"messages": DIALOGUE}, 0, other)


# ChatML (<|im_start|> / <|im_end|> as text): a template whose turns do not end in the tokenizer's EOS.
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_sft_all_learns_every_token_after_bos(tok):
    ex = sft_example({"messages": DIALOGUE}, 0, tok, loss_on="all")
    assert ex.ids[0] == tok.bos_token_id and (ex.ids == tok.bos_token_id).sum() == 1
    assert ex.ids[-1] == tok.eos_token_id  # every sequence ends in </s>
    assert not ex.loss_mask[0] and ex.loss_mask[1:].all()
    batch = pad_sft([ex], 128)
    eos_targets = batch["targets"][0] == tok.eos_token_id
    assert eos_targets.sum() == 5 and batch["loss_mask"][0][eos_targets].all()  # </s> is never excluded


def test_sft_too_long_truncates_or_drops(tok, monkeypatch):
    ex = sft_example({"messages": DIALOGUE}, 0, tok, max_length=20)
    assert len(ex.ids) == 20 and ex.truncated
    whole = len(sft_example({"messages": DIALOGUE}, 0, tok, max_length=10**6).ids)
    exact = sft_example({"messages": DIALOGUE}, 0, tok, max_length=whole, too_long="drop")  # fits: kept whole
    assert len(exact.ids) == whole and not exact.truncated
    with pytest.raises(BadRow, match="row 4: longer than max_length=20"):
        sft_example({"messages": DIALOGUE}, 3, tok, max_length=20, too_long="drop")
    examples, counter = process_rows([{"messages": DIALOGUE}] * 3, lambda r, i: sft_example(
        r, i, tok, max_length=20, too_long="drop"), on_bad_row="skip", progress=False, log=lambda s: None)
    assert examples == [] and counter.as_dict()["skipped"] == 3
    # on_bad_row="raise" is about malformed rows: a long row dropped on purpose is counted, in workers as here.
    rows = [{"messages": DIALOGUE}, {"messages": DIALOGUE[:2]}] * 2
    monkeypatch.setattr(pipeline, "MIN_ROWS_PER_PROCESS", 1)  # two worker processes for 4 rows
    for num_proc in (1, 2):
        examples, counter = process_rows(rows, functools.partial(sft_example, tok=tok, max_length=64,
                                                                 too_long="drop"),
                                         on_bad_row="raise", progress=False, log=lambda s: None, num_proc=num_proc)
        assert len(examples) == 2 and counter.as_dict()["reasons"] == {"longer than max_length=64": 2}


def test_preference_prompt_plus_completion_is_the_whole_conversation(tok):
    ex = preference_example(PAIR, 0, tok)
    for key, completion in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        assert list(ex.prompt) + list(completion) == _whole_conversation_ids(tok, PAIR[key])
        assert completion[-1] == tok.eos_token_id
    assert tok.decode(ex.chosen) == "2 + 2 = 4.</s>"
    assert (ex.prompt == tok.bos_token_id).sum() == 1
    batch = pack_pairs([ex, ex], 4, (64,))  # a row per sequence
    assert batch["inputs"].shape == (4, 64)
    assert batch["sequence_pair"].tolist() == [[0], [1], [2], [3]]  # 2 * pair + (0 chosen, 1 rejected)
    for k, completion in ((0, ex.chosen), (1, ex.rejected)):
        row_mask = batch["loss_mask"][k].astype(bool)
        assert list(batch["targets"][k][row_mask]) == list(completion)


def test_preference_truncation_prompt_left_then_completions(tok):
    long_prompt = " ".join(["word"] * 300)
    row = {"chosen": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "yes " * 200}],
           "rejected": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "no"}]}
    ex = preference_example(row, 0, tok, max_length=256, max_prompt_length=128)
    full = preference_example(row, 0, tok, max_length=4096, max_prompt_length=4096)
    assert ex.truncated and len(ex.prompt) == 128
    assert ex.prompt[0] == tok.bos_token_id and list(ex.prompt[1:]) == list(full.prompt[-127:])
    assert len(ex.prompt) + len(ex.chosen) == 256 and list(ex.chosen) == list(full.chosen[:128])
    assert list(ex.rejected) == list(full.rejected)
    # A pair that fits exactly is not cut (TRL cuts only when prompt + longer completion exceed max_length).
    fits = truncate_pair(np.arange(10), np.arange(6), np.arange(3), max_length=16, max_prompt_length=4)
    assert not fits.truncated and (len(fits.prompt), len(fits.chosen), len(fits.rejected)) == (10, 6, 3)


def test_pairs_whose_prompts_differ_and_replies_cut_to_nothing_are_bad_rows(tok):
    """chosen and rejected must share the conversation before their last reply (else DPO would score the rejected
    reply after the chosen one's prompt); a dSFT example truncated before its first target has nothing to learn."""
    user, bot = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    with pytest.raises(BadRow, match="different prompts"):
        split_prompt({"chosen": [user("What is 2+2?"), bot("4")], "rejected": [user("What is 3+3?"), bot("5")]}, 0)
    with pytest.raises(BadRow, match="^row 2: chosen == rejected$"):  # a margin of 0 whatever the model
        split_prompt({"chosen": [user("What is 2+2?"), bot("4")], "rejected": [user("What is 2+2?"), bot("4")]}, 1)
    long_question = {"messages": [user("word " * 100), bot("ok")]}
    with pytest.raises(DroppedRow, match="no target left"):
        sft_example(long_question, 0, tok, loss_on="assistant", max_length=32)
    # A well-formed row that is only too long is counted, as too_long="drop" counts it: a strict run goes on.
    short = {"messages": [user("Hi"), bot("Hello.")]}
    examples, counter = process_rows([short, long_question, short], functools.partial(
        sft_example, tok=tok, loss_on="assistant", max_length=32), on_bad_row="raise", progress=False,
        log=lambda s: None)
    assert len(examples) == 2 and counter.as_dict()["reasons"] == {
        "no target left after truncation to max_length=32": 1}


def test_turns_out_of_order_and_a_prompt_column_that_disagrees_are_bad_rows(tok):
    """Turns alternate user, assistant after an optional system turn (a dialogue that starts with a reply, or has
    two user turns in a row, was put together wrong); a dSFT dialogue ends with a reply; a binarized row's
    `prompt` column is one of chosen's user turns (a row joined wrong trained on another prompt's pair)."""
    user, bot = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    system = {"role": "system", "content": "Be brief."}
    for messages, at, wanted in [([bot("Hi"), user("Hello"), bot("Hey")], 0, "user"),
                                 ([user("A"), user("B"), bot("C")], 1, "assistant"),
                                 ([system, user("A"), bot("B"), bot("C")], 3, "user")]:
        with pytest.raises(BadRow, match=rf"row 6: messages\[{at}\] is '\w+' where '{wanted}' belongs"):
            sft_example({"messages": messages}, 5, tok)
    with pytest.raises(BadRow, match=r"row 6: system message at messages\[2\] \(only the first may be\)"):
        sft_example({"messages": [user("A"), bot("B"), system, user("C"), bot("D")]}, 5, tok)
    with pytest.raises(BadRow, match="row 6: the dialogue ends with a user turn that has no reply"):
        sft_example({"messages": [user("A"), bot("B"), user("C")]}, 5, tok)
    assert sft_example({"messages": [system, user("A"), bot("B")]}, 5, tok).loss_mask.any()
    with pytest.raises(BadRow, match=r"row 7: rejected\[1\] is 'user' where 'assistant' belongs"):
        split_prompt({"chosen": [user("Q"), bot("A")], "rejected": [user("Q"), user("again"), bot("B")]}, 6)
    row = {"prompt": "What is 2+2?", "chosen": [user("What is 2+2?"), bot("4")],
           "rejected": [user("What is 2+2?"), bot("5")]}
    assert split_prompt(row, 7)[0] == [user("What is 2+2?")]
    with pytest.raises(BadRow, match="row 8: the 'prompt' column is none of chosen's user turns"):
        split_prompt({**row, "prompt": "What is 3+3?"}, 7)


def test_a_messages_field_that_is_not_a_list_says_what_it_is(tok):
    """A parquet column of JSON-encoded text, a key other rows have and this one lacks (null): each reason said
    (all four read "messages is not a non-empty list", counted alike)."""
    for value, found in ((None, r"missing \(null: a row without the key"), ("[]", r"a str \(JSON-encoded text\?\)"),
                         ([], "an empty list"), ({"role": "user"}, "a dict")):
        with pytest.raises(BadRow, match=rf"row 3: messages is {found}.*, not a non-empty list"):
            sft_example({"messages": value}, 2, tok)


def test_a_row_of_another_schema_names_its_keys_and_the_roles_read(tok):
    """A ShareGPT row ({conversation: [{from, value}]}, roles human / gpt), a {question, good, bad} pair or TRL's
    string prompt / chosen / rejected: the reason names the keys the row has, the roles that are read and the
    turns a reply is given as (it said "missing key 'messages'", "unknown role 'human'" and "not a non-empty
    list" alone, leaving the schema to be found in the code)."""
    with pytest.raises(BadRow, match=r"^row 3: missing key 'messages' \(the row's keys: 'conversation', 'id'\)$"):
        sft_example({"conversation": [{"from": "human", "value": "Hi"}], "id": 7}, 2, tok)
    with pytest.raises(BadRow, match=r"^row 3: missing key 'chosen' \(the row's keys: 'bad', 'good', 'question'\)$"):
        split_prompt({"question": "Q", "good": "A", "bad": "B"}, 2)
    human = {"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello."}]}
    with pytest.raises(BadRow, match=r"^row 3: unknown role 'human' in messages\[0\] \(expected system, user or "
                                     r"assistant\)$"):
        sft_example(human, 2, tok)
    with pytest.raises(BadRow, match=r"^row 3: chosen is a str \(JSON-encoded text\?\), not a non-empty list of "
                                     r"\{role, content\} turns$"):  # TRL's prompt / chosen / rejected strings
        split_prompt({"prompt": "Q", "chosen": "A", "rejected": "B"}, 2)


def test_packed_row_logits_equal_separate_examples(tok):
    cfg = MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    model = Mistral(cfg, rngs=nnx.Rngs(0))
    examples = [sft_example({"messages": DIALOGUE[:2]}, 0, tok), sft_example({"messages": DIALOGUE}, 1, tok)]
    packed = pack(examples, 160)
    assert packed["inputs"].shape[0] == 1, "both examples fit one row"
    logits = np.asarray(model(jnp.asarray(packed["inputs"]), positions=jnp.asarray(packed["positions"]),
                              segment_ids=jnp.asarray(packed["segment_ids"])))[0]
    start = 0
    for ex in sorted(examples, key=lambda e: -len(e.ids)):  # best-fit decreasing places the longest first
        alone = np.asarray(model(jnp.asarray(ex.ids[None, :-1])))[0]
        np.testing.assert_allclose(logits[start:start + len(alone)], alone, atol=1e-5)
        # Positions restart at each example (RoPE sees only offsets, so the logits alone could not tell)
        np.testing.assert_array_equal(packed["positions"][0, start:start + len(alone)], np.arange(len(alone)))
        start += len(alone)
    assert (packed["segment_ids"][0, start:] == 0).all() and (packed["loss_mask"][0, start:] == 0).all()


def test_loader_is_deterministic_resumable_and_sliced(tok):
    examples = [sft_example({"messages": [{"role": "user", "content": f"q{i}"},
                                          {"role": "assistant", "content": "a " * (i % 7 + 1)}]}, i, tok)
                for i in range(20)]
    make = lambda: Loader(examples, 4, padded_batcher(pad_sft, default_buckets(64, smallest=16)), seed=3)
    a, b = make(), make()
    first = [next(a) for _ in range(7)]  # crosses the epoch boundary (5 steps per epoch)
    for (x, info), (y, _) in zip(first, [next(b) for _ in range(7)]):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        assert info.length == x["inputs"].shape[1] and len(info.indices) == 4
    saved = dict(a.state(), epoch=0, step=3)
    for resumed, state in ((make(), saved), (make(), {"epoch": 0, "step": 3})):  # the latter: saved before digests
        resumed.restore(state)
        for x, _ in first[3:]:
            np.testing.assert_array_equal(next(resumed)[0]["inputs"], x["inputs"])
    # Each epoch gives every example once, in a new order; a position saved past the epoch boundary (epoch 1,
    # step 2) resumes with the batches the uninterrupted run goes on to.
    run = make()
    drawn = [next(run)[1].indices.tolist() for _ in range(7)]
    after = make()
    after.restore(run.state())
    drawn += [next(run)[1].indices.tolist() for _ in range(3)]
    assert [next(after)[1].indices.tolist() for _ in range(3)] == drawn[7:]
    epochs = [sum(drawn[:5], []), sum(drawn[5:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(20)) and epochs[0] != epochs[1]
    # A position saved over other data is refused: one example edited, other loss masks (loss_on or the template's
    # assistant spans changed), or one more example.
    edited = examples[:5] + [examples[5]._replace(ids=examples[5].ids[::-1].copy())] + examples[6:]
    remasked = [ex._replace(loss_mask=~ex.loss_mask) for ex in examples]
    for other in (edited, remasked, examples + examples[:1]):
        with pytest.raises(ValueError, match=f"indexes another example list \\(20 examples.*this run's "
                                             f"\\({len(other)} examples"):
            Loader(other, 4, padded_batcher(pad_sft, (64,)), seed=3).restore(saved)
    # The same tokens with a pair's prompt/completion boundary moved (other loss targets) are other data.
    ids = np.arange(1, 9, dtype=np.int32)
    assert (examples_digest([PreferenceExample(ids[:4], ids[4:6], ids[6:], False)])
            != examples_digest([PreferenceExample(ids[:3], ids[3:6], ids[6:], False)]))
    assert {x["inputs"].shape[1] for x, _ in first} <= {16, 32, 64}
    # Processes holding interleaved rows of the global batch (as on a pod) build exactly those rows, at the length
    # and loss width of the whole global batch (several buckets: a process's own rows may fit a shorter one).
    buckets = default_buckets(64, smallest=16)
    parts = [Loader(examples, 4, padded_batcher(pad_sft, buckets), seed=3, rows=rows) for rows in ([0, 2], [1, 3])]
    whole = Loader(examples, 4, padded_batcher(pad_sft, buckets), seed=3)
    for _ in range(5):
        (even, _), (odd, _), (full, info) = next(parts[0]), next(parts[1]), next(whole)
        for key in ("inputs", "loss_positions"):
            np.testing.assert_array_equal(even[key], full[key][[0, 2]])
            np.testing.assert_array_equal(odd[key], full[key][[1, 3]])
        np.testing.assert_array_equal(full["inputs"][1][:len(examples[info.indices[1]].ids) - 1],
                                      examples[info.indices[1]].ids[:-1])
    assert make().order(0).tolist() != make().order(1).tolist()  # a new shuffle each epoch
    assert make().order(0).tolist() != Loader(examples, 4, padded_batcher(pad_sft, (64,)), seed=4).order(0).tolist()
    # 19 examples: the 3 left over are left out of the epoch; every batch is a whole global batch.
    short = Loader(examples[:19], 4, padded_batcher(pad_sft, (64,)), seed=3)
    assert short.steps_per_epoch == 4 and [len(next(short)[1].indices) for _ in range(6)] == [4] * 6


# --- Bad rows: processed, or a BadRow naming the index; nothing else escapes. ---

text = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "</s>", "<s>", "<unk>", "hi", "\n"]))
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": text}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])}),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.integers(), st.none(), st.fixed_dictionaries({"role": st.just("user"), "content": st.integers()}))
messages = st.one_of(st.lists(message, max_size=5), st.text(max_size=5), st.none(), st.integers())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.one_of(st.fixed_dictionaries({"messages": messages}), st.dictionaries(st.text(max_size=8), messages),
                     st.none(), st.lists(st.integers(), max_size=2)),
       index=st.integers(0, 10_000))
def test_sft_rows_fuzz(tok, row, index):
    try:
        ex = sft_example(row, index, tok, loss_on="assistant", max_length=64)
    except BadRow as err:
        assert str(err).startswith(f"row {index + 1}: ") and err.index == index and err.reason
    else:
        assert ex.ids[0] == tok.bos_token_id and ex.loss_mask.any()
        assert tok.unk_token_id not in ex.ids.tolist()  # byte fallback: only the text "<unk>" could give id 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(message, max_size=3), chosen=message, rejected=message,
       keys=st.sampled_from([("chosen", "rejected"), ("chosen",), ()]), index=st.integers(0, 10_000))
def test_preference_rows_fuzz(tok, prompt, chosen, rejected, keys, index):
    row = {k: v for k, v in (("chosen", prompt + [chosen]), ("rejected", prompt + [rejected])) if k in keys}
    try:
        ex = preference_example(row, index, tok, max_length=64, max_prompt_length=32)
    except BadRow as err:
        assert str(err).startswith(f"row {index + 1}: ") and err.index == index and err.reason
    else:
        assert len(ex.chosen) and len(ex.rejected) and ex.prompt[0] == tok.bos_token_id


@pytest.mark.parametrize("special", ["<s>", "</s>", "<unk>"])
def test_special_token_text_in_a_message_is_a_bad_row(tok, special):
    """The tokenizer reads these as control tokens ("<unk>" is id 0), so the row would not train on its text."""
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"the {special} token"}]}
    with pytest.raises(BadRow, match=r"row 4: messages\[1\] contains special-token text"):
        sft_example(row, 3, tok, loss_on="assistant", max_length=64)


def test_a_special_token_the_tokenizer_adds_is_a_bad_row_in_message_text():
    """A tokenizer with a ChatML end-of-turn token would read it as that control token inside a reply, and train
    the model to emit it there."""
    tok = load_tokenizer()  # its own copy: the module's tokenizer keeps its vocabulary
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    reply = {"role": "assistant", "content": "Sure: <|im_end|>"}
    with pytest.raises(BadRow, match=r"row 4: messages\[1\] contains special-token text .*<\|im_end\|>"):
        sft_example({"messages": [{"role": "user", "content": "hi"}, reply]}, 3, tok, loss_on="assistant")
    pair = {"chosen": [{"role": "user", "content": "hi"}, reply],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}
    with pytest.raises(BadRow, match="contains special-token text"):
        preference_example(pair, 3, tok)


def test_a_lone_surrogate_in_a_message_is_a_bad_row(tok):
    """Valid JSON ("\\ud83d", an emoji cut in half) that the tokenizer refuses with a TypeError naming no row."""
    row = {"messages": [{"role": "user", "content": "cut \ud83d"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(BadRow, match=r"row 4: messages\[0\].content is not valid Unicode"):
        sft_example(row, 3, tok, loss_on="assistant", max_length=64)


def test_a_prompt_limit_at_or_above_the_length_is_refused():
    """Else the room left for the completions is negative and they are sliced from their end."""
    from zephyr_jax.data.preference import truncate_pair

    ids = np.arange(1, 40)
    with pytest.raises(ValueError, match="max_prompt_length=32 leaves no room below max_length=32"):
        truncate_pair(ids, ids, ids, 32, 32)
    assert len(truncate_pair(ids[:8], ids[:8], ids[:8], 32, 32).chosen) == 8  # nothing to cut: fine


def test_a_short_prompt_leaves_its_completions_the_recipes_room(tok):
    """TRL 0.7's DPOTrainer (the recipe's) cuts both completions of a too-long pair to max_length -
    max_prompt_length, however short the prompt: not to the room the prompt leaves."""
    row = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "yes " * 300}],
           "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "no"}]}
    ex = preference_example(row, 0, tok, max_length=256, max_prompt_length=128)
    full = preference_example(row, 0, tok, max_length=4096, max_prompt_length=4096)
    assert ex.truncated and list(ex.prompt) == list(full.prompt) and len(ex.prompt) < 128
    assert list(ex.chosen) == list(full.chosen[:128]) and list(ex.rejected) == list(full.rejected)


def test_datasets_bars_hidden_for_a_load_come_back_as_they_were():
    """load_examples(progress=False) hides the datasets library's own bars while it loads, then leaves them as it
    found them: shown again, or still hidden where the caller had hidden them."""
    import datasets

    was_hidden = datasets.are_progress_bars_disabled()
    try:
        datasets.enable_progress_bars()
        with pipeline._datasets_bars(False):
            assert datasets.are_progress_bars_disabled()
        with pipeline._datasets_bars(True):
            assert not datasets.are_progress_bars_disabled()
        assert not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        with pipeline._datasets_bars(False):
            pass
        assert datasets.are_progress_bars_disabled()
    finally:
        (datasets.disable_progress_bars if was_hidden else datasets.enable_progress_bars)()
