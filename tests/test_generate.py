"""Generation on the engine: greedy decoding against transformers' generate(do_sample=False), token for token,
with requests arriving while others decode; chunked prefill against one pass; log-probs against a full
forward; sampling against the filtered-softmax formula; seeds, stops, cancellation and sharded parameters."""

import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.torch_reference import save_torch, torch_logits, torch_mistral
from zephyr_jax.engine import Engine, QueueFull, Request, SamplingParams
from zephyr_jax.generate import generate_ids
from zephyr_jax.loading import load_model
from zephyr_jax.model import KVCache, MistralConfig, kv_cache
from zephyr_jax.sampling import sample

NEW_TOKENS = 40
EOS = 2


def _prompts(seed, lengths, vocab=128):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in lengths]


def _hf_greedy(tm, prompt, new_tokens=NEW_TOKENS):
    """transformers' greedy reply to one prompt, without the EOS it may end with."""
    with torch.no_grad():
        out = tm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0,
                          eos_token_id=EOS, pad_token_id=0)
    reply = out[0, len(prompt):].tolist()
    return reply[:reply.index(EOS)] if EOS in reply else reply


@pytest.mark.parametrize("fields,lengths", [
    # No window; 2 slots for 4 requests: the third and fourth arrive while the others are mid-decode.
    (dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None), [9, 5, 23, 3]),
    # Window 6 < prompt + 40 new tokens: rows decode far past the window; a prompt exceeds it; prompts of 23
    # and 30 tokens take two prefill chunks of 16.
    (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=6), [12, 4, 30, 23]),
    # Window 16, three layers: the short rows cross it only while decoding.
    (dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=16, num_hidden_layers=3), [20, 7, 2, 17]),
])
# The platforms' layouts: the KV cache's storage order, and the layer weights stacked or in buffers of their own
# (mistral.per_layer_weights): CPUs', TPUs', GPUs'.
@pytest.mark.parametrize("heads_first,per_layer", [(True, False), (False, False), (True, True)])
def test_greedy_matches_transformers_with_requests_arriving_mid_decode(tmp_path, fields, lengths, heads_first,
                                                                       per_layer, monkeypatch):
    # A sharper output distribution keeps greedy choices away from near-ties, where float rounding could flip one.
    tm = torch_mistral(seed=len(lengths) + lengths[0], initializer_range=0.2, **fields)
    model = load_model(save_torch(tm, tmp_path), dtype="float32")
    prompts = _prompts(lengths[0], lengths)
    budgets = [NEW_TOKENS, 12, NEW_TOKENS, 25]  # the short second reply frees its slot while the first decodes
    engine = Engine(model, max_slots=2, max_length=96, prefill_chunk=16, decode_steps=4, eos_id=EOS,
                    heads_first_cache=heads_first, per_layer_weights=per_layer)
    assert engine.cache.heads_first == heads_first
    assert isinstance(nnx.merge(engine.graphdef, engine.state).layers, nnx.List) == per_layer
    # jit hashes its static arguments on every call: the engine's graphdef is hashed once, not walked each call
    # (1.3 ms a decode call for 32 layers of their own weights)
    walked, walk = [], nnx.graphlib.GraphDef.__hash__
    monkeypatch.setattr(nnx.graphlib.GraphDef, "__hash__", lambda g: walked.append(g) or walk(g))
    requests = engine.generate([Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, budgets)])
    assert not [g for g in walked if g is engine.graphdef]
    refs = [_hf_greedy(tm, p, n) for p, n in zip(prompts, budgets)]
    assert len({t for ref in refs for t in ref}) > 5, "degenerate reference (a repeated token) would prove little"
    for request, ref, n in zip(requests, refs, budgets):
        assert request.tokens == ref
        assert request.finish_reason == ("stop" if len(ref) < n else "length")
    # The third request was admitted and started while the first was still decoding.
    if len(refs[1]) < len(refs[0]):
        assert requests[2].first_token_at < requests[0].finished_at


def test_replies_across_the_attention_length_buckets_match_transformers(tmp_path):
    """The engine attends over a bucket of the cache (128 positions at a time), not all of it. A 200-token prompt in
    one prefill chunk, and a 124-token prompt whose reply's decode calls of 8 cross position 128: tokens equal
    transformers' greedy ones and log-probs its full forward pass's (the tests above stay inside one bucket)."""
    tm = torch_mistral(seed=5, initializer_range=0.2, max_position_embeddings=512)
    model = load_model(save_torch(tm, tmp_path), dtype="float32")
    engine = Engine(model, max_slots=2, max_length=400, prefill_chunk=512, decode_steps=8, eos_id=None)
    for prompt, n in zip(_prompts(0, [200, 124]), [6, 20]):
        (r,) = engine.generate([Request(prompt, SamplingParams(max_tokens=n, logprobs=0))])
        with torch.no_grad():
            out = tm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=0,
                              eos_token_id=None, pad_token_id=0)
        assert r.tokens == out[0, len(prompt):].tolist()
        whole = prompt + r.tokens
        logps = torch.log_softmax(torch.tensor(torch_logits(tm, [whole])[0], dtype=torch.float64), -1).numpy()
        np.testing.assert_allclose(r.logprobs, logps[np.arange(len(prompt) - 1, len(whole) - 1), r.tokens],
                                   atol=1e-4)


@pytest.mark.parametrize("max_slots,lengths", [(2, [5, 60]), (4, [5, 6, 7, 60])])
def test_a_prompt_prefilled_in_chunks_beside_decoding_rows_keeps_its_cache(tmp_path, max_slots, lengths):
    """A long prompt prefills in chunks of 16 while the short ones decode: the decoding calls' writes that must
    be dropped (a lone row's companion write, rows idle or still prefilling) never land in its cache rows, where
    later chunks would not overwrite them all. Every reply equals transformers' greedy one."""
    tm = torch_mistral(seed=11, initializer_range=0.2, max_position_embeddings=256)
    model = load_model(save_torch(tm, tmp_path), dtype="float32")
    engine = Engine(model, max_slots=max_slots, max_length=96, prefill_chunk=16, decode_steps=8, eos_id=None)
    prompts = _prompts(7, lengths)
    requests = engine.generate([Request(p, SamplingParams(max_tokens=10)) for p in prompts])
    for prompt, request in zip(prompts, requests):
        with torch.no_grad():
            out = tm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=0,
                              eos_token_id=None, pad_token_id=0)
        assert request.tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("heads_first", [True, False])
def test_cache_writes_land_at_their_row_and_position_padding_is_dropped_and_reads_are_laid_out_for_attention(
        heads_first):
    layers, slots, length, heads, dim = 2, 4, 10, 3, 6  # all unequal, so a mixed-up axis shows
    cfg = MistralConfig(num_hidden_layers=layers, num_key_value_heads=heads, head_dim=dim, num_attention_heads=heads)
    cache = KVCache.init(cfg, slots, length, dtype=jnp.float32, heads_first=heads_first)
    assert cache.max_length == length
    new = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, heads, dim)), jnp.float32)
    rows = np.array([2, 0, slots])  # the last row is a padded batch's: past the last slot
    positions = np.array([[3, 4], [9, 10], [0, 1]])  # 10 is a bucket's padding: past the end
    buffer = kv_cache.write(cache.k, heads_first, jnp.int32(1), jnp.asarray(rows), jnp.asarray(positions), new)
    expected = np.zeros((layers, slots, length, heads, dim))  # positions first
    for b, t in [(0, 0), (0, 1), (1, 0)]:  # the tokens inside the cache
        expected[1, rows[b], positions[b, t]] = new[b, t]
    np.testing.assert_array_equal(buffer, expected.transpose(0, 1, 3, 2, 4) if heads_first else expected)
    some = kv_cache.read(buffer, heads_first, jnp.int32(1), jnp.asarray([2, 0]), 5)
    every = kv_cache.read(buffer, heads_first, jnp.int32(1), None, 5)
    np.testing.assert_array_equal(some, expected[1, [2, 0], :5].transpose(0, 2, 1, 3))  # [B, K, S, D]
    np.testing.assert_array_equal(every, expected[1, :, :5].transpose(0, 2, 1, 3))


