"""The real Mistral-7B-v0.1 tokenizer (offline, from mistral-common) and the Zephyr chat template."""

import json
import os
import re
import shutil
import textwrap

import pytest
import sentencepiece as spm
import transformers

from zephyr_jax.tokenizer import (ZEPHYR_CHAT_TEMPLATE, encode_text, load_tokenizer, mistral_v0_1_model_file,
                                  render_chat, tokenizer_source, with_system_message)

# zephyr-7b-beta's chat template's rendering of this conversation.
CONVERSATION = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
RENDERED = "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_hello_world_ids(tok):
    assert tok("Hello world").input_ids == [1, 22557, 1526]
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (1, 2, 32000)
    assert tok.pad_token is None  # </s> must never double as padding


def test_template_renders_recipe_string(tok):
    assert tok.chat_template == ZEPHYR_CHAT_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == RENDERED
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    # No system message given: an empty one is inserted, as the recipe does.
    assert render_chat(tok, CONVERSATION[1:]) == RENDERED
    assert with_system_message(CONVERSATION) == CONVERSATION
    # The ids zephyr-7b-beta's own tokenizer gives this prompt (tjake/Jlama's TestCorrectness, testPromptSupport):
    # "▁" before the text after each </s>, none before the "<" after a newline, <|assistant|>\n last.
    pirate = [{"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
              {"role": "user", "content": "How many helicopters can a human eat in one sitting?"}]
    assert encode_text(tok, render_chat(tok, pirate, add_generation_prompt=True)) == [1] + [
        523, 28766, 6574, 28766, 28767, 13, 1976, 460, 264, 10131, 10706, 10093, 693, 1743, 2603, 3673, 297, 272, 3238,
        302, 264, 17368, 380, 2, 28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 5660, 1287, 19624, 410, 1532, 541,
        264, 2930, 5310, 297, 624, 6398, 28804, 2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]


def test_a_message_the_template_would_drop_is_refused_naming_it(tok):
    """A role the template does not know (a tool turn, "human") or content that is not text (None, a list of parts)
    rendered as nothing or as "None": the question was lost without a word. Refused, naming the message."""
    for bad in ({"role": "tool", "content": "42"}, {"role": "human", "content": "Hi"},
                {"role": "user", "content": None}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "user"}):
        with pytest.raises(ValueError, match=r"messages\[1\] must be \{'role': system\|user\|assistant, 'content': "
                                             r"str\}, got "):
            render_chat(tok, [{"role": "user", "content": "Hi"}, bad])
    with pytest.raises(ValueError, match=r"^messages is a str, not a list of \{'role', 'content'\} messages$"):
        render_chat(tok, "Hi")  # a prompt where a conversation belongs: not read as turns of one character


