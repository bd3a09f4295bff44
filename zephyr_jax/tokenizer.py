"""The Mistral-7B-v0.1 tokenizer and the Zephyr chat template.

BOS/EOS policy (the same everywhere in zephyr_jax):
- Every sequence starts with exactly one BOS (`<s>`, id 1), added by the tokenizer when it encodes a whole
  rendered conversation (its post-processor). The chat template itself emits no BOS, so rendering and then
  encoding never doubles it.
- Every turn ends in EOS (`</s>`, id 2): the template writes `eos_token` after each message, and the tokenizer
  reads that text back as the single special token. `</s>` is a learned target, never treated as padding:
  the tokenizer has no pad token, and batches carry an explicit mask instead.
"""

from __future__ import annotations

import functools
import json
import os

import transformers

from zephyr_jax.hub import hub_error, local_dir

# Zephyr's chat template, exactly as in HuggingFaceH4/zephyr-7b-beta's tokenizer_config.json.
ZEPHYR_CHAT_TEMPLATE = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # one of them makes a tokenizer


def mistral_v0_1_model_file() -> str:
    """Path of the Mistral-7B-v0.1 sentencepiece model shipped inside the `mistral-common` package."""
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: this mistral-common release does not ship the v0.1 "
                                "tokenizer; install mistral-common>=1.5")
    return path


def load_tokenizer(path_or_name: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """A transformers tokenizer with the Zephyr chat template.

    None: the real Mistral-7B-v0.1 tokenizer, offline, from `mistral-common` (sentencepiece_tokenizer). A directory
    or hub name: that tokenizer (hub names need the network), given the Zephyr template if it has no chat template
    of its own.
    """
    if path_or_name is None:
        tok = sentencepiece_tokenizer(mistral_v0_1_model_file())
    else:
        _check_tokenizer_path(path_or_name)
        path = os.path.expanduser(path_or_name)
        try:
            tok = _folder_or_hub_tokenizer(path, path_or_name)
        except json.JSONDecodeError as e:  # a file cut short, say: the JSON reader's message names none
            raise ValueError(f"tokenizer {path}: {_invalid_json_file(path)} is not valid JSON ({e})") from e
    if not getattr(tok, "chat_template", None):
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path_or_name or 'mistral-7b-v0.1'} lacks a BOS or EOS token")
    if tok("a").input_ids[-1:] == [tok.eos_token_id]:  # every prompt would end the conversation before the reply
        raise ValueError(f"tokenizer {path_or_name}: it ends every text with EOS {tok.eos_token!r} (saved with "
                         "add_eos_token=True: its tokenizer.json's post-processor appends it); zephyr_jax's chat "
                         "template writes EOS after each turn itself: save it with add_eos_token=False")
    return tok


def _folder_or_hub_tokenizer(path: str, path_or_name: str):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        # tokenizer.json as written: transformers 5's LlamaTokenizer (the class Mistral-7B-v0.1's
        # tokenizer_config.json names) rebuilds its pre-tokenizer and drops a text's leading space.
        return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        # Not transformers' conversion of it (see sentencepiece_tokenizer): code's indentation and a leading
        # space came out as other ids than Mistral's.
        return _with_folder_config(sentencepiece_tokenizer(os.path.join(path, "tokenizer.model")), path)
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except OSError as e:  # a hub name it could not fetch: one line, as hf.resolve says it of models
        raise FileNotFoundError(f"tokenizer {path_or_name!r}: {hub_error(e)}") from e


def _invalid_json_file(path: str) -> str:
    """The first of a tokenizer folder's JSON files that does not parse."""
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError:
            return os.path.join(path, name)
        except OSError:  # not there
            continue
    return "one of its JSON files"