@pytest.mark.parametrize("heads_first", [True, False])
def test_a_lone_tokens_write_changes_its_row_and_position_only_and_the_cache_takes_the_models_dtype(heads_first):
    """One token of one row (a lone request's decoding) is written beside a second, dropped update past the last
    slot (kv_cache.write): against numpy's assignment of that one token, nothing else of the cache may change,
    the last slot's row included. And the cache is stored in the model's compute dtype unless told otherwise, in
    the platform's order (heads first here on the CPU, kv_cache.heads_first_on)."""
    layers, slots, length, heads, dim = 2, 4, 10, 3, 6
    cfg = MistralConfig(num_hidden_layers=layers, num_key_value_heads=heads, head_dim=dim, num_attention_heads=heads,
                        dtype=jnp.bfloat16)
    default = KVCache.init(cfg, slots, length)
    assert default.k.dtype == cfg.dtype and default.v.dtype == cfg.dtype
    assert default.heads_first == kv_cache.heads_first_on(jax.devices()[0].platform)
    rng = np.random.default_rng(1)
    start = rng.standard_normal((layers, slots, length, heads, dim)).astype(np.float32)  # positions first
    buffer = jnp.asarray(start.transpose(0, 1, 3, 2, 4) if heads_first else start)
    new = rng.standard_normal((1, 1, heads, dim)).astype(np.float32)
    for row, position in ((0, 3), (slots - 1, 9), (2, 0)):
        got = kv_cache.write(buffer, heads_first, jnp.int32(1), jnp.asarray([row]), jnp.asarray([[position]]),
                             jnp.asarray(new))
        expected = start.copy()
        expected[1, row, position] = new[0, 0]
        np.testing.assert_array_equal(got, expected.transpose(0, 1, 3, 2, 4) if heads_first else expected)


def test_a_cache_larger_than_a_devices_free_memory_is_refused_with_its_sizes(monkeypatch):
    """KVCache.init checks the bytes of its k and v shards on each device against what the device's allocator can
    still give (an out-of-memory traceback from inside jax was all a too large serve --max-slots said). The CPU
    does not say what is free, so a device that does stands in; the bytes checked are those then allocated."""
    cfg = MistralConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=8, num_attention_heads=4,
                        dtype=jnp.bfloat16)
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4])
    sharding = NamedSharding(mesh, P(None, "data", "tensor"))  # slots over one axis, heads over the other
    monkeypatch.setattr(kv_cache, "free_device_bytes", lambda device: None)  # (the CPU's own answer)
    cache = KVCache.init(cfg, 6, 40, sharding=sharding)
    shard_bytes = cache.k.addressable_shards[0].data.nbytes + cache.v.addressable_shards[0].data.nbytes
    assert shard_bytes == 2 * 2 * (2 * 3 * 1 * 40 * 8)  # k and v, bf16, [layers, slots/2, kv_heads/2, length, dim]
    free = {d: 2 ** 30 for d in mesh.devices.flat} | {mesh.devices.flat[3]: shard_bytes - 1}
    monkeypatch.setattr(kv_cache, "free_device_bytes", free.get)
    with pytest.raises(ValueError) as error:
        KVCache.init(cfg, 6, 40, sharding=sharding)
    assert str(error.value) == (f"the KV cache of 6 slots x 40 tokens needs {shard_bytes / 2**30:.2f} GiB on "
                                f"{mesh.devices.flat[3]}, which has {(shard_bytes - 1) / 2**30:.2f} GiB free: use "
                                "fewer slots or a shorter max_length")
    free[mesh.devices.flat[3]] = shard_bytes  # exactly enough
    assert KVCache.init(cfg, 6, 40, sharding=sharding).k.shape == cache.k.shape


