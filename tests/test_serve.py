"""python -m zephyr_jax.serve as a real process on 127.0.0.1, driven by real clients: the `openai` package (chat,
streamed chat, completions with log-probs), lm-eval's local-completions (against the in-process adapter), raw
HTTP for every bad request, a full queue and a client that walks away. Greedy replies equal generate() and
transformers' greedy generation on the same weights, for concurrent requests arriving while others decode."""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import transformers

from tests import cpu_xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("server")  # one worker starts the module's server, for all its tests
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny-zephyr"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The server process (float32, 4 slots, at most 4 waiting, the API key from $ZEPHYR_JAX_API_KEY), its base
    URL and its log file. Its end checks SIGTERM's: a reply in progress is cut (--shutdown-timeout=0), not decoded
    to its 990 tokens first (uvicorn's default waited for every request, the queued ones too, past a caller's
    grace period), and the server exits with SIGTERM's status."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zephyr_jax.serve", f"--model={tiny_model_dir}", "--dtype=float32",
         f"--port={port}", f"--served-model-name={NAME}", "--max-slots=4", "--max_queue=4",
         "--max-length=1024", "--decode_steps=4", "--shutdown-timeout=0"],  # (underscores: taken too)
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,  # the key from the environment, --api-key's default
        env={**os.environ, "XLA_FLAGS": cpu_xla.flags(1), "ZEPHYR_JAX_API_KEY": KEY})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the server did not come up in 180 s:\n" + log_path.read_text()[-3000:])
    yield base, log_path
    body = {"model": NAME, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 990,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            lines = r.iter_lines()
            assert r.status_code == 200, r.read()
            first = next(line for line in lines if line.startswith("data: "))
            proc.terminate()
            events = [first]
            try:
                events += [line for line in lines if line.startswith("data: ")]  # until the server cuts the stream
            except httpx.HTTPError:
                pass
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGTERM, log_path.read_text()[-3000:]
    assert "data: [DONE]" not in events and len(events) < 990, (len(events), log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same weights in process: zephyr_jax (float32), transformers, and the tokenizer."""
    import zephyr_jax

    model, tok = zephyr_jax.load(tiny_model_dir, dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    return model, reference.eval(), tok


def _chat_ids(tok, text):
    from zephyr_jax.tokenizer import render_chat

    return tok(render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)).input_ids


def _hf_greedy_text(reference, tok, ids, n):
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=0,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_openai_client_concurrent_greedy_chats_equal_generate_and_transformers(client, local):
    """Six concurrent chats of different prompt and reply lengths on 4 slots, the last ones sent while the first
    decode: each reply equals generate()'s and transformers' greedy reply to the same prompt."""
    from zephyr_jax.generate import generate

    model, reference, tok = local
    questions = [("What is 2 + 2?", 30), ("Hi", 7), ("Write a long story about a cat and a dog. " * 6, 45),
                 ("Name three colours.", 20), ("Why?", 12), ("Tell me about the sea and the sky.", 38)]

    def ask(q, n, delay):
        time.sleep(delay)
        return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}],
                                              temperature=0, max_tokens=n)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, q, n, 0.0 if i < 4 else 0.3) for i, (q, n) in enumerate(questions)]
        replies = [f.result() for f in futures]
    ours = [generate(model, tok, [[{"role": "user", "content": q}]], max_new_tokens=n)[0] for q, n in questions]
    for (q, n), reply, mine in zip(questions, replies, ours):
        text, count = _hf_greedy_text(reference, tok, _chat_ids(tok, q), n)
        assert reply.choices[0].message.content == mine == text
        assert reply.usage.prompt_tokens == len(_chat_ids(tok, q))
        assert reply.usage.completion_tokens == count + (reply.choices[0].finish_reason == "stop")
        assert reply.choices[0].finish_reason == ("length" if count == n else "stop")
    assert len({r.choices[0].message.content for r in replies}) == len(replies)


def test_openai_client_streaming_and_completion_logprobs(client, local):
    model, _, tok = local
    messages = [{"role": "user", "content": "Count to ten."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=25)
    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=25,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # Completions with echo + logprobs: the prompt's log-probs are the model's own (a full forward pass).
    import jax
    import jax.numpy as jnp

    out = client.completions.create(model=NAME, prompt="The sky is blue and", max_tokens=5, temperature=0,
                                    echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    ids = tok("The sky is blue and").input_ids
    assert out.choices[0].text.startswith("The sky is blue and") and out.usage.prompt_tokens == len(ids)
    assert len(lp.token_logprobs) == len(ids) + 5 and lp.token_logprobs[0] is None
    logps = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]))[0], axis=-1))
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], logps[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # the top 2 and the token itself
    # Sampling with a seed repeats; without one it is fresh each call.
    draw = lambda **kw: client.completions.create(model=NAME, prompt="Once upon", max_tokens=12, temperature=1.0,
                                                  **kw).choices[0].text
    assert draw(seed=7) == draw(seed=7)


def test_completions_list_the_stop_token_and_keep_the_replys_leading_space(client, local):
    """lm-eval scores a continuation with max_tokens=1, echo and logprobs, and reads the entries after the context
    but the last (the next token's): a reply that stopped at once (EOS next) listed no entry after the prompt, and
    the continuation lost its last token's log-prob. The stop token is listed, adding no text, as vLLM does. And
    the reply's text is what it adds to the prompt's (its first token's leading space was dropped unechoed)."""
    import jax
    import jax.numpy as jnp

    model, _, tok = local
    prompt = "The sky is blue and"
    ids = tok(prompt).input_ids
    logps = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]))[0, -1]))
    after = int(np.argmax(logps))  # the greedy next token, made the stop token (as EOS would be)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1,
                                    extra_body={"stop_token_ids": [after]})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.text == prompt and out.usage.completion_tokens == 1
    assert len(choice.logprobs.token_logprobs) == len(ids) + 1 and choice.logprobs.text_offset[-1] == len(prompt)
    np.testing.assert_allclose(choice.logprobs.token_logprobs[-1], logps[after], atol=1e-4)

    # A prompt whose greedy reply starts with a word ("▁" piece): echoed or not, the text joins to the prompt's.
    for prompt in ("The sky is blue and", "Once upon a time", "Hello there", "I like", "Tell me", "We"):
        first = int(np.argmax(model(jnp.asarray([tok(prompt).input_ids]))[0, -1]))
        if tok.convert_ids_to_tokens(first).startswith("\u2581"):
            break
    else:
        pytest.fail("no prompt's greedy reply starts with a word")
    echoed = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    alone = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
    text, lp = alone.choices[0].text, alone.choices[0].logprobs
    assert text.startswith(" ") and echoed.choices[0].text == prompt + text
    shown = [t if t not in tok.all_special_tokens else "" for t in lp.tokens]
    assert "".join(shown) == text and all(text[at:at + len(t)] == t for at, t in zip(lp.text_offset, shown))
    # A stop string is matched in that text, the space included: one that begins with it ends the reply at once
    # (the engine searched the reply decoded alone, without the space: " vm" came back, stop=" vm" unseen); one
    # that begins there but never completes cuts nothing. The text is the uncut one's up to the stop (one right
    # after the space left "", not " "), and the reply the tokens that complete it (as their strings show).
    for stop, want in ((text[:2], ("", "stop")), (text[1:3], (text[:text.find(text[1:3])], "stop")),
                       (text[-2:], (text[:text.find(text[-2:])], "stop")),
                       (text[:2] + "\x00", (text, alone.choices[0].finish_reason))):
        cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, stop=[stop])
        assert (cut.choices[0].text, cut.choices[0].finish_reason) == want, stop
        if want[1] == "stop":
            assert cut.usage.completion_tokens == next(k for k in range(1, 7) if stop in "".join(shown[:k])), stop