def sentencepiece_tokenizer(model_file: str) -> transformers.PreTrainedTokenizerFast:
    """A fast tokenizer that encodes and decodes as the sentencepiece BPE model in `model_file` does, as Mistral-7B
    was trained: BOS first, no pad token, and "▁" before every text piece, also the one after a special token such
    as `</s>` (Mistral-7B-v0.1's tokenizer.json, transformers' `legacy=True`).

    Built here from the model's pieces: transformers 5 converts a tokenizer.model with its merges ranked by piece
    id rather than score (runs of spaces, such as code's indentation, then split otherwise), and its LlamaTokenizer
    installs a pre-tokenizer that drops a text's leading space. Saved, it reloads as it is (tokenizer.json).
    Each call returns a tokenizer of its own; a process ranks each model's merges once (_built).
    """
    with open(model_file, "rb") as f:
        backend, bos, eos, unk = _built(f.read())
    # add_bos_token says what the post-processor does: transformers 5 rebuilds it from these flags when one is set.
    # (transformers deep-copies tokenizer_object: the cached backend is never the returned tokenizer's.)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, model_max_length=32768,
        clean_up_tokenization_spaces=False, add_bos_token=True, add_eos_token=False)


@functools.lru_cache(maxsize=4)
def _built(model: bytes):
    """(tokenizers.Tokenizer, BOS, EOS, unknown token) of the sentencepiece model serialized in `model`, keyed by
    its bytes. Ranking the merges takes ~0.5 s of Python, and train.run, evaluate and the tests load the same
    tokenizer many times in one process."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in vocab.values() if sp.is_control(i) or sp.is_unknown(i)]
    pieces = {p for p, i in vocab.items() if not (i in special or sp.is_byte(i))}
    # sentencepiece BPE joins the adjacent pair whose union scores highest: that piece's score is the merge's rank.
    merges = sorted(((-sp.get_score(vocab[p]), vocab[p], vocab[p[:k]]), (p[:k], p[k:]))
                    for p in pieces for k in range(1, len(p)) if p[:k] in pieces and p[k:] in pieces)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[pair for _, pair in merges], unk_token=sp.id_to_piece(
        sp.unk_id()), fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # the "▁" the normalizer put first
    backend.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    bos = sp.id_to_piece(sp.bos_id())
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, sp.bos_id())])
    return backend, bos, sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())


def _with_folder_config(tok, path: str):
    """A sentencepiece-built tokenizer given its folder's tokenizer_config.json: its chat template (from
    chat_template.jinja first, as transformers reads it), the tokens it adds past the model's pieces at the ids it
    names, and its BOS, EOS and unknown tokens."""
    from tokenizers import AddedToken

    config_file = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    template_file = os.path.join(path, "chat_template.jinja")  # where transformers 4.47 on saves the template
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            tok.chat_template = f.read()
    elif isinstance(config.get("chat_template"), str):
        tok.chat_template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named templates ("default", "tool_use"): transformers' dict
        tok.chat_template = {t["name"]: t["template"] for t in config["chat_template"]}
    added = config.get("added_tokens_decoder") or {}
    for index, token in sorted(((int(i), t) for i, t in added.items()), key=lambda item: item[0]):
        if token["content"] not in tok.get_vocab():
            tok.add_tokens([AddedToken(token["content"], special=token.get("special", True), normalized=False)],
                           special_tokens=token.get("special", True))
        if tok.convert_tokens_to_ids(token["content"]) != index:
            raise ValueError(f"{config_file}: added token {token['content']!r} has id {index}, but "
                             f"{os.path.join(path, 'tokenizer.model')} gives it "
                             f"{tok.convert_tokens_to_ids(token['content'])}")
    # The special tokens it names (a ChatML fine-tune's eos_token "<|im_end|>"), as transformers takes them: the
    # template's eos_token and the token generation stops at. A value is the text or an AddedToken's dict.
    named = {key: value.get("content") if isinstance(value, dict) else value
             for key in ("bos_token", "eos_token", "unk_token") if (value := config.get(key)) is not None}
    tok.add_special_tokens({key: text for key, text in named.items() if isinstance(text, str)})
    return tok


def _check_tokenizer_path(path_or_name: str) -> None:
    """A local tokenizer path that does not exist, or a directory without a tokenizer, named (transformers takes
    the first for a malformed hub name and says of the second that sentencepiece is not installed)."""
    path = local_dir(path_or_name, "tokenizer")
    if path is not None and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer directory {path} holds none of {', '.join(TOKENIZER_FILES)} (it "
                                f"holds {sorted(os.listdir(path))[:10]})")


def tokenizer_for(path: str | None, tokenizer: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer that goes with a model (as zephyr_jax.load reads it): `tokenizer` if given, else
    tokenizer_source(path)'s."""
    return load_tokenizer(tokenizer if tokenizer is not None else tokenizer_source(path))