@pytest.mark.parametrize("heads_first", [True, False])
def test_prefill_and_decode_through_the_cache_equal_one_forward_pass(tmp_path, heads_first):
    """with_cache in chunks and one token at a time, into arbitrary cache rows, gives the full pass's logits."""
    tm = torch_mistral(num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    model = load_model(save_torch(tm, tmp_path), dtype="float32")
    ids = jnp.asarray(_prompts(7, [14, 14]))
    full = np.asarray(model(ids))
    cache = KVCache.init(model.config, 3, 32, heads_first=heads_first)
    step = nnx.jit(lambda m, ids, positions, cache: (lambda h, c: (m.logits(h), c))(
        *m.with_cache(ids, positions, cache, jnp.array([2, 0]), 16)))
    logits, cache = step(model, ids[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :6], atol=2e-5)
    for t in range(6, 14):
        logits, cache = step(model, ids[:, t:t + 1], jnp.full((2, 1), t), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=2e-5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tm = torch_mistral(seed=11, initializer_range=0.2)
    return tm, load_model(save_torch(tm, tmp_path_factory.mktemp("small")), dtype="float32")


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_calls_tokens_are_taken_as_the_rule_takes_them_one_at_a_time(small, logprobs):
    """The engine takes a call's tokens for a request a call at a time (a token at a time was most of the host's
    work between decoding calls, with the device idle): the reply, its log-probs and alternatives, the stop token,
    the counts and the finish reason are the rule's, applied a token at a time up to the first stop token or the
    max_tokens-th, wherever the call stopped the row. And a call of one token (prefill's) is the same rule."""
    _, model = small
    engine = Engine(model, max_slots=1, max_length=64, eos_id=5)
    rng = np.random.default_rng(0)

    def request(left):
        r = Request([1, 2], SamplingParams(max_tokens=10, logprobs=logprobs, stop_token_ids=(9,)))
        r.generated, r.tokens, r.first_token_at = 10 - left, [7] * (10 - left), 1.0
        return r

    def one_at_a_time(r, ids, lps, top):  # the rule: eos 5 or stop id 9 ends it (listed apart), else max_tokens 10
        for j, token in enumerate(ids):
            if r.finish_reason is not None:
                return
            r.generated, r._last_token = r.generated + 1, token
            pairs = list(zip(top[1][j].tolist(), top[0][j].tolist()))[:logprobs]
            if token in (5, 9):
                r.stop_token, r.finish_reason = (None if logprobs is None else (token, float(lps[j]), pairs)), "stop"
                return
            r.tokens.append(token)
            if logprobs is not None:
                r.logprobs.append(float(lps[j]))
                r.top_logprobs.append(pairs)
            if r.generated == 10:
                r.finish_reason = "length"

    fields = ("tokens", "logprobs", "top_logprobs", "stop_token", "generated", "_last_token", "finish_reason")
    for left in (1, 3, 8, 10):
        for stop_at in (None, 0, 2, 7):
            ids = rng.integers(10, 30, 8)
            if stop_at is not None:
                ids[stop_at] = 5 if stop_at % 2 else 9
            emitted = 8 if stop_at is None else stop_at + 1  # past max_tokens too: the host stops there
            ids = ids[:emitted].tolist()
            lps, top = rng.normal(size=emitted).astype(np.float32), (rng.normal(size=(emitted, 3)).astype(np.float32),
                                                                     rng.integers(0, 30, (emitted, 3)))
            expected, call, singly = request(left), request(left), request(left)
            one_at_a_time(expected, ids, lps, top)
            start = engine.stats["tokens"]
            engine._accept(call, ids, lps.tolist(), top)
            assert engine.stats["tokens"] - start == min(emitted, left)
            for j, token in enumerate(ids):
                if singly.finish_reason is None:
                    engine._accept(singly, [token], [float(lps[j])], (top[0][j:j + 1], top[1][j:j + 1]))
            for field in fields:
                assert getattr(call, field) == getattr(expected, field) == getattr(singly, field), \
                    (left, stop_at, field)


def test_a_prefill_calls_outputs_come_in_one_round_trip(small, monkeypatch):
    """The first reply token and the prompt's log-probs of a prefill call come to the host in one round trip,
    every copy started before the host waits on any (two fetches, one after the other, left the device idle for
    the second's)."""
    from jax._src import array

    _, model = small
    engine = Engine(model, max_slots=1, max_length=64, prefill_chunk=16, eos_id=None)
    events, value, start_copy = [], array.ArrayImpl._value, array.ArrayImpl.copy_to_host_async
    monkeypatch.setattr(array.ArrayImpl, "copy_to_host_async", lambda x: (events.append("start"), start_copy(x))[1])
    monkeypatch.setattr(array.ArrayImpl, "_value", property(lambda x: (events.append("wait"), value.fget(x))[1]))
    (r,) = engine.generate([Request(_prompts(1, [9])[0], SamplingParams(max_tokens=1, logprobs=2,
                                                                         prompt_logprobs=2))])
    assert r.finish_reason == "length" and len(r.prompt_logprobs) == 9 and len(r.top_logprobs[0]) == 2
    assert events.index("wait") == events.count("start") == 7, events  # token, log-prob, top; prompt's, top


def test_logprobs_of_prompt_and_reply_equal_a_full_forward_pass(small):
    """Prompt log-probs (across prefill chunks) and the sampled tokens' log-probs and top alternatives are the
    log-softmax of one forward pass over prompt + reply: the model's own, not those of the temperature-scaled,
    top-k / top-p filtered distribution the tokens are drawn from (sampling.sample's docstring, README)."""
    _, model = small
    prompts = _prompts(3, [37, 21])  # two at once: each row's own values
    engine = Engine(model, max_slots=2, max_length=128, prefill_chunk=16, eos_id=None)
    params = SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=4, logprobs=3,
                            prompt_logprobs=2)
    replies = engine.generate([Request(prompt, params) for prompt in prompts])
    wholes = [prompt + r.tokens for prompt, r in zip(prompts, replies, strict=True)]
    n = max(map(len, wholes))  # one forward pass for both: padding at the end changes no earlier position (causal)
    passes = np.asarray(jax.nn.log_softmax(model(jnp.asarray([w + [0] * (n - len(w)) for w in wholes])), axis=-1))
    for prompt, r, whole, logps in zip(prompts, replies, wholes, passes):
        expected = logps[np.arange(len(whole) - 1), whole[1:]]
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(prompt)
        np.testing.assert_allclose(r.prompt_logprobs[1:], expected[:len(prompt) - 1], atol=1e-5)
        np.testing.assert_allclose(r.logprobs, expected[len(prompt) - 1:], atol=1e-5)
        # a prompt position's, then every reply token's: the first sampled by the prefill call, the others decoded
        for position, top in [(3, r.prompt_top_logprobs[4]), *enumerate(r.top_logprobs, start=len(prompt) - 1)]:
            best = np.argsort(-logps[position])[:len(top)]
            assert [t for t, _ in top] == best.tolist()
            np.testing.assert_allclose([lp for _, lp in top], logps[position, best], atol=1e-5)


def test_a_vocabulary_smaller_than_the_most_alternatives_gives_them_all():
    """A model of 16 tokens, fewer than the TOP_LOGPROBS alternatives a call computes for whoever asks: a request
    for 2 gets the top 2 of the log-softmax, one for 20 (the most allowed) all 16, not a failed call."""
    from zephyr_jax.model import Mistral

    cfg = MistralConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.5)
    model = Mistral(cfg, rngs=nnx.Rngs(0))
    engine = Engine(model, max_slots=2, max_length=32, eos_id=None)
    prompt = [3, 9, 4, 12, 7]
    few, every = engine.generate([Request(prompt, SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=2)),
                                  Request(prompt, SamplingParams(max_tokens=4, logprobs=20))])
    logps = np.asarray(jax.nn.log_softmax(model(jnp.asarray([prompt + few.tokens]))[0], axis=-1))
    ranked = np.argsort(-logps, axis=-1)
    listed = [(position, top) for position, top in enumerate(few.prompt_top_logprobs[1:])]
    listed += [(len(prompt) - 1 + k, top) for k, top in enumerate(few.top_logprobs)]
    listed += [(len(prompt) - 1 + k, top) for k, top in enumerate(every.top_logprobs)]
    assert every.tokens == few.tokens and len(listed) == 4 + 4 + 4
    for position, top in listed:
        assert [t for t, _ in top] == ranked[position, :len(top)].tolist() and len(top) in (2, 16)
        np.testing.assert_allclose([lp for _, lp in top], logps[position, [t for t, _ in top]], atol=1e-5)