def test_a_template_with_zephyrs_user_and_assistant_tags_but_no_system_turn_gets_none(tok):
    """Only a template that writes all three of Zephyr's turns gets the recipe's empty system turn: one with
    <|user|> and <|assistant|> that refuses a system role (Phi-3-mini's first template did) renders the
    conversation as given, as transformers renders it."""
    other = load_tokenizer()
    other.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% else %}{{ '<|assistant|>\\n' + m['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    messages = CONVERSATION[1:]
    rendered = other.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|assistant|>\n"
    assert render_chat(other, messages, add_generation_prompt=True) == rendered


def test_a_tokenizer_without_bos_or_eos_is_refused(tok, tmp_path):
    """Every sequence starts with BOS and every turn ends in EOS: a tokenizer lacking either (one set to None in
    its config) would train sequences without them. Refused, naming the folder."""
    for missing in ("bos_token", "eos_token"):
        folder = tmp_path / missing
        tok.save_pretrained(str(folder))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config[missing] = None
        config_file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"tokenizer {re.escape(str(folder))} lacks a BOS or EOS token"):
            load_tokenizer(str(folder))


# Mistral-Instruct-v0.1's rule (roles alternate from a user turn, no system role), with its own BOS.
INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Mistral-Instruct-v0.3's rule for a system message: its text leads the last user turn.
INSTRUCT_V3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system is defined %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


def test_another_template_gets_no_system_turn_and_one_bos(tmp_path):
    """The empty system turn is the Zephyr recipe's: any other template renders the conversation as given. A
    template that writes its own <s> must not get the tokenizer's too."""
    other = load_tokenizer()
    other.chat_template = INSTRUCT_TEMPLATE
    text = render_chat(other, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<s>[INST] Hi [/INST]"
    assert encode_text(other, text) == [1] + other("[INST] Hi [/INST]", add_special_tokens=False).input_ids
    # A template that names the system role only to refuse it (Gemma's way) also gets the conversation as given.
    other.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                           "supported') }}{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                           "{% endfor %}")
    assert render_chat(other, [{"role": "user", "content": "Hi"}]) == "user: Hi"
    # Templates that take a system turn get none they were not given either, as transformers and vLLM render
    # them: ChatML's would gain a turn its models never saw, Mistral-Instruct-v0.3's the empty system text in the
    # user turn ("[INST] \n\nHi[/INST]").
    for template in (CHATML_TEMPLATE, INSTRUCT_V3_TEMPLATE):
        other.chat_template = template
        for messages in ([{"role": "user", "content": "Hi"}], CONVERSATION):
            assert render_chat(other, messages, add_generation_prompt=True) == other.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(other, [{"role": "user", "content": "Hi"}]) == "<s>[INST] Hi[/INST]"
    zephyr = load_tokenizer()
    prompt = render_chat(zephyr, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert encode_text(zephyr, prompt) == zephyr(prompt).input_ids and encode_text(zephyr, prompt)[:2] != [1, 1]


# Texts where a tokenizer converted with merges out of score order, or one that drops a leading space, parts from
# sentencepiece: runs of spaces (code's indentation), a leading space, a tab, byte fallback, CJK and an emoji.
AWKWARD = ["def f(x):\n    if x:\n        return 1\n    return 0", "Sure.  Here  it is:\n\n  - a\n  - b",
           " leading space", "   ", "a\tb \t c", "x\u00a0y \u2028 z", "中文  테스트 😀😀", "end  "]


def test_encoding_matches_sentencepiece(tok, tmp_path):
    """Same ids as sentencepiece itself (the tokenizer Mistral was trained with) for a rendered conversation,
    encoding each text piece between `</s>` tokens (each piece starting a fresh "▁"-prefixed text), and for the
    awkward texts, also from a saved copy reloaded by transformers; the ids decode to the text."""
    sp = spm.SentencePieceProcessor(model_file=mistral_v0_1_model_file())
    expected = [1]
    pieces = RENDERED.split("</s>")
    for i, piece in enumerate(pieces):
        if piece:
            expected += sp.encode(piece)
        if i < len(pieces) - 1:
            expected.append(2)
    ids = tok(RENDERED).input_ids
    assert ids == expected
    assert ids.count(1) == 1 and ids[0] == 1  # one BOS: the template emits none
    assert ids.count(2) == 3  # every turn ends in </s>

    # Its flags say what it does: transformers 5 rebuilds the post-processor from them when one is set.
    flagged = load_tokenizer()
    flagged.add_eos_token = False
    assert flagged.add_bos_token and flagged("Hi").input_ids == [1, 15359]

    tok.save_pretrained(str(tmp_path))
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in AWKWARD + [open(textwrap.__file__, encoding="utf-8").read()]:  # Python, indented
        assert tok(text).input_ids == reloaded(text).input_ids == [1] + sp.encode(text), text[:40]
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_a_process_builds_a_sentencepiece_models_merges_once_and_each_load_is_its_own(tok, monkeypatch):
    """Ranking the merges from sentencepiece's pieces takes ~0.5 s of Python, and train.run, evaluate and the tests
    load the same tokenizer many times in one process: a second load builds nothing, encodes as the first, and is
    a tokenizer of its own (a template or flag set on one is no other's)."""
    built = []
    real = spm.SentencePieceProcessor
    monkeypatch.setattr(spm, "SentencePieceProcessor", lambda *a, **k: built.append(k) or real(*a, **k))
    again = load_tokenizer()
    assert built == []
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert again(RENDERED).input_ids == tok(RENDERED).input_ids
    assert again.backend_tokenizer is not tok.backend_tokenizer
    again.chat_template, again.add_eos_token = "{{ messages }}", True
    again.add_tokens(["<|new|>"])
    fresh = load_tokenizer()
    assert fresh.chat_template == ZEPHYR_CHAT_TEMPLATE and not fresh.add_eos_token and len(fresh) == 32000
    assert fresh(RENDERED).input_ids == tok(RENDERED).input_ids and tok.chat_template == ZEPHYR_CHAT_TEMPLATE


def test_tokenizer_from_directory_gets_template(tok, tmp_path):
    plain = transformers.AutoTokenizer.from_pretrained(_save_without_template(tok, tmp_path))
    assert not plain.chat_template
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == ZEPHYR_CHAT_TEMPLATE
    assert loaded(RENDERED).input_ids == tok(RENDERED).input_ids


def test_a_hub_format_tokenizer_directory_encodes_as_sentencepiece(tok, tmp_path):
    """A directory as the hub holds Mistral-7B-v0.1's tokenizer: tokenizer.json, and a tokenizer_config.json naming
    LlamaTokenizer (legacy, BOS added, no EOS). transformers 5's LlamaTokenizer rebuilds the pre-tokenizer and drops
    a text's leading space; load_tokenizer reads tokenizer.json as written, as sentencepiece encodes."""
    sp = spm.SentencePieceProcessor(model_file=mistral_v0_1_model_file())
    tok.save_pretrained(str(tmp_path))
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="LlamaTokenizer", legacy=True, add_bos_token=True, add_eos_token=False)
    config_file.write_text(json.dumps(config))
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))(" leading space").input_ids != \
        [1] + sp.encode(" leading space")  # what load_tokenizer avoids (if this holds no more, the workaround can go)
    loaded = load_tokenizer(str(tmp_path))
    for text in AWKWARD:
        assert loaded(text).input_ids == [1] + sp.encode(text), text
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    assert loaded(RENDERED).input_ids == tok(RENDERED).input_ids
    assert (loaded.bos_token_id, loaded.eos_token_id) == (1, 2)


def test_a_sentencepiece_only_tokenizer_directory_encodes_as_sentencepiece(tmp_path):
    """A directory with tokenizer.model and no tokenizer.json (older uploads): transformers' conversion split code's
    indentation and dropped a leading space (" leading space": [1, 5374, 2764], not [1, 28705, 5374, 2764]).
    Built from sentencepiece's pieces instead, with the folder's chat template and added tokens."""
    sp = spm.SentencePieceProcessor(model_file=mistral_v0_1_model_file())
    shutil.copy(mistral_v0_1_model_file(), tmp_path / "tokenizer.model")
    assert tokenizer_source(str(tmp_path)) == str(tmp_path)  # a model folder's own, not Mistral-7B-v0.1's
    assert load_tokenizer(str(tmp_path)).chat_template == ZEPHYR_CHAT_TEMPLATE  # no config: no template of its own
    assert tokenizer_source(None) is None  # (no model path: Mistral-7B-v0.1's)
    template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
              "chat_template": template,
              "added_tokens_decoder": {"2": {"content": "</s>", "special": True},
                                       "32000": {"content": "<|extra|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(str(tmp_path))
    for text in AWKWARD + ["def f(x):\n    return 1"]:
        assert loaded(text).input_ids == [1] + sp.encode(text), text
    assert loaded.chat_template == template and loaded.convert_tokens_to_ids("<|extra|>") == 32000
    # Named templates (a list in tokenizer_config.json) as transformers reads them, not Zephyr's in their place
    named = [{"name": "default", "template": template}, {"name": "tool_use", "template": "{{ tools }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert load_tokenizer(str(tmp_path)).chat_template == transformers.PreTrainedTokenizerFast(
        tokenizer_object=loaded.backend_tokenizer, chat_template=named).chat_template == {
            "default": template, "tool_use": "{{ tools }}"}
    assert render_chat(load_tokenizer(str(tmp_path)), [{"role": "user", "content": "hi"}]) == "hi</s>"
    # Where transformers (4.47 on) saves it, and reads it first: not Zephyr's in its place. And the special tokens it
    # names (a ChatML fine-tune's end of turn), as transformers takes them: the template's eos_token, and the token
    # generation stops at.
    (tmp_path / "chat_template.jinja").write_text(template.replace("eos_token", "eos_token + '\\n'"))
    for eos in ("<|extra|>", {"__type": "AddedToken", "content": "<|extra|>", "special": True}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": eos}))
        loaded = load_tokenizer(str(tmp_path))
        assert loaded.chat_template == (tmp_path / "chat_template.jinja").read_text()
        assert (loaded.eos_token, loaded.eos_token_id, loaded.bos_token_id) == ("<|extra|>", 32000, 1)
        assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi<|extra|>\n"
    config["added_tokens_decoder"] = {"32001": {"content": "<|extra|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"added token '<\|extra\|>' has id 32001, but .*tokenizer.model gives it "
                                         r"32000"):
        load_tokenizer(str(tmp_path))


def _save_without_template(tok, path):
    template, tok.chat_template = tok.chat_template, None
    try:
        tok.save_pretrained(str(path))
    finally:
        tok.chat_template = template
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    return str(path)


def test_a_tokenizer_path_that_is_not_one_is_named(tmp_path, monkeypatch):
    """transformers said of a missing path that a repo id must look like 'repo_name', and of a directory without a
    tokenizer that sentencepiece is not installed."""
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*/missing does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"^tokenizer 'no-such-org/no-such-tokenizer': "):  # (hub, offline)
        load_tokenizer("no-such-org/no-such-tokenizer")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer .*/tokenizer.json is a file: pass the directory"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    saved = tmp_path / "cut"  # a copy cut short: the JSON reader's message names no file
    load_tokenizer().save_pretrained(str(saved))
    (saved / "tokenizer_config.json").write_text((saved / "tokenizer_config.json").read_text()[:20])
    with pytest.raises(ValueError, match=r"tokenizer .*/cut: .*/cut/tokenizer_config.json is not valid JSON \(Un"):
        load_tokenizer(str(saved))
    # ... also past a JSON file the folder lacks (tokenizer_config.json is optional)
    (saved / "tokenizer_config.json").unlink()
    (saved / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match=r"tokenizer .*/cut: .*/cut/tokenizer.json is not valid JSON"):
        load_tokenizer(str(saved))
    # A tokenizer saved with add_eos_token=True: every prompt ended in </s> (dDPO refused every row as "prompt ids
    # are not a prefix of the conversation's ids"; dSFT ended each turn on two)
    load_tokenizer().save_pretrained(str(tmp_path / "eos"))
    spec = json.loads((tmp_path / "eos" / "tokenizer.json").read_text())
    spec["post_processor"]["single"].append({"SpecialToken": {"id": "</s>", "type_id": 0}})
    spec["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [2], "tokens": ["</s>"]}
    (tmp_path / "eos" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer .*/eos: it ends every text with EOS '</s>' \(saved with "
                                         r"add_eos_token=True"):
        load_tokenizer(str(tmp_path / "eos"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory .*/model holds none of tokenizer.json, "
                                                r"tokenizer.model, tokenizer_config.json \(it holds \['config.json'\]"):
        load_tokenizer(str(tmp_path / "model"))
    import mistral_common  # a release without the v0.1 model: which one to install

    monkeypatch.setattr(mistral_common, "__file__", str(tmp_path / "old_release" / "__init__.py"))
    with pytest.raises(FileNotFoundError, match=r"old_release/data/tokenizer.model.v1 is missing: this "
                                                r"mistral-common release .* install mistral-common>=1.5"):
        load_tokenizer()