def _post(base, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(base + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def _byte_runs(tok, ids: list[int], special: set[int]) -> list[list[int]]:
    """The positions of ids' byte-fallback tokens, in runs that a piece ends (`special` tokens decode to nothing)."""
    runs, run = [], []
    for k, piece in enumerate(tok.convert_ids_to_tokens(ids)):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            run.append(k)
        elif ids[k] not in special:
            runs, run = runs + [run] * bool(run), []
    return runs + [run] * bool(run)


def test_logprob_strings_of_byte_tokens_join_to_the_tokenizers_decode():
    """Byte-fallback tokens (`<0xF0>`: one character over several tokens) against the tokenizer's own decode: the
    token strings join to the decoded text also where the bytes are not valid UTF-8 (an emoji cut short by
    max_tokens, a random model's stray bytes: the decoder writes a U+FFFD for each byte, and the strings lost them
    in 236 of 500 random replies), each byte token's `bytes` are its own byte, joining to the text's UTF-8 where it
    is valid, a stream's entries (sent up to the last piece until the end) equal the whole reply's, and the
    openai client parses the response."""
    import random

    from openai.types.chat import ChatCompletion

    from zephyr_jax.engine import Request, reply_lead
    from zephyr_jax.serve import Server
    from zephyr_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    server = Server(None, tok, NAME)
    byte_ids = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    parrot = tok("ok 🦜 café", add_special_tokens=False).input_ids
    special, special_strings = set(tok.all_special_ids), set(tok.all_special_tokens)
    rng = random.Random(0)
    # (a run of two characters, one of them two bytes; a space byte after a piece: decoded alone, it is stripped)
    two = [byte_ids[b] for b in "ü🦜".encode()] + parrot[:1]
    replies = [parrot, parrot[:3 + [tok.convert_ids_to_tokens(t) for t in parrot].index("<0xF0>")], two,
               [*parrot[:1], byte_ids[0x20], byte_ids[0x41], *parrot[1:2]]] + [
        [rng.choice(byte_ids) if rng.random() < 0.4 else rng.choice([tok.eos_token_id, *parrot, rng.randrange(32000)])
         for _ in range(rng.randrange(1, 12))] for _ in range(60)]
    for ids in replies:
        text = tok.decode(ids, skip_special_tokens=True)
        r = Request([1, *parrot], tokens=list(ids), logprobs=[-1.0] * len(ids), text=text,
                    lead=reply_lead(tok, [1, *parrot], ids[0]),  # (as the engine sets it)
                    top_logprobs=[[(t, -2.0), (byte_ids[0x9C], -3.0)] for t in ids],
                    prompt_logprobs=[None] + [-1.0] * len(parrot), prompt_top_logprobs=[None] * (len(parrot) + 1))
        lp = server.chat_logprobs(r)
        body = {"id": "x", "object": "chat.completion", "created": 0, "model": NAME, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": "stop"}]}
        parsed = ChatCompletion.model_validate(json.loads(json.dumps(body))).choices[0].logprobs.content
        entries = [e for e in parsed if e.token != tok.eos_token]  # a special token shows as itself, adds no text
        assert "".join(e.token for e in entries) == text, (ids, [e.token for e in parsed])
        assert all(e.bytes == [int(tok.convert_ids_to_tokens(t)[3:5], 16)] for e, t in zip(parsed, ids)
                   if t in byte_ids)
        joined = bytes(b for e in entries for b in e.bytes)
        assert joined.decode(errors="replace") == text or "\ufffd" in text
        assert all(e.token == tok.convert_ids_to_tokens(t) for e, t in zip(parsed, ids) if t in special)
        # An alternative is read after the TAIL tokens before it as after the whole reply before it
        assert all(server.strings.alternative(ids, k, t) == server.strings.entries([*ids[:k], t], k)[0]
                   for k in range(len(ids)) for t, _ in r.top_logprobs[k])
        # Inside a run of byte tokens: valid UTF-8 shows each character at the byte that completes it (the strings
        # so far are the UTF-8 decoder's reading of the bytes so far), invalid bytes a U+FFFD each, as decoded.
        for run in _byte_runs(tok, ids, special):
            raw, strings = bytes(int(tok.convert_ids_to_tokens(ids[k])[3:5], 16) for k in run), \
                [parsed[k].token for k in run]
            try:
                raw.decode()
            except UnicodeDecodeError:
                assert strings == ["\ufffd"] * len(run), (ids, strings)
            else:
                assert ["".join(strings[:n]) for n in range(1, len(run) + 1)] == \
                    [raw[:n].decode(errors="ignore") for n in range(1, len(run) + 1)], (ids, strings)
        # Streamed: each chunk lists the tokens up to the last piece (a byte's string waits for its run's end).
        streamed, sent = [], 0
        for n in range(1, len(ids) + 1):
            part = server.streamable(Request([1], tokens=ids[:n], logprobs=r.logprobs[:n],
                                             top_logprobs=r.top_logprobs[:n]), done=n == len(ids))
            streamed += server.chat_logprobs(part, sent)["content"]
            sent = len(part.tokens)
            if ids[n - 1] not in byte_ids and ids[n - 1] not in special:  # a piece last: all the text so far is sent
                assert "".join(e["token"] for e in streamed if e["token"] not in special_strings) == \
                    tok.decode(ids[:n], skip_special_tokens=True), (ids[:n], streamed)
        assert streamed == lp["content"]
        completion = server.completion_logprobs(r, echo=True)  # the legacy API's strings join to its text too
        shown = ["" if t in tok.all_special_tokens else t for t in completion["tokens"]]
        assert "".join(shown) == server.completion_text(r, echo=True)
    whole = server.chat_logprobs(Request([1], tokens=parrot, logprobs=[-1.0] * len(parrot),
                                         top_logprobs=[[(byte_ids[0x9C], -3.0)]] * len(parrot)))["content"]
    assert bytes(b for e in whole for b in e["bytes"]).decode() == tok.decode(parrot)
    # An id past the tokenizer's (a model's vocabulary padded past it) shows as "<id N>" and adds no text; decoding
    # skips it, so the bytes on either side still make their character
    unknown = len(tok) + 1
    ids = [*parrot[:1], byte_ids[0xC3], unknown, byte_ids[0xA9], *parrot[1:2]]
    entries = server.strings.entries(ids)
    assert entries[2] == (f"<id {unknown}>", "", [])
    assert [text for _, text, _ in entries][1:4] == ["", "", "é"]  # the character at the byte that completes it
    assert "".join(text for _, text, _ in entries) == tok.decode([t for t in ids if t != unknown])
    # The emoji's last byte as an alternative after its first three completes the character.
    assert [e["top_logprobs"][0]["token"] for e in whole if e["token"] == "🦜"] == ["🦜"]


def test_a_requests_sampling_fields_reach_the_engine():
    """temperature, top_p and top_k as the request gives them (every request of the tests below sends a temperature
    of 0 or 1 and leaves top_p and top_k out: a server that sampled every request at 1.0 with no filters passed),
    with the other fields of SamplingParams, and OpenAI's defaults where they are left out."""
    from zephyr_jax.serve import ApiError, sampling_params

    body = {"temperature": 0.3, "top_p": 0.85, "top_k": 7, "seed": 5, "stop": ["x"], "stop_token_ids": [9],
            "ignore_eos": True}
    got = sampling_params(body, max_tokens=4, logprobs=2, seed_offset=1)
    assert (got.temperature, got.top_p, got.top_k, got.seed, got.stop, got.stop_token_ids, got.ignore_eos,
            got.max_tokens, got.logprobs) == (0.3, 0.85, 7, 6, ("x",), (9,), True, 4, 2)
    default = sampling_params({}, max_tokens=4)
    assert (default.temperature, default.top_p, default.top_k, default.stop, default.ignore_eos) == (1.0, 1.0, 0, (),
                                                                                                    False)
    # OpenAI and vLLM take any 64-bit seed, and vLLM's top_k=-1 for "no limit": both were a 400 here. A seed is
    # folded into the engine's 32 bits, the same every time; one past 64 bits is still refused.
    wide = [sampling_params({"seed": s}, max_tokens=4).seed for s in (-1, -1, 2 ** 40 + 5, 2 ** 63 - 1, -2 ** 63)]
    assert wide == [2 ** 32 - 1, 2 ** 32 - 1, 5, 2 ** 32 - 1, 0]
    assert sampling_params({"top_k": -1}, max_tokens=4).top_k == 0
    for field, value in (("seed", 2 ** 63), ("seed", -2 ** 63 - 1), ("top_k", -2)):
        with pytest.raises(ApiError) as refused:
            sampling_params({field: value}, max_tokens=4)
        assert refused.value.status == 400 and refused.value.param == field


def test_a_chat_template_that_refuses_the_messages_is_a_400():
    """A served model's own template may refuse a conversation (Mistral-Instruct's: roles must alternate) through
    transformers' raise_exception: the client's mistake, named, not a 500."""
    from zephyr_jax.serve import ApiError, Server
    from zephyr_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()  # (a new tokenizer each call: the template change stays in this test)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    with pytest.raises(ApiError) as refused:
        Server(engine=None, tokenizer=tok, model_name=NAME).chat_prompt({"messages": [{"role": "user",
                                                                                       "content": "hi"}]})
    assert (refused.value.status, refused.value.param) == (400, "messages")
    assert refused.value.message == "the model's chat template refused the messages: Conversation roles must " \
                                    "alternate user/assistant/user/assistant"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    base, _ = server
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    cases = [
        (dict(raw="{not json"), 400, None),
        (dict(body={**chat, "model": "gpt-17"}), 404, "model"),  # OpenAI's and vLLM's status for no such model
        (dict(body={**chat, "messages": [{"role": "user", "content": "word " * 1100}]}), 400, "messages"),
        (dict(body={**chat, "max_tokens": 100000}), 400, "max_tokens"),
        (dict(body={**chat, "max_completion_tokens": 100000}), 400, "max_completion_tokens"),  # (named max_tokens)
        (dict(body={**chat, "temperature": 7}), 400, "temperature"),
        (dict(body={**chat, "top_p": "high"}), 400, "top_p"),
        (dict(body={**chat, "messages": []}), 400, "messages"),
        (dict(body={**chat, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages"),
        (dict(body=chat, key=None), 401, None),
        (dict(body=chat, key="sk-wrong"), 401, None),
        # Values the engine's int32 arrays cannot hold: refused here, and the requests in flight go on (below).
        (dict(body={**chat, "top_k": 10 ** 12}), 400, "top_k"),
        (dict(body={**chat, "stop_token_ids": [2 ** 40]}), 400, "stop_token_ids"),
        (dict(body={**chat, "max_completion_tokens": 0}), 400, "max_completion_tokens"),
        (dict(body={**chat, "max_completion_tokens": 3, "max_tokens": "3"}), 400, "max_tokens"),
        (dict(body={**chat, "stream": True, "stream_options": ["x"]}), 400, "stream_options"),
        (dict(body={**chat, "stream_options": {"include_usage": True}}), 400, "stream_options"),  # stream off
        # Falsy values of the wrong kind are refused too, not read as "none" (0 is a token id).
        (dict(body={**chat, "stop_token_ids": 0}), 400, "stop_token_ids"),
        (dict(body={**chat, "stream": True, "stream_options": []}), 400, "stream_options"),
        (dict(body={**chat, "stream": True, "stream_options": {"continuous_usage_stats": True}}), 400,
         "stream_options"),
        (dict(body={**chat, "stream": True, "stream_options": {"include_usage": "yes"}}), 400,
         "stream_options.include_usage"),  # (the param said include_usage, a field the body has not)
        (dict(body={**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}), 400,
         "messages"),
        (dict(raw='{"model": "%s", "messages": [{"role": "user", "content": "half \\ud800"}]}' % NAME), 400,
         "messages"),
        (dict(raw="[" * 100_000), 400, None),
        (dict(raw='["hi"]'), 400, None),  # JSON, but not an object
        # A lone surrogate in a field's name is echoed in the error: that body could not be encoded, a 500.
        (dict(raw='{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}' % NAME), 400,
         "\ud800"),
        (dict(raw=json.dumps({**chat, "temperature": float("nan")})), 400, "temperature"),
        (dict(body={**chat, "frequency_penalty": 2}), 400, "frequency_penalty"),
        (dict(body={**chat, "response_format": {"type": "json_object"}}), 400, "response_format"),
        (dict(body={**chat, "top_logprobs": 2}), 400, "top_logprobs"),
        # Fields this server does not read (vLLM's sampling options, a typo) are refused, never ignored.
        (dict(body={**chat, "min_tokens": 12}), 400, "min_tokens"),
        (dict(body={**chat, "include_stop_str_in_output": True}), 400, "include_stop_str_in_output"),
        (dict(body={**chat, "temprature": 0.2}), 400, "temprature"),
        (dict(body={**chat, "echo": True}), 400, "echo"),  # a completions field
        (dict(body={**chat, "stop": ["x"] * 33}), 400, "stop"),
        (dict(body={**chat, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs"),  # OpenAI's limit: 20
        (dict(body={**chat, "logprobs": 1}), 400, "logprobs"),  # a bool in the chat API
        (dict(body={**chat, "temperature": -0.5}), 400, "temperature"),
        (dict(body={**chat, "max_tokens": 0}), 400, "max_tokens"),
        (dict(body={**chat, "n": 0}), 400, "n"),
        (dict(body={**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "http://127.0.0.1/x.png"}}]}]}), 400, "messages"),
        (dict(body={**chat, "messages": [{"role": "user", "content": None}]}), 400, "messages"),
        (dict(body={**chat, "messages": [{"role": "tool", "content": "4", "tool_call_id": "1"}]}), 400, "messages"),
    ]
    for kwargs, status, param in cases:
        r = _post(base, "/v1/chat/completions", kwargs.get("body"), kwargs.get("key", KEY), kwargs.get("raw"))
        assert r.status_code == status, (kwargs, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] and error["param"] == param, r.text
        if param == "temprature":  # the message names the endpoint as clients address it
            assert "this server's /v1/chat/completions (it reads " in error["message"], r.text
    assert _post(base, "/v1/completions", {"model": NAME, "prompt": [[5, 99999]]}).status_code == 400
    for prompt in ([True, False], ["a", [1, 2]], [[1, 2], "a"]):  # JSON booleans are not token ids; no mixing
        assert _post(base, "/v1/completions", {"model": NAME, "prompt": prompt}).json()["error"]["param"] == "prompt"
    assert _post(base, "/v1/completions", {"model": NAME, "prompt": "x", "min_p": 0.1}).status_code == 400
    for body, param in (({"prompt": ""}, "prompt"), ({"prompt": ["x", ""]}, "prompt"),
                        ({"prompt": "x", "stream": True}, "stream")):  # (no text to tokenize; streams are chat's)
        refused = _post(base, "/v1/completions", {"model": NAME, **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)
    # lm-eval's local-completions sends a task's every `until` string and the EOS (humaneval: 6): OpenAI's limit of
    # 4 made such tasks fail with a 400.
    humaneval = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>"]
    assert _post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2,
                                           "stop": humaneval}).status_code == 200
    assert _post(base, "/v1/chat/completions", {**chat, "user": "u1", "metadata": {"k": "v"}}).status_code == 200
    # What OpenAI accepts is answered: text content parts are the text they join to, a developer message is a
    # system one (OpenAI's name for it since o1; it was a 400), a system message alone gets a reply, and n > 1
    # streams with top_logprobs=0 (each entry without alternatives).
    greedy = lambda messages, **kw: _post(base, "/v1/chat/completions", {  # noqa: E731
        **chat, "messages": messages, "temperature": 0, "max_tokens": 6, **kw}).json()["choices"][0]["message"]
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]
    assert greedy([{"role": "user", "content": parts}]) == greedy([{"role": "user", "content": "Say hi."}])
    terse = "Be terse."
    assert greedy([{"role": "developer", "content": terse}, {"role": "user", "content": "Hi"}]) == \
        greedy([{"role": "system", "content": terse}, {"role": "user", "content": "Hi"}])
    assert greedy([{"role": "system", "content": terse}], ignore_eos=True)["content"]
    stream = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        **chat, "n": 2, "stream": True, "logprobs": True, "top_logprobs": 0, "stop": list("abcdef")}).text
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1} and stream.endswith("data: [DONE]\n\n")
    entries = [x for e in events for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["content"]]
    assert entries and all(x["top_logprobs"] == [] for x in entries)
    # More sequences than slots + queue (4 + 4) can never be held: 400, not a 429 asking to retry.
    many = _post(base, "/v1/completions", {"model": NAME, "prompt": ["a", "b", "c"], "n": 3})
    assert many.status_code == 400 and many.json()["error"]["param"] == "prompt", many.text
    assert _post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}).status_code == 400
    assert _post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0, "echo": True,
                                           "logprobs": 0}).status_code == 200  # scoring only
    assert _post(base, "/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 9}).json()["error"]["param"] \
        == "logprobs"
    assert httpx.get(base + "/v1/nowhere").status_code == 404
    wrong_method = httpx.get(base + "/v1/chat/completions", headers=AUTH)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"] == \
        "GET is not allowed on /v1/chat/completions", wrong_method.text
    assert httpx.get(base + "/v1/models").status_code == 401
    models = httpx.get(base + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == [NAME]
    ok = _post(base, "/v1/chat/completions", chat)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_logprob_strings_join_to_the_text_usage_counts_each_prompt_once_and_streams_match(client, local):
    _, _, tok = local
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say something."}],
                                          temperature=0, max_tokens=40, logprobs=True, top_logprobs=2)
    content, entries = chat.choices[0].message.content, chat.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == content  # leading spaces kept, bytes of a character split
    assert bytes(b for e in entries for b in e.bytes).decode() == content
    out = client.completions.create(model=NAME, prompt="The sky is blue and", max_tokens=8, temperature=0,
                                    echo=True, logprobs=1)
    text, lp = out.choices[0].text, out.choices[0].logprobs
    shown = [t if t not in tok.all_special_tokens else "" for t in lp.tokens]
    assert "".join(shown) == text and text.startswith("The sky is blue and")
    assert all(text[at:at + len(t)] == t for at, t in zip(lp.text_offset, shown))
    ids = tok("The sky is blue and").input_ids
    three = client.completions.create(model=NAME, prompt="The sky is blue and", max_tokens=4, n=3, temperature=1)
    assert three.usage.prompt_tokens == len(ids)  # once, not n times
    assert three.usage.completion_tokens == sum(1 for _ in three.choices) * 4

    # Streamed choices (n=4, a stop string, log-probs) equal the same request unstreamed: the deltas are taken on
    # the engine's thread, so no stop string leaks and no text or log-prob entry is lost.
    body = dict(model=NAME, messages=[{"role": "user", "content": "Tell me more."}], n=4, max_tokens=30,
                temperature=1.0, seed=11, stop=["e"], logprobs=True)
    whole = client.chat.completions.create(**body)
    streamed, counts = ["" for _ in range(4)], [0] * 4
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            counts[c.index] += len(c.logprobs.content) if c.logprobs else 0
    assert streamed == [c.message.content for c in whole.choices]
    assert counts == [len(c.logprobs.content) for c in whole.choices]

    # logprobs=true alone gives an entry per token; n seeded choices are n draws; a request without a temperature
    # samples (OpenAI's default is 1); /v1/completions without max_tokens writes OpenAI's default 16 tokens.
    say = dict(model=NAME, messages=[{"role": "user", "content": "Say something."}], max_tokens=12,
               extra_body={"ignore_eos": True})
    two = client.chat.completions.create(**say, n=2, seed=7, temperature=1.0, logprobs=True)
    assert [len(c.logprobs.content) for c in two.choices] == [12, 12]
    assert two.choices[0].message.content != two.choices[1].message.content
    unset = [client.chat.completions.create(**say, seed=seed).choices[0].message.content for seed in (1, 2)]
    assert unset[0] != unset[1]
    default = client.completions.create(model=NAME, prompt="The sky", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16


def _health_when(base, running, waiting, timeout, poll):
    """/health once `running` slots are busy and `waiting` requests queue (or the last answer at the timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = httpx.get(base + "/health").json()
        if health["running"] == running and health["waiting"] == waiting:
            break
        time.sleep(poll)
    return health


def test_a_full_queue_answers_429_and_never_drops_an_accepted_request(server):
    """4 slots busy and 4 requests waiting (--max-queue=4): the next ones are refused with 429 and Retry-After;
    all 8 accepted ones finish in full."""
    base, log_path = server
    body = {"model": NAME, "prompt": "Tell me everything.", "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        accepted = [pool.submit(_post, base, "/v1/completions", body) for _ in range(8)]
        health = _health_when(base, running=4, waiting=4, timeout=60, poll=0.02)
        refused = [_post(base, "/v1/completions", body) for _ in range(3)]
        accepted = [f.result() for f in accepted]
    assert health["running"] == 4 and health["waiting"] == 4, health
    assert [r.status_code for r in refused] == [429] * 3
    assert all(r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    assert [r.status_code for r in accepted] == [200] * 8
    assert all(r.json()["usage"]["completion_tokens"] == 1000 for r in accepted)
    # One log line per finished request: id, tokens in and out, seconds.
    lines = [line for line in log_path.read_text().splitlines() if "completion_tokens=1000" in line]
    assert len(lines) == 8 and all("prompt_tokens=" in line and "seconds=" in line for line in lines)


def test_a_client_that_disconnects_frees_its_slot(server):
    base, log_path = server
    body = {"model": NAME, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 450,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    health = _health_when(base, running=0, waiting=0, timeout=30, poll=0.2)
    assert health["running"] == 0 and health["waiting"] == 0
    assert "finish=cancelled" in log_path.read_text()


def test_a_client_gone_before_its_stream_starts_frees_its_slot(tiny_model_dir):
    """The client goes away while the server writes the stream's headers (the app called in process through ASGI,
    as uvicorn calls it, so the disconnect is read before the first event): Starlette cancels the response before
    the event generator starts, so the generator's cleanup never ran and the request decoded on to max_tokens,
    holding its slot. And a client of an unstreamed reply that goes away (its timeout) cancels it too."""
    import asyncio

    import zephyr_jax
    from zephyr_jax.engine import Engine
    from zephyr_jax.serve import Server, create_app

    model, tok = zephyr_jax.load(tiny_model_dir, dtype="float32")
    engine = Engine(model, tok, max_slots=2, max_length=1024, decode_steps=4)
    submitted, submit = [], engine.submit
    engine.submit = lambda r: submitted.append(r) or submit(r)
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Go on forever."}], "stream": True,
                       "max_tokens": 900, "ignore_eos": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def serve_one(body):  # the server's event loop lives on after the response, as uvicorn's does
        messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message["type"])
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.5)  # a slow first write: the disconnect arrives meanwhile

        await create_app(Server(engine, tok, NAME))(scope, receive, send)
        deadline = time.time() + 60
        while engine.busy() and time.time() < deadline:
            await asyncio.sleep(0.05)
        return sent

    engine.start()
    try:
        sent = asyncio.run(serve_one(body))
        # Unstreamed: the server looks for the disconnect every 0.5 s while it waits; each decoding call is slowed
        # so the reply outlasts that (900 tokens could finish first on a fast machine).
        decode = engine._decode
        engine._decode = lambda: time.sleep(0.01) or decode()
        whole_reply = asyncio.run(serve_one(body.replace(b'"stream": true', b'"stream": false')))
    finally:
        engine.stop()
    assert sent == ["http.response.start"]  # the stream never began
    assert whole_reply == ["http.response.start", "http.response.body"]  # (written to nobody)
    for r in submitted:
        assert r.finish_reason == "cancelled" and len(r.tokens) < 900, (r.finish_reason, len(r.tokens))
    assert len(submitted) == 2


def test_lm_eval_local_completions_scores_like_the_in_process_adapter(server, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """A local multiple-choice task through lm-eval's local-completions model (the server, token ids) and through
    the in-process adapter: the same log-likelihood for every choice (1e-4) and the same accuracy."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("aiohttp")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from tests.test_evaluate import _lm_eval_tasks
    from zephyr_jax.lm_eval_adapter import ZephyrJaxLM

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tasks = TaskManager(include_path=_lm_eval_tasks(tmp_path / "tasks"))
    remote = get_model("local-completions")(
        base_url=server[0] + "/v1/completions", model=NAME, tokenizer=tiny_model_dir,
        tokenizer_backend="huggingface", add_bos_token=True, max_length=512, batch_size=4, max_retries=1)
    here = ZephyrJaxLM(pretrained=tiny_model_dir, batch_size=4)
    results = [lm_eval.simple_evaluate(model=lm, tasks=["zj_mc"], task_manager=tasks, bootstrap_iters=0,
                                       log_samples=True) for lm in (remote, here)]
    scores = [[[float(r[0][0]) for r in s["resps"]] for s in out["samples"]["zj_mc"]] for out in results]
    assert len(scores[0]) == 3 and all(len(s) == 3 for s in scores[0])
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-4)
    assert results[0]["results"]["zj_mc"]["acc,none"] == results[1]["results"]["zj_mc"]["acc,none"]