def _filtered_softmax(logits, temperature, top_k, top_p):
    """What sampling draws from, as transformers' temperature, top-k and top-p warpers give it (float64)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))] +
                                  ([TopKLogitsWarper(int(top_k))] if top_k else []) +
                                  ([TopPLogitsWarper(float(top_p))] if top_p < 1.0 else []))
    z = warpers(None, torch.tensor(np.asarray(logits, np.float64))[None])
    return torch.softmax(z, -1)[0].numpy()


def test_greedy_tokens_and_logprobs_equal_argmax_and_log_softmax():
    """Greedy rows: the token is jnp.argmax (the first of tied maxima) and its log-prob log_softmax's, with and
    without top-n alternatives, and none when none are asked (top_n=-1)."""
    logits = jax.random.normal(jax.random.key(0), (8, 1000)) * 4  # 1,000: not a whole number of 128-token blocks
    logits = (logits.at[1, 7].set(50.0).at[1, 900].set(50.0).at[2].set(0.0)  # a tie at the top, a flat row
              .at[3, 999].set(60.0).at[4, 130].set(70.0).at[4, 129].set(70.0)  # the last token; a tie in block 1
              .at[5].set(-jnp.abs(logits[5]) - 1.0))  # all below 0: the last block's padding must not win
    rows = logits.shape[0]
    zeros = jnp.zeros((rows,), jnp.uint32)
    for top_n in (-1, 0, 3):
        token, logprob, top = sample(logits, jnp.zeros((rows,)), jnp.zeros((rows,), jnp.int32), jnp.ones((rows,)),
                                     zeros, zeros, top_n=top_n)
        np.testing.assert_array_equal(token, jnp.argmax(logits, axis=-1))
        assert token.tolist()[1:5] == [7, 0, 999, 129]
        if top_n < 0:
            assert logprob is None and top is None
            continue
        logps = jax.nn.log_softmax(logits, axis=-1)
        np.testing.assert_allclose(logprob, logps[jnp.arange(rows), token], rtol=1e-6, atol=1e-6)
        if top_n:
            values, ids = jax.lax.top_k(logps, top_n)
            np.testing.assert_allclose(top[0], values, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(top[1], ids)


@pytest.mark.parametrize("settings", [
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9)],
    [(0.5, 0, 1.0), (1.5, 0, 1.0)],  # no row filters: the sampler's unfiltered path
], ids=["filtered", "unfiltered"])
def test_each_row_draws_from_its_own_filtered_softmax(settings):
    """Rows with their own (temperature, top_k, top_p) settings in one call, 40,000 draws (different counters)."""
    rows = len(settings)
    logits = jnp.tile(jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]]), (rows, 1))
    temperature, top_k, top_p = (jnp.asarray(c) for c in zip(*settings))
    n = 40000
    draw = jax.jit(jax.vmap(lambda c: sample(logits, temperature, top_k, top_p, jnp.full((rows,), 9, jnp.uint32),
                                             jnp.full((rows,), c, jnp.uint32))[0]))
    draws = np.asarray(draw(jnp.arange(n, dtype=jnp.uint32)))
    for row, (t, k, p) in enumerate(settings):
        freq = np.bincount(draws[:, row], minlength=8) / n
        expected = _filtered_softmax(logits[row], t, k, p)
        assert np.all(freq[expected == 0] == 0), "a filtered-out token was drawn"
        np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n))  # 5 sigma of a frequency


def test_temperatures_below_a_millionth_sharpen_as_transformers_divides():
    """Logits 2e-6 apart: at temperature 1e-6 the second is drawn 12% of the time, at 1e-7 and below (almost)
    never, as transformers' division gives; not temperature 1e-6's draws for every smaller one. The largest logit is
    1, which divided by 1e-40 overflows to inf (and inf - inf is NaN) unless the row is shifted first."""
    settings = [(1e-6, 0, 1.0), (1e-7, 0, 1.0), (1e-8, 2, 0.9), (1e-30, 0, 1.0), (1e-40, 0, 0.5)]
    rows, n = len(settings), 4000
    logits = jnp.tile(jnp.asarray([[1.0, 1.0 - 2e-6, 0.0, -4.0]]), (rows, 1))
    temperature, top_k, top_p = (jnp.asarray(c) for c in zip(*settings))
    draw = jax.jit(jax.vmap(lambda c: sample(logits, temperature, top_k, top_p, jnp.full((rows,), 9, jnp.uint32),
                                             jnp.full((rows,), c, jnp.uint32))[0]))
    draws = np.asarray(draw(jnp.arange(n, dtype=jnp.uint32)))
    for row, (t, k, p) in enumerate(settings):
        freq = np.bincount(draws[:, row], minlength=4) / n
        np.testing.assert_allclose(freq, _filtered_softmax(logits[row], t, k, p), atol=5 * np.sqrt(0.25 / n),
                                   err_msg=f"temperature {t}")


def test_the_top_p_boundary_is_transformers():
    """A token whose preceding mass is exactly top_p is cut, as transformers' TopPLogitsWarper cuts it."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from zephyr_jax.sampling import filter_logits

    exact = np.log(np.asarray([[0.5, 0.25, 0.125, 0.125]], np.float32))  # masses exact in binary
    for p in (0.5, 0.75):  # the mass before the second / third token is exactly p
        ours = np.isfinite(np.asarray(filter_logits(jnp.asarray(exact), jnp.ones((1,)), jnp.zeros((1,), jnp.int32),
                                                    jnp.asarray([p]))))
        theirs = np.isfinite(TopPLogitsWarper(p)(None, torch.tensor(exact)).numpy())
        assert ours.tolist() == theirs.tolist(), p