def tokenizer_source(path: str | None) -> str | None:
    """Where a model's tokenizer is, as load_tokenizer takes it: the model directory (or hub name: hf.resolve
    fetches its snapshot, as loading the model does) when it holds a tokenizer, else the "tokenizer" of a training
    workdir's config.json, else None (Mistral-7B-v0.1, offline)."""
    from zephyr_jax import hf  # imported here: it brings in jax
    from zephyr_jax.loading import is_workdir, run_config

    if not (path and isinstance(path, str)):
        return None
    local = hf.resolve(path)
    if any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES):
        return local if os.path.isdir(os.path.expanduser(path)) else path  # a hub name: not this machine's cache
    if is_workdir(local):
        return (run_config(local) or {}).get("tokenizer")
    return None


CHAT_ROLES = ("system", "user", "assistant")


def check_chat(messages, where: str = "messages") -> None:
    """ValueError naming the first message that is not {'role': system|user|assistant, 'content': str} (a
    template renders nothing for a role it does not know: "User" or "human" lost the question)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{where} is a {type(messages).__name__}, not a list of {{'role', 'content'}} messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}[{i}] must be {{'role': system|user|assistant, 'content': str}}, got "
                             f"{str(m)[:100]}")


def with_system_message(messages: list[dict]) -> list[dict]:
    """Prepends an empty system message when the conversation has none (as the Zephyr recipe does)."""
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": ""}, *messages]


def is_zephyr_template(tok) -> bool:
    """Whether the tokenizer's chat template writes Zephyr's turns (`<|system|>`, `<|user|>`, `<|assistant|>`):
    the recipe's, also as variants of it write it (with a `{{ bos_token }}` of their own, other whitespace)."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    return all(marker in template for marker in ("<|system|>", "<|user|>", "<|assistant|>"))


def render_template(tok, messages: list[dict], add_generation_prompt: bool = False,
                    continue_final_message: bool = False) -> tuple[list[dict], str]:
    """(the messages as the template renders them, its text). The Zephyr template (is_zephyr_template) gets an
    empty system turn first when the conversation has none, as the recipe trains; any other template renders the
    messages as given, as transformers and vLLM render them (Mistral-Instruct-v0.3's would put the empty system
    text into the first user turn, ChatML's add a turn its models never saw, Qwen's lose its default system
    prompt). continue_final_message: the last (assistant) message is a prefix for the model to continue, left
    open rather than closed with `</s>` (transformers' option of that name)."""
    check_chat(messages)
    messages = with_system_message(messages) if is_zephyr_template(tok) else list(messages)
    return messages, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False,
                continue_final_message: bool = False) -> str:
    """The conversation as template text (render_template: the Zephyr template with an empty system turn)."""
    return render_template(tok, messages, add_generation_prompt, continue_final_message)[1]


def adds_bos(tok, text: str) -> bool:
    """Whether encoding `text` takes the tokenizer's BOS: not when the text (a template that writes its own)
    starts with one, so every sequence has exactly one."""
    return not (tok.bos_token and text.startswith(tok.bos_token))


def encode_text(tok, text: str) -> list[int]:
    """Token ids with one BOS (adds_bos)."""
    return tok(text, add_special_tokens=adds_bos(tok, text)).input_ids