def test_the_server_as_teacher_generator_and_judge_of_the_data_clis(server, tmp_path, monkeypatch):
    """data.dialogues and data.feedback over real HTTP to this server (a tiny random model): every call is
    answered, and the judge's garbage ratings are re-asked, then counted as parse failures, never a crash."""
    from zephyr_jax.data.backends import backend_from_spec
    from zephyr_jax.data.dialogues import make_dialogues
    from zephyr_jax.data.feedback import collect_feedback
    from zephyr_jax.data.sources import load_rows

    base, _ = server
    monkeypatch.setenv("ZEPHYR_TEST_KEY", KEY)
    spec = f"endpoint:{NAME}@{base}/v1"
    teacher = backend_from_spec(spec, api_key_env="ZEPHYR_TEST_KEY", concurrency=4, timeout=120, max_retries=3)
    stats = make_dialogues(["What is two plus two?", "Name three colours."], None, teacher, tmp_path / "dialogues",
                           min_turns=1, max_turns=2, max_tokens=12, test_size=0, seed=0, log=lambda s: None)
    assert teacher.stats["calls"] >= 2 and teacher.stats["failures"] == 0
    assert stats["dialogues"] == 2 and stats["kept"] + sum(stats["dropped"].values()) == 2
    # A model name the server does not serve stops the run at the first call (a 404, as from OpenAI and vLLM; a 400
    # was each call's own failure, and the run went on failing every call).
    from zephyr_jax.data.endpoint import EndpointRefused

    wrong = backend_from_spec(f"endpoint:zephyr-typo@{base}/v1", api_key_env="ZEPHYR_TEST_KEY", concurrency=1,
                              timeout=120, max_retries=0)
    with pytest.raises(EndpointRefused, match="zephyr-typo.*does not exist"):
        make_dialogues(["What is two plus two?"], None, wrong, tmp_path / "typo", min_turns=1, max_turns=1,
                       max_tokens=4, test_size=0, seed=0, log=lambda s: None)

    judge = backend_from_spec(spec, api_key_env="ZEPHYR_TEST_KEY", concurrency=4, timeout=120, max_retries=3)
    rows = [{"prompt": "What is two plus two?"}]
    stats = collect_feedback(rows, [teacher], judge, tmp_path / "feedback", completions_per_prompt=2,
                             principles="none", max_tokens=8, judge_max_tokens=8, parse_retries=1,
                             log=lambda s: None)
    assert stats["failed_generations"] == 0 and stats["completions"] == 2
    assert stats["parse_failures"] == {"rating": 4, "critique": 2}  # 4 aspect calls + 2 critiques, all garbage
    assert stats["this_run"]["reasks"] == {"rating": 4, "critique": 2}
    assert judge.stats["calls"] == 2 * (4 + 2) and judge.stats["failures"] == 0
    out = list(load_rows(tmp_path / "feedback", "train"))
    assert len(out) == 1 and all(isinstance(c["response"], str) for c in out[0]["completions"])