def test_top_k_keeps_ties_and_top_p_weighs_them_as_transformers():
    """With ties at the k-th value, transformers keeps them all through top-k and counts them in top-p's mass.
    Where top-p's cut falls inside tied tokens, transformers keeps those its sort happens to put first and we
    keep all of them: our set is transformers' and every token tied with one it keeps."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from zephyr_jax.sampling import filter_logits

    rows = np.asarray([[2, 1, 1, 1, 0, 0], [3, 2, 1, 1, 0, -1], [1, 1, 1, 0, 0, 0], [4, 1, 1, 1, 1, 0]], np.float32)
    n = len(rows)
    for k in (1, 2, 3, 4):
        for p in (0.3, 0.5, 0.8, 0.95, 1.0):
            ours = np.isfinite(np.asarray(filter_logits(jnp.asarray(rows), jnp.ones((n,)), jnp.full((n,), k),
                                                        jnp.full((n,), p))))
            theirs = np.isfinite(TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, torch.tensor(rows))).numpy())
            expected = rows >= np.where(theirs, rows, np.inf).min(-1, keepdims=True)  # theirs, with its ties
            np.testing.assert_array_equal(ours, expected, err_msg=f"top_k={k} top_p={p}")


def test_a_requests_samples_depend_on_its_seed_only(small):
    """Same seed: same reply, whichever slot it lands in and whatever shares the batch; greedy rows beside
    sampled ones stay greedy; top_k=1 and a tiny top_p are greedy."""
    _, model = small
    prompts = _prompts(1, [7, 4, 11])
    sampled = SamplingParams(max_tokens=24, temperature=0.8, top_k=40, seed=5)  # (checked against sample below)
    alone = generate_ids(model, prompts[:1], max_new_tokens=24, temperature=1.0)  # seeds from the call's seed
    engine = Engine(model, max_slots=4, max_length=64, eos_id=None)
    greedy = SamplingParams(max_tokens=24)
    mixed = engine.generate([Request(prompts[1], greedy), Request(prompts[2], sampled),
                             Request(prompts[0], sampled), Request(prompts[0], greedy)])
    again = engine.generate([Request(prompts[0], sampled)])
    assert mixed[2].tokens == again[0].tokens
    assert mixed[2].tokens != mixed[3].tokens  # temperature 0.8 really samples
    assert mixed[1].tokens != mixed[2].tokens and alone[0] != mixed[2].tokens  # other seeds, other draws
    assert engine.generate([Request(prompts[0], SamplingParams(max_tokens=24, temperature=1.0, seed=6))])[0].tokens \
        != mixed[2].tokens
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        (r,) = engine.generate([Request(prompts[0], SamplingParams(max_tokens=24, temperature=1.5, seed=3, **kw))])
        assert r.tokens == mixed[3].tokens
    # Slot 0's reply ends first and the three others decode as every slot, around the empty one: each row keeps
    # its own settings. And a token's draw is keyed by (seed, its index in the reply): one token a call or eight
    # give the same reply.
    gap = engine.generate([Request(prompts[1], SamplingParams(max_tokens=2)), Request(prompts[0], sampled),
                           Request(prompts[2], greedy), Request(prompts[0], greedy)])
    assert gap[1].tokens == mixed[2].tokens and gap[3].tokens == mixed[3].tokens
    one_a_call = Engine(model, max_slots=4, max_length=64, eos_id=None, decode_steps=1)
    assert engine.decode_steps > 1 and one_a_call.generate([Request(prompts[0], sampled)])[0].tokens == mixed[2].tokens
    # Token i of a reply is drawn from transformers' logits at its position with key (seed, i): each token its own
    # key (an off-by-one counter drew the first two with one key), at the request's temperature and top-k (an
    # engine that sampled every row at temperature 1 with no filters passed at 1.0).
    tm, _ = small
    whole = prompts[0] + mixed[2].tokens
    logits = torch_logits(tm, [whole])[0, len(prompts[0]) - 1:len(whole) - 1]
    one = lambda x, dtype=None: jnp.full((len(logits),), x, dtype)  # noqa: E731
    drawn, _, _ = sample(jnp.asarray(logits), one(0.8), one(40), one(1.0), one(5, jnp.uint32),
                         jnp.arange(len(logits), dtype=jnp.uint32), top_n=-1)
    assert np.asarray(drawn).tolist() == mixed[2].tokens


def test_generate_calls_of_other_lengths_reuse_the_compiled_programs(small):
    """generate() sizes its engine's cache in steps of LENGTH_STEP and its slots in powers of two, so calls of
    other reply lengths and batch sizes (MT-Bench's groups and turns) compile nothing new."""
    from zephyr_jax.generate import generate_ids

    _, model = small
    prompts = _prompts(7, [5, 9, 4])
    generate_ids(model, prompts[:2], max_new_tokens=8)
    before = Engine.compiled_programs()
    compiles = []  # XLA compiles of anything, the engine's setup too (its KV cache's zeros compiled per engine)
    listener = lambda event, seconds, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        generate_ids(model, prompts[:2], max_new_tokens=9)
        generate_ids(model, prompts[1:], max_new_tokens=7)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert Engine.compiled_programs() == before
    assert "/jax/core/compile/backend_compile_duration" not in compiles


def test_stop_token_ids_and_stop_strings_end_a_reply(small):
    from zephyr_jax.generate import generate
    from zephyr_jax.tokenizer import load_tokenizer

    _, model = small
    tok = load_tokenizer()
    # generate()'s prompts, misused: one string ran a request per character; a role the template does not know
    # rendered nothing (the question was lost); an empty conversation generated from the template's prefix alone
    with pytest.raises(TypeError, match="prompts is one prompt .* pass a list of them"):
        generate(model, tok, "Hello")
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\] must be \{'role': system\|user\|assistant"):
        generate(model, tok, [[{"role": "User", "content": "Hi"}]])
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty conversation"):
        generate(model, tok, ["Hi", []])
    prompt = _prompts(4, [6])[0]
    engine = Engine(model, tok, max_slots=2, max_length=64, eos_id=None)
    free = engine.generate([Request(prompt, SamplingParams(max_tokens=NEW_TOKENS))])[0]
    assert free.finish_reason == "length" and len(free.tokens) == NEW_TOKENS
    k = next(k for k, t in enumerate(free.tokens) if k > 2 and t not in free.tokens[:k])
    stopped = engine.generate([Request(prompt, SamplingParams(max_tokens=NEW_TOKENS,
                                                              stop_token_ids=(free.tokens[k],)))])[0]
    assert stopped.tokens == free.tokens[:k] and stopped.finish_reason == "stop" and stopped.generated == k + 1
    # A stop string: the text ends right before it (the decoded reply of a random model is just pieces).
    text = tok.decode(free.tokens, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = engine.generate([Request(prompt, SamplingParams(max_tokens=NEW_TOKENS, stop=(stop, "\x00never")))])[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    assert len(cut.tokens) < NEW_TOKENS and free.tokens[:len(cut.tokens)] == cut.tokens
    # The same stop string completed in the decoding call that also reaches max_tokens: the same reply, its
    # tokens after the stop dropped and not counted, as when the stop comes calls before the reply's end.
    one_call = Engine(model, tok, max_slots=2, max_length=64, eos_id=None, decode_steps=NEW_TOKENS)
    both = one_call.generate([Request(prompt, SamplingParams(max_tokens=len(cut.tokens) + 2, stop=(stop,)))])[0]
    assert (both.finish_reason, both.text, both.tokens, both.generated) == \
        ("stop", cut.text, cut.tokens, cut.generated)
    # ... and where an EOS follows it in that call: the EOS is not counted either.
    later = [t for k, t in enumerate(free.tokens) if k > len(cut.tokens) and t not in free.tokens[:k]]
    eos_after = Engine(model, tok, max_slots=2, max_length=64, eos_id=later[0], decode_steps=NEW_TOKENS)
    ended = eos_after.generate([Request(prompt, SamplingParams(max_tokens=NEW_TOKENS, stop=(stop,), logprobs=0))])[0]
    assert (ended.finish_reason, ended.text, ended.tokens, ended.generated) == \
        ("stop", cut.text, cut.tokens, cut.generated)
    assert ended.stop_token is None and len(ended.logprobs) == len(cut.tokens)  # nor listed with the log-probs


def test_stop_strings_decode_only_the_replys_tail_until_one_appears(small, monkeypatch):
    """Searching for a stop string after each decoding call decodes the new tokens and the few before them that a
    stop string could start in, not the whole reply again (which made a long reply's host work quadratic)."""
    from zephyr_jax.tokenizer import load_tokenizer

    _, model = small
    engine = Engine(model, load_tokenizer(), max_slots=1, max_length=256, decode_steps=1)
    decoded = []
    real = engine._decode_text
    special = set(engine.tokenizer.all_special_ids)  # decode to nothing: the tail does not count them
    monkeypatch.setattr(engine, "_decode_text", lambda tokens: decoded.append(
        (len(tokens), sum(t not in special for t in tokens))) or real(tokens))
    stop = "\x00never"
    (r,) = engine.generate([Request(_prompts(4, [6])[0], SamplingParams(max_tokens=240, stop=(stop,),
                                                                        ignore_eos=True))])
    assert r.finish_reason == "length" and len(r.tokens) == 240
    assert decoded[-1][0] == 240  # the final text: one whole decode
    assert max(text for _, text in decoded[:-1]) <= 1 + 4 * len(stop) + 2
    # Special tokens decode to nothing, so the tail counts text tokens: ten </s> kept under ignore_eos between
    # the two newlines of a stop string (a token-counted tail missed it).
    tok = engine.tokenizer
    newline = tok.convert_tokens_to_ids("<0x0A>")
    reply = tok.encode("The answer is 4.", add_special_tokens=False) + [newline] + [tok.eos_token_id] * 10 + \
        [newline] + tok.encode(" More", add_special_tokens=False)
    r = Request([5], SamplingParams(max_tokens=100, stop=("\n\n",), ignore_eos=True))
    for token in reply:  # one token a decoding call
        r.tokens.append(token), r.logprobs.append(0.0), r.top_logprobs.append([])
        if engine._stop_string(r, 1):
            break
    assert r.finish_reason == "stop" and r.text == "The answer is 4."
    # A stop string of one character and five tokens (byte fallback: "▁" and four bytes), one token a call: the
    # tail is long enough to hold all of them (one token a character was not).
    parrot = tok.encode("🦜", add_special_tokens=False)
    assert len(parrot) == 5
    reply = tok.encode("The answer is four, as you can see here", add_special_tokens=False) + parrot + \
        tok.encode(" and more", add_special_tokens=False)
    r = Request([5], SamplingParams(max_tokens=100, stop=("🦜",)))
    for token in reply:
        r.tokens.append(token), r.logprobs.append(0.0), r.top_logprobs.append([])
        if engine._stop_string(r, 1):
            break
    whole = tok.decode(reply)
    assert r.finish_reason == "stop" and r.text == whole[:whole.index("🦜")]
    # A call that ends inside a character's bytes: its text ends in a U+FFFD a byte, which become one character
    # when the next call brings the last byte, so the text shrinks; a stop string right after that character, or
    # ending in it, was searched for past where it starts and missed.
    abc, math_a, han = (tok.encode(t, add_special_tokens=False) for t in ("abc", "𝔸", "㐀"))
    math_a, han = math_a[-4:], han[-3:]  # their bytes (without the word-start "▁")
    for reply, cut_after, stop, text in ((abc + math_a + [newline], len(abc) + 3, "\n", "abc𝔸"),
                                         (abc + han + [newline], len(abc) + 2, "㐀", "abc")):
        r = Request([5], SamplingParams(max_tokens=100, stop=(stop,)))
        for call in (reply[:cut_after], reply[cut_after:]):
            r.tokens.extend(call), r.logprobs.extend([0.0] * len(call)), r.top_logprobs.extend([[]] * len(call))
            if engine._stop_string(r, len(call)):
                break
        assert (r.finish_reason, r.text, r.tokens) == ("stop", text, reply[:len(reply) - (stop == "㐀")]), stop


def test_streamed_text_holds_back_what_may_start_a_stop_string():
    """A call whose text ends in "END", the first three characters of the stop string "END!": they are held back,
    the next token completes the stop, and the streamed pieces join to the final text without them."""
    from zephyr_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids = tok.encode("Hello world END!", add_special_tokens=False)  # ▁Hello ▁world ▁END !
    r = Request([1], SamplingParams(stop=("END!",)))
    r.tokens.extend(ids[:-1])
    pieces = [r.new_text(tok)]
    r.tokens.append(ids[-1])
    r.finish_reason, r.text = "stop", "Hello world "  # as the engine ends it at the stop string
    pieces.append(r.new_text(tok))
    assert "END" not in pieces[0] and "".join(pieces) == r.text, pieces
    # A stop string may begin in the space the reply's first token takes after the prompt (Request.lead, which the
    # reply decoded alone drops): "Hello" is held back while " Hello!" may follow (it was sent, then cut away).
    lead = Request([1], SamplingParams(stop=(" Hello!",)), lead=" ")
    lead.tokens.extend(ids[:1])
    assert lead.new_text(tok) == ""
    lead.tokens.extend(ids[1:2])
    assert lead.new_text(tok) == "Hello world"


def test_streamed_text_joins_to_the_reply_never_takes_back_and_decodes_each_token_a_few_times():
    """Request.new_text, as chat and the server stream: the pieces join to the whole reply's decode, no piece is
    taken back later (bytes of a run that turns out not to be UTF-8 become U+FFFD, valid ones before it included),
    and only the tokens since the last call and the few before them are decoded (the whole reply each call, before:
    quadratic). Replies of words, emoji and CJK in byte tokens, random tokens, random byte runs with </s> and ids
    past the tokenizer's vocabulary (a model with padded embeddings), and one of bytes only."""
    from zephyr_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    words = tok.encode("Héllo wörld 😀 — 中文 test.\n\n  indented  “quotes” 🤖🧪 ok", add_special_tokens=False)
    decoded, real = [0], tok.decode
    counting = lambda ids, **kw: decoded.__setitem__(0, decoded[0] + len(ids)) or real(ids, **kw)  # noqa: E731
    for seed in range(63):
        rng = np.random.default_rng(seed)
        # Ids past the tokenizer's 32,000 (a model with padded embeddings) decode to nothing.
        ids = [list(words) * 3, rng.integers(3, 32000, 200).tolist(),
               rng.choice(np.concatenate([words, rng.integers(3, 300, 20), [2, 2, 32000, 32007]]), 200).tolist(),
               rng.integers(3, 259, 600).tolist()][seed % 3 if seed < 60 else 3]  # the last: 600 byte tokens
        r, pieces, decoded[0] = Request([1], SamplingParams(stop=("\n\n",) if seed % 2 else ())), [], 0
        tok.decode = counting
        try:
            while len(r.tokens) < len(ids):
                r.tokens.extend(ids[len(r.tokens):len(r.tokens) + int(rng.integers(1, 6))])
                pieces.append(r.new_text(tok))
        finally:
            del tok.decode
        whole = tok.decode(ids, skip_special_tokens=True)
        assert whole.startswith("".join(pieces)), seed
        assert decoded[0] <= 4 * len(ids), (seed, decoded[0])  # the whole reply each call: ~20x its length here
        r.finish_reason, r.text = "length", whole
        assert "".join(pieces) + r.new_text(tok) == whole, seed


def test_bad_requests_are_refused_and_a_cancelled_request_frees_its_slot(small):
    _, model = small
    engine = Engine(model, max_slots=1, max_length=64, max_queue=1, eos_id=None)
    trained = model.config.max_position_embeddings  # a longer cache is allowed, as in transformers, but said
    with pytest.warns(UserWarning, match=f"max_length={trained + 16} is above the model's max_position_embeddings"):
        Engine(model, max_slots=1, max_length=trained + 16)
    with pytest.raises(ValueError, match="exceed the context of 64"):
        engine.submit(Request([5] * 60, SamplingParams(max_tokens=8)))
    for bad, name in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                      (dict(logprobs=21), "logprobs"), (dict(max_tokens=-1), "max_tokens")]:
        with pytest.raises(ValueError, match=name):
            engine.submit(Request([5], SamplingParams(**bad)))
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        engine.submit(Request([5, 500], SamplingParams()))
    # Values the engine's int32 arrays cannot hold are refused here, not on its thread (where they would fail
    # every request in flight).
    with pytest.raises(ValueError, match=r"top_k=1000000000000: must be in \[0, 128\]"):
        engine.submit(Request([5], SamplingParams(top_k=10 ** 12)))
    with pytest.raises(ValueError, match=r"stop_token_ids=\[1099511627776\]"):
        engine.submit(Request([5], SamplingParams(stop_token_ids=(2 ** 40,))))
    with pytest.raises(ValueError, match="exceed the context"):  # all or none: the good one is not left queued
        engine.generate([Request([5], SamplingParams(max_tokens=3)), Request([5] * 60, SamplingParams(max_tokens=8))])
    assert not engine.waiting
    with pytest.raises(ValueError, match="decode_steps=0: must be at least 1"):
        Engine(model, max_slots=1, max_length=64, decode_steps=0)
    with pytest.raises(ValueError, match="max_length=0: must be at least 2"):  # was taken as "not given": 4096
        Engine(model, max_slots=1, max_length=0)
    # Values of another type were cut to whole numbers (2.5 tokens ran as 3, seed 1.9 as 1, token 2.7 as 2).
    for bad, name in [(dict(max_tokens=2.5), "max_tokens"), (dict(seed=1.9), "seed"), (dict(top_k=2.5), "top_k")]:
        with pytest.raises(ValueError, match=f"{name}={list(bad.values())[0]}: must be a whole number"):
            engine.submit(Request([5], SamplingParams(**bad)))
    # A stop id of 297.5 stopped the device's scan at 297, where the host, comparing 297.5, went on: every call cut
    # short, and the reply never stopped. A log-prob count of 2.5 is not one either.
    for bad, message in [(dict(stop_token_ids=(11, 297.5)), r"stop_token_ids=\(11, 297.5\): must be whole numbers"),
                         (dict(stop_token_ids=(True,)), r"stop_token_ids=\(True,\): must be whole numbers"),
                         (dict(logprobs=2.5), "logprobs=2.5: must be None or a whole number"),
                         (dict(prompt_logprobs=1.0), "prompt_logprobs=1.0: must be None or a whole number")]:
        with pytest.raises(ValueError, match=message):
            engine.submit(Request([5], SamplingParams(**bad)))
    with pytest.raises(ValueError, match="Request.prompt must be a list of token ids .whole numbers., got float64"):
        engine.submit(Request([1, 2.7], SamplingParams()))
    with pytest.raises(TypeError, match="Request.prompt is token ids: encode the text first"):
        engine.submit(Request("hello", SamplingParams()))
    with pytest.raises(ValueError, match="the prompt is empty: give at least one token"):
        engine.submit(Request([], SamplingParams()))
    with pytest.raises(ValueError, match="stop strings need an engine with a tokenizer"):  # (this one has none)
        engine.submit(Request([5], SamplingParams(max_tokens=2, stop="x")))
    for seed in (-1, 1.5, True):  # a call's seed, before any engine is made
        with pytest.raises(ValueError, match=rf"^seed={seed!r}: must be a whole number >= 0$"):
            generate_ids(model, [[5]], max_new_tokens=2, seed=seed)
    assert SamplingParams(stop="END").stop == ("END",)  # one stop string, not a stop at each of E, N and D
    assert SamplingParams(stop_token_ids=np.array([11, 3])).stop_token_ids == (11, 3)
    # A Request run again, or twice in one call: its slot was never freed, and generate() waited for ever.
    done = engine.generate([Request(np.array([5, 6]), SamplingParams(max_tokens=2))])[0]
    assert done.prompt == [5, 6] and len(done.tokens) == 2
    with pytest.raises(ValueError, match="was already submitted: make a new Request"):
        engine.generate([done])
    twice = Request([5], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="the same Request appears twice"):
        engine.generate([twice, twice])
    # More requests than slots + queue: generate() submits the ones a full queue refused again, once there is room
    # (12 tokens outlast a step, a prefill and 8 decoded, so the next one is refused while the slot is taken)
    queued = [Request([5, 6], SamplingParams(max_tokens=12)) for _ in range(4)]
    assert all(len(r.tokens) == 12 for r in Engine(model, max_slots=1, max_length=64, max_queue=0,
                                                   eos_id=None).generate(queued))
    engine.start()
    try:
        # first's update holds the engine's thread until the cancel is in: its 50 tokens take 20 ms, which a
        # loaded machine's pause of this thread outlasted (first then finished, "length", once in 100 tries)
        seen, cancelled = threading.Event(), threading.Event()
        first = engine.submit(Request([5, 6], SamplingParams(max_tokens=50),
                                      on_update=lambda r: seen.set() or cancelled.wait(20)))
        assert seen.wait(60)  # first is decoding in the only slot
        with pytest.raises(RuntimeError, match="this engine runs on its own thread: submit"):
            engine.generate([Request([7], SamplingParams(max_tokens=3))])
        waiting = engine.submit(Request([7], SamplingParams(max_tokens=3)))
        with pytest.raises(QueueFull):
            engine.submit(Request([8], SamplingParams(max_tokens=3)))
        engine.cancel(first)
        cancelled.set()
        assert first.done.wait(60) and first.finish_reason == "cancelled" and len(first.tokens) < 50
        assert waiting.done.wait(60) and waiting.finish_reason == "length" and len(waiting.tokens) == 3
        # One cancelled while it waits for a slot (its client gone) leaves the queue at the next step, unrun.
        held, release = threading.Event(), threading.Event()
        busy = engine.submit(Request([5, 6], SamplingParams(max_tokens=3),
                                     on_update=lambda r: held.set() or release.wait(20)))
        assert held.wait(60)  # busy holds the only slot, and the engine's thread
        queued = engine.submit(Request([7], SamplingParams(max_tokens=3)))
        engine.cancel(queued)
        release.set()
        assert queued.done.wait(60) and (queued.finish_reason, queued.generated, queued._slot) == ("cancelled", 0, None)
        assert busy.done.wait(60) and busy.finish_reason == "length" and not engine.waiting
        # A call that raises ends the requests it held with an error, and the engine goes on; a request waiting for
        # a slot was in no failed call and runs (it was ended with the same error).
        decode, spared_waits = engine._decode, threading.Event()

        def lost():  # as when a call fails after its donated cache was consumed
            engine._decode = decode  # (once)
            assert spared_waits.wait(20)
            engine.cache.k.delete()
            raise RuntimeError("device lost")

        engine._decode = lost
        doomed = engine.submit(Request([5, 6], SamplingParams(max_tokens=5)))
        spared = engine.submit(Request([7, 8], SamplingParams(max_tokens=5)))  # the only slot is doomed's
        spared_waits.set()
        assert doomed.done.wait(60) and doomed.finish_reason == "error" and "device lost" in doomed.error
        assert spared.done.wait(60) and (spared.finish_reason, len(spared.tokens)) == ("length", 5), spared.error
        after = engine.submit(Request([5, 6], SamplingParams(max_tokens=5)))
        assert after.done.wait(60) and after.finish_reason == "length" and len(after.tokens) == 5
        # Stopped and started again (a notebook between serving and generate()): the new thread ended at once,
        # and a request submitted then waited for ever; generate() was refused for good.
        engine.stop()
        engine.start()
        again = engine.submit(Request([5, 6], SamplingParams(max_tokens=2)))
        assert again.done.wait(20), "the engine's loop did not run again"
        with pytest.raises(RuntimeError, match="the engine's thread is already running"):
            engine.start()
        engine.stop()
        assert engine.generate([Request([5, 6], SamplingParams(max_tokens=2))])[0].finish_reason == "length"
        # A request submitted to a stopped engine (a backend used after its BackendSet closed) waited for ever.
        with pytest.raises(RuntimeError, match=r"the engine is stopped: nothing would run this request; start\(\) "
                                               r"it again, or call generate\(\)"):
            engine.submit(Request([5, 6], SamplingParams(max_tokens=2)))
    finally:
        engine.stop()


def test_a_failing_callback_or_cache_never_leaves_a_request_waiting(small, monkeypatch, fail_for_good):
    """An on_update that raises (its event loop closed: a data run stopped midway left its calls running) ended
    the engine's thread, from inside the error path that ends the other requests: every request then waited for
    ever. Such a request is cancelled, with a warning, and the others go on. A failure the engine cannot recover
    from (no cache can be made again) ends every request with the error, and later submits are refused."""
    _, model = small
    engine = Engine(model, max_slots=2, max_length=64, eos_id=None)

    def closed(r):
        raise RuntimeError("Event loop is closed")

    engine.start()
    try:
        with pytest.warns(RuntimeWarning, match=r"req-\d+'s on_update raised RuntimeError: Event loop is closed; "
                                                r"the request is cancelled"):
            gone = [engine.submit(Request([5, 6], SamplingParams(max_tokens=40), on_update=closed))
                    for _ in range(2)]
            assert all(r.done.wait(20) for r in gone), "the engine's thread died"
        assert [r.finish_reason for r in gone] == ["cancelled"] * 2
        with warnings.catch_warnings():  # said once: raising again for a cancelled request is not news
            warnings.simplefilter("error")
            engine._notify(gone[0])
        after = engine.submit(Request([5, 6], SamplingParams(max_tokens=5)))
        assert after.done.wait(20) and after.finish_reason == "length" and len(after.tokens) == 5

        fail_for_good(engine)
        lost, queued = engine._decode, threading.Event()

        def lost_once_queued():  # the failing call starts once requests wait behind it
            assert queued.wait(20)
            lost()

        engine._decode = lost_once_queued
        ended = []  # the thread's own error is still raised there (and printed, outside a test)
        monkeypatch.setattr(threading, "excepthook", ended.append)
        doomed = engine.submit(Request([5, 6], SamplingParams(max_tokens=5)))
        behind = [engine.submit(Request([5, 6], SamplingParams(max_tokens=5))) for _ in range(2)]  # (2 slots)
        queued.set()
        assert doomed.done.wait(20) and doomed.finish_reason == "error" and "device lost" in doomed.error
        # those still queued are ended too: no thread would ever run them
        assert all(r.done.wait(20) and r.finish_reason == "error" for r in behind), [r.finish_reason for r in behind]
        engine._thread.join(20)
        assert [type(x.exc_value) for x in ended] == [MemoryError]
        with pytest.raises(RuntimeError, match=r"the engine's thread stopped \(MemoryError: RESOURCE_EXHAUSTED: no "
                                               r"room for the cache\): make a new Engine"):
            engine.submit(Request([5, 6], SamplingParams(max_tokens=5)))
        with pytest.raises(RuntimeError, match=r"the engine's thread stopped \(MemoryError"):  # not "use submit()"
            engine.generate([Request([5, 6], SamplingParams(max_tokens=5))])
    finally:
        engine.stop()


def test_layer_weights_have_buffers_of_their_own_on_gpus_and_stay_stacked_where_that_does_not_fit(small,
                                                                                                monkeypatch):
    """The engine's default: per-layer buffers on GPUs only (TPUs read the stacked weights in place; CPUs are the
    tests' platform). Where the copy runs out of GPU memory and nobody asked for it, the stacked weights stay, with
    a warning; asked for, the error stands."""
    from zephyr_jax import engine as engine_module

    _, model = small
    own = engine_module._own_layer_buffers(model, None, "gpu")
    assert isinstance(own.layers, nnx.List) and len(own.layers) == model.config.num_hidden_layers
    np.testing.assert_array_equal(own.layers[1].mlp.up_proj.kernel.get_value(),
                                  model.layers.mlp.up_proj.kernel.get_value()[1])
    assert not isinstance(model.layers, nnx.List)  # the caller's model keeps its stacked layers
    assert engine_module._own_layer_buffers(own, True, "gpu") is own  # already per-layer: not split again
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)), jnp.int32)
    np.testing.assert_allclose(own(ids), model(ids), rtol=0, atol=1e-5)  # the layers one after another, not scanned
    assert engine_module._own_layer_buffers(model, None, "tpu") is None
    assert engine_module._own_layer_buffers(model, None, "cpu") is None
    assert engine_module._own_layer_buffers(model, False, "gpu") is None

    def out_of_memory(_):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 58720256 bytes.")

    monkeypatch.setattr(engine_module.mistral, "per_layer_weights", out_of_memory)
    with pytest.warns(UserWarning, match=r"no room for a per-layer copy of the layer weights \(RESOURCE_EXHAUSTED: "
                                         r"Out of memory .*per_layer_weights=False"):
        assert engine_module._own_layer_buffers(model, None, "gpu") is None
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        engine_module._own_layer_buffers(model, True, "gpu")


def test_generation_with_fsdp_sharded_parameters_equals_one_device(tmp_path):
    from zephyr_jax.sharding import make_mesh

    assert jax.device_count() == 8
    tm = torch_mistral(seed=12, initializer_range=0.2)
    path = save_torch(tm, tmp_path)
    single = load_model(path, dtype="float32")
    mesh = make_mesh((1, 4, 2))
    sharded = load_model(path, dtype="float32", mesh=mesh)
    embed = sharded.embed_tokens.get_value()
    assert len(embed.sharding.device_set) == 8 and embed.addressable_shards[0].data.shape[1] == 64 // 4
    prompts = _prompts(5, [10, 6, 3])
    expected = generate_ids(single, prompts, max_new_tokens=NEW_TOKENS)
    # The KV cache's storage orders, its KV heads split over "tensor"; the mesh given, or the parameters' own
    # (README's zephyr_jax.load(..., mesh=...) then generate(...): the cache went to device 0 and every call failed).
    # With 4 slots, also the slots split over the batch axes (fsdp=4: each device holds its requests' part).
    # And the layer weights in buffers of their own (GPUs' layout), each sharded as its stacked weights were.
    for heads_first, given, slots, per_layer in ((True, mesh, 2, False), (False, None, 2, False),
                                                 (True, None, 4, False), (True, None, 2, True)):
        engine = Engine(sharded, max_slots=slots, max_length=64, eos_id=None, mesh=given,
                        heads_first_cache=heads_first, per_layer_weights=per_layer)
        if per_layer:
            q = nnx.merge(engine.graphdef, engine.state).layers[1].self_attn.q_proj.kernel.get_value()
            assert q.sharding.shard_shape(q.shape) == (64 // 4, q.shape[1] // 2)  # fsdp x tensor, as stacked
        spec, axes = engine.cache.k.sharding.spec, kv_cache.axes(heads_first)
        assert spec[axes.index("kv_heads")] == "tensor" and list(spec).count("tensor") == 1
        assert spec[axes.index("slots")] == ("fsdp" if slots == 4 else None)
        out = engine.generate([Request(p, SamplingParams(max_tokens=NEW_TOKENS)) for p in prompts])
        assert [r.tokens for r in out] == expected
    with pytest.raises(ValueError, match=r"Engine mesh= is over devices \[0, 1, 2, 3, 4, 5, 6, 7\], the model's "
                                         r"parameters on \[0\]"):  # built, then every call failed
        Engine(single, max_slots=2, max_length=64, mesh=mesh)
    for placed in (load_model(path, dtype="float32", mesh=make_mesh((1, 1, 1), devices=[jax.devices()[3]])),
                   nnx.merge(*jax.device_put(nnx.split(single), jax.devices()[5]))):  # one model per accelerator
        out = Engine(placed, max_slots=2, max_length=64, eos_id=None).generate(
            [Request(p, SamplingParams(max_tokens=NEW_TOKENS)) for p in prompts])
        assert [r.tokens for r in out] == expected


def test_warmup_compiles_every_decoding_bucket_and_leaves_the_cache_as_it_was(small):
    """After warmup(), requests of any count and length compile no decoding program, one request at a time
    compiles no program at all, and they reply as on an engine that was not warmed up."""
    from zephyr_jax import engine as engine_module

    _, model = small
    engine = Engine(model, max_slots=4, max_length=193, eos_id=None)
    # Decoding: rows 1, 2, or all 4 slots (3 decoding rows round up to 4, over half) x attention over 128, 192 or
    # 193 positions. Prefill, one row: chunks of 16, 24, 32, 48, 64, 96, 128, 192 or 256 tokens (prompts up to
    # 193: the last only scored, max_tokens=0, and the only one in a chunk of 256), attending over 128 positions
    # up to the chunk of 128 and over all 193 after.
    assert engine.warmup() == 9 + 9
    prompts = _prompts(11, [3, 150, 40, 9, 90, 20, 60, 193])
    budgets = [30, 43, 5, 20, 12, 40, 33, 0]  # 150 + 43: the context's end
    compiled = engine.compiled_programs()
    alone = [engine.generate([Request(p, SamplingParams(max_tokens=n))])[0] for p, n in zip(prompts, budgets)]
    assert engine.compiled_programs() == compiled
    assert [len(r.tokens) for r in alone] == budgets
    # Together they prefill in groups of rows (shapes the warm-up leaves out), and decode without a compile.
    compiled = engine_module._decode._cache_size()
    done = engine.generate([Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, budgets)])
    assert engine_module._decode._cache_size() == compiled
    fresh = Engine(model, max_slots=4, max_length=193, eos_id=None)
    expected = fresh.generate([Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, budgets)])
    assert [r.tokens for r in done] == [r.tokens for r in expected]
    assert [len(r.tokens) for r in done] == budgets