# --- Found by mutation testing: the stream's framing, the reply budget and log-prob counts. ---

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Say something."}]}


def _events(base, body):
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line]


def test_a_stream_opens_each_choice_with_its_role_and_ends_with_done(server):
    lines = _events(server[0], {**CHAT, "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3, "stream": True})
    assert lines[-1] == "data: [DONE]" and sum(line == "data: [DONE]" for line in lines) == 1
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    first = {}
    for c in chunks:
        for choice in c["choices"]:
            first.setdefault(choice["index"], choice)
    assert sorted(first) == [0, 1] and all(f["delta"].get("role") == "assistant" for f in first.values())


def test_a_chat_without_max_tokens_may_fill_the_whole_context(server):
    r = _post(server[0], "/v1/chat/completions", {**CHAT, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    usage, choice = r.json()["usage"], r.json()["choices"][0]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 1024 and choice["finish_reason"] == "length"


def test_max_completion_tokens_wins_over_max_tokens(server):
    body = {**CHAT, "ignore_eos": True, "temperature": 0, "max_completion_tokens": 3, "max_tokens": 7}
    assert _post(server[0], "/v1/chat/completions", body).json()["usage"]["completion_tokens"] == 3


def test_exactly_slots_plus_queue_sequences_are_accepted(server):
    r = _post(server[0], "/v1/completions", {"model": NAME, "prompt": ["a", "b"], "n": 4, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8, r.text


def test_a_prompt_that_fills_the_context_can_still_be_scored(server):
    ids = [1] + [415] * 1023  # 1024 tokens: no room for a reply, but echo + max_tokens=0 only scores it
    r = _post(server[0], "/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": 0, "echo": True,
                                              "logprobs": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 1024


def test_chat_logprobs_without_top_logprobs_list_no_alternatives(server):
    r = _post(server[0], "/v1/chat/completions", {**CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True})
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert entries and all(e["top_logprobs"] == [] for e in entries)


def test_n_above_the_slots_is_refused(server):
    r = _post(server[0], "/v1/completions", {"model": NAME, "prompt": "x", "n": 5, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_completion_top_logprobs_hold_as_many_alternatives_as_asked(server):
    r = _post(server[0], "/v1/completions", {"model": NAME, "prompt": "The sky is blue and", "max_tokens": 5,
                                              "temperature": 0, "echo": True, "logprobs": 3})
    lp = r.json()["choices"][0]["logprobs"]
    tops = lp["top_logprobs"]
    # The top 3 and the token itself, as OpenAI ("up to logprobs+1 elements") and vLLM list them: at most 4 (ids
    # that decode alike share a key), 4 where a prompt token is not among its top 3.
    assert tops[0] is None and all(1 <= len(t) <= 4 for t in tops[1:]) and max(len(t) for t in tops[1:]) == 4
    assert all(t[token] == v for token, v, t in zip(lp["tokens"][1:], lp["token_logprobs"][1:], tops[1:]))
    # logprobs=0: each token's own entry alone (it was an empty dict), sampled tokens' too.
    r = _post(server[0], "/v1/completions", {"model": NAME, "prompt": "The sky is blue and", "max_tokens": 5,
                                              "temperature": 1.0, "seed": 2, "echo": True, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert [{token: v} for token, v in zip(lp["tokens"][1:], lp["token_logprobs"][1:])] == lp["top_logprobs"][1:]


def test_bad_flags_are_one_line_errors_before_the_model_loads(monkeypatch, serve_logger, assert_refused_dtype):
    """--dtype=fp8 was a TypeError deep in numpy; --max-slots=0 and the like failed in Engine after the model had
    loaded."""
    import zephyr_jax
    from zephyr_jax import serve

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before the mistake was found")

    load = zephyr_jax.load
    monkeypatch.setattr(zephyr_jax, "load", no_load)
    assert_refused_dtype(lambda: serve.main(["--model=m", "--compilation-cache=", "--dtype=fp8"]), "fp8")
    for flag, expected in [("--max-slots=0", "--max-slots=0: must be at least 1"),
                           ("--max_queue=-1", "--max-queue=-1: must be at least 0"),
                           ("--prefill-chunk=0", "--prefill-chunk=0: must be at least 1"),
                           ("--decode-steps=0", "--decode-steps=0: must be at least 1"),
                           ("--max-length=1", "--max-length=1: must be at least 2"),
                           # (uvicorn took a negative one as 0: every request cut at once)
                           ("--shutdown-timeout=-1", "--shutdown-timeout=-1: must be 0 or more seconds"),
                           # an OverflowError traceback from bind()
                           ("--port=70000", "--port=70000: must be from 0 to 65535"),
                           ("--port=65536", "--port=65536: must be from 0 to 65535"),
                           ("--port=-1", "--port=-1: must be from 0 to 65535")]:
        with pytest.raises(SystemExit) as exit_:
            serve.main(["--model=m", "--compilation-cache=", flag])
        assert exit_.value.code == f"error: {expected}", flag
    # A model that is not there: the loader's message, one line (no traceback)
    monkeypatch.setattr(zephyr_jax, "load", load)
    with pytest.raises(SystemExit) as exit_:
        serve.main(["--model=./no/such/model", "--compilation-cache=", "--port=0"])
    assert exit_.value.code == "error: model ./no/such/model does not exist (neither a local directory nor a " \
                               "Hugging Face hub name)"


def test_serving_is_logged_once_the_port_is_bound(tiny_model_dir, monkeypatch, serve_logger):
    """With the port in use, "serving ... on http://..." was logged and then uvicorn failed to bind, after the
    model had loaded: now refused before loading. On a free port the line comes once the server listens, naming
    the port bound (with --port=0 it said port 0)."""
    import logging

    import uvicorn

    import zephyr_jax
    from zephyr_jax import serve

    loaded = zephyr_jax.load(tiny_model_dir, dtype="float32")  # once for both runs
    monkeypatch.setattr(zephyr_jax, "load", lambda *args, **kw: loaded)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    serve.log.addHandler(handler)
    argv = [f"--model={tiny_model_dir}", "--dtype=float32", "--max-slots=1", "--max-length=32",
            "--compilation-cache="]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(zephyr_jax, "load", lambda *a, **k: pytest.fail("loaded before the port was checked"))
        with pytest.raises(SystemExit, match=rf"error: --host=127.0.0.1 --port={port}: cannot listen there"):
            serve.main(argv + [f"--port={port}"])  # (uvicorn failed to bind after the model had loaded)
    assert not [m for m in messages if m.startswith("serving")], messages
    monkeypatch.setattr(zephyr_jax, "load", lambda *args, **kw: loaded)

    # On a free port it is said once the server listens (which then stops at once: no main loop).
    bound = []

    async def no_main_loop(self):
        bound.append(self.servers[0].sockets[0].getsockname()[1])

    monkeypatch.setattr(uvicorn.Server, "main_loop", no_main_loop)
    port = _free_port()
    serve.main(argv + [f"--port={port}"])
    assert [m for m in messages if m.startswith("serving")] == \
        [f"serving {tiny_model_dir} on http://127.0.0.1:{port}/v1 (1 slots of 32 tokens)"], messages
    # --port=0: the OS picks the port, and the line names the one bound (it said port 0: no one could connect).
    messages.clear()
    serve.main(argv + ["--port=0"])
    assert bound[-1] != 0 and [m for m in messages if m.startswith("serving")] == \
        [f"serving {tiny_model_dir} on http://127.0.0.1:{bound[-1]}/v1 (1 slots of 32 tokens)"], messages
    # A KV cache larger than a device's free memory: one line with its sizes, where it was jax's out-of-memory
    # traceback (the CPU does not say what is free: a device that does stands in)
    from zephyr_jax.model import kv_cache

    monkeypatch.setattr(kv_cache, "free_device_bytes", lambda device: 2 ** 20)
    with pytest.raises(SystemExit, match=r"^error: the KV cache of 5000 slots x 32 tokens needs 0\.04 GiB on .*, "
                                         r"which has 0\.00 GiB free: use fewer slots or a shorter max_length$"):
        serve.main(argv + ["--port=0", "--max-slots=5000"])


def test_serve_warms_up_and_shards_over_its_mesh_flag(tiny_model_dir, monkeypatch, serve_logger):
    """The command's --warmup and --mesh reach the engine (in process, uvicorn.Server.run standing in): the model is
    split over the mesh, the warm-up compiles before serving, so a greedy completion then adds no program (nor do
    others of other prompts and sampling settings), and its text is the one-device engine's. (The engine laid its
    cache out as P(None, None, 'tensor', None, None) and the calls handed it back as P(None, None, 'tensor'): the
    same layout, but the first request's decoding call missed the warm-up's jit cache entry and traced again.)"""
    import jax
    import uvicorn
    from fastapi.testclient import TestClient

    import zephyr_jax
    from zephyr_jax import serve
    from zephyr_jax.engine import Engine
    from zephyr_jax.generate import generate

    engines, seen = [], {}

    class Recorded(serve.Engine):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            engines.append(self)

    def serve_once(app, **kw):
        before = Engine.compiled_programs()
        with TestClient(app) as client:
            r = client.post("/v1/completions", headers=AUTH, json={
                "model": NAME, "prompt": "The sky is", "max_tokens": 6, "temperature": 0})
            # Sampling settings are arrays of the calls, not part of the programs: none compiles one.
            others = [client.post("/v1/completions", headers=AUTH, json={
                "model": NAME, "prompt": prompt, "max_tokens": 5, **sampling}) for prompt, sampling in (
                    ("The sky", {"temperature": 1, "top_p": 0.9, "seed": 3}),
                    ("The sea is", {"temperature": 0.7, "top_k": 5, "seed": 2**40, "stop": ["e", "the"]}))]
        seen.update(response=r, others=others, compiled=Engine.compiled_programs() - before)

    monkeypatch.setattr(serve, "Engine", Recorded)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: serve_once(self.config.app))
    serve.main([f"--model={tiny_model_dir}", "--dtype=float32", "--max-slots=2", "--max-length=32",
                "--warmup", "--mesh=1,-1,2", f"--api-key={KEY}", f"--served-model-name={NAME}",
                "--compilation-cache=", "--port=0"])  # (uvicorn stands in; the port is only checked)
    (engine,) = engines
    weights = jax.tree.leaves(engine.state)
    assert {tuple(x.sharding.mesh.shape.items()) for x in weights} == {(("data", 1), ("fsdp", 4), ("tensor", 2))}
    assert sum(not x.sharding.is_fully_replicated for x in weights) >= len(weights) // 2  # split, not copied
    assert seen["response"].status_code == 200, seen["response"].text
    assert [o.status_code for o in seen["others"]] == [200] * 2, [o.text for o in seen["others"]]
    assert seen["compiled"] == 0
    model, tok = zephyr_jax.load(tiny_model_dir, dtype="float32")
    assert seen["response"].json()["choices"][0]["text"] == \
        generate(model, tok, ["The sky is"], max_new_tokens=6, temperature=0.0)[0]


def test_a_server_whose_engine_has_stopped_says_so_on_health_and_every_request(local, monkeypatch, fail_for_good):
    """The engine's thread ends only when it cannot go on (a failed call after which no cache can be made again).
    /health still answered 200 "ok", so no supervisor restarted the server, and every request failed after it;
    /health now answers 503 with the cause, and a request is refused with the same 503 before it is queued."""
    from fastapi.testclient import TestClient

    from zephyr_jax.engine import Engine
    from zephyr_jax.serve import Server, create_app

    model, _, tok = local
    engine = Engine(model, tok, max_slots=1, max_length=64)
    decode = engine._decode

    def lost_once():  # a call that fails once: its stream ends in an error event, and the engine goes on
        engine._decode = decode
        raise RuntimeError("device lost")

    engine._decode = lost_once
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (the thread's error, printed outside a test)
    engine.start()
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 3}
    try:
        with TestClient(create_app(Server(engine, tok, NAME))) as http:
            assert http.get("/health").json()["status"] == "ok"
            stream = http.post("/v1/chat/completions", json={"model": NAME, "stream": True, "max_tokens": 3,
                                                             "messages": [{"role": "user", "content": "Hi"}]})
            events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
            assert stream.status_code == 200 and events[-1] == "[DONE]", stream.text
            assert json.loads(events[-2]) == {"error": {"message": "RuntimeError: device lost", "type": "server_error",
                                                        "param": None, "code": None}}, stream.text
            assert http.post("/v1/completions", json=body).status_code == 200
            fail_for_good(engine)
            failed = http.post("/v1/completions", json=body)
            assert failed.status_code == 500 and "device lost" in failed.json()["error"]["message"], failed.text
            engine._thread.join(20)
            health = http.get("/health")
            assert health.status_code == 503, health.text
            assert health.json()["error"] == ("the engine's thread stopped (MemoryError: RESOURCE_EXHAUSTED: no room "
                                              "for the cache): restart the server")
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["message"] == health.json()["error"]
    finally:
        engine.stop()
