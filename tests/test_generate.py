"""Generation: greedy decoding with the KV cache against transformers' generate(do_sample=False), token for
token; sampling against the filtered-softmax formula; seeds, top-k/top-p limits, per-row stopping, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.torch_reference import save_torch, torch_mistral
from zephyr_jax import hf
from zephyr_jax.generate import generate_ids, sample_next
from zephyr_jax.model import KVCache

NEW_TOKENS = 40
EOS, PAD = 2, 0


def _left_padded(rng, lengths, vocab=128):
    total = max(lengths)
    ids = np.full((len(lengths), total), PAD, np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab, size=n)
        mask[row, total - n:] = 1
    return ids, mask


def _hf_greedy(tm, ids, mask):
    with torch.no_grad():
        out = tm.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0, eos_token_id=EOS,
                          pad_token_id=PAD)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, NEW_TOKENS - new.shape[1])), constant_values=PAD)  # stopped early


@pytest.mark.parametrize("fields,lengths", [
    # No window: two prompt lengths in one left-padded batch.
    (dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None), [9, 5]),
    # Window 6 < prompt + 40 new tokens: both rows decode far past the window; the longer prompt exceeds it.
    (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=6), [12, 4]),
    # Window 16: the short row crosses it only while decoding.
    (dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=16, num_hidden_layers=3), [20, 7]),
])
def test_greedy_matches_transformers(tmp_path, fields, lengths):
    # A sharper output distribution keeps greedy choices away from near-ties, where float rounding could flip one.
    tm = torch_mistral(seed=len(lengths) + lengths[0], initializer_range=0.2, **fields)
    model = hf.load_pretrained(save_torch(tm, tmp_path), dtype=jnp.float32)
    ids, mask = _left_padded(np.random.default_rng(lengths[0]), lengths)
    ours = generate_ids(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_id=EOS, pad_id=PAD)
    ref = _hf_greedy(tm, ids, mask)
    assert ref.shape == ours.shape == (2, NEW_TOKENS)
    assert len(np.unique(ref)) > 5, "degenerate reference (a repeated token) would prove little"
    np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_full_forward(tmp_path):
    """Prefill + one-token steps give the same logits as one forward pass over the whole sequence."""
    tm = torch_mistral(num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    model = hf.load_pretrained(save_torch(tm, tmp_path), dtype=jnp.float32)
    ids, mask = _left_padded(np.random.default_rng(7), [14, 9])
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    cache = KVCache.init(model.config, 2, 14)
    logits, cache = model.with_cache(jnp.asarray(ids[:, :6]), cache, jnp.asarray(mask[:, :6]))
    np.testing.assert_allclose(np.asarray(logits), full[:, 5], atol=1e-4)
    for t in range(6, 14):
        logits, cache = model.with_cache(jnp.asarray(ids[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-4)


# --- Sampling: the filtered softmax, seeds, top-k/top-p limits, per-row stopping, sharded parameters. ---

@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    tm = torch_mistral(seed=11, initializer_range=0.2)
    return hf.load_pretrained(save_torch(tm, tmp_path_factory.mktemp("small")), dtype=jnp.float32)


def _filtered_softmax(logits, temperature, top_k, top_p):
    """Reference (numpy, float64) of what sample_next draws from: HF's temperature, top-k and top-p warpers."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-p)
        mass_before = np.cumsum(p[order]) - p[order]
        keep_sorted = mass_before < top_p
        keep = np.zeros_like(keep)
        keep[order[keep_sorted]] = True
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0),
                                                      (1.0, 0, 0.8), (1.3, 5, 0.9)])
def test_sample_next_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    n = 40000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: sample_next(logits, k, temperature=temperature, top_k=top_k, top_p=top_p))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=8) / n
    expected = _filtered_softmax(logits[0], temperature, top_k, top_p)
    assert np.all(freq[expected == 0] == 0), "a filtered-out token was drawn"
    np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / n))  # 5 sigma of a frequency


def test_sampling_is_reproducible_per_seed(small_model):
    ids, mask = _left_padded(np.random.default_rng(1), [7, 4])
    draw = lambda seed: generate_ids(small_model, ids, mask, max_new_tokens=24, temperature=1.0, seed=seed)
    first = draw(5)
    np.testing.assert_array_equal(draw(5), first)
    assert not np.array_equal(draw(6), first)
    greedy = generate_ids(small_model, ids, mask, max_new_tokens=24)
    assert not np.array_equal(first, greedy)  # temperature 1 really samples


def test_top_k_1_and_a_tiny_top_p_are_greedy(small_model):
    ids, mask = _left_padded(np.random.default_rng(2), [9, 3])
    greedy = generate_ids(small_model, ids, mask, max_new_tokens=24)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        np.testing.assert_array_equal(
            generate_ids(small_model, ids, mask, max_new_tokens=24, temperature=1.5, seed=3, **kw), greedy)


def test_a_row_that_emits_eos_stops_while_the_others_go_on(small_model):
    ids, mask = _left_padded(np.random.default_rng(4), [6, 8])
    free = generate_ids(small_model, ids, mask, max_new_tokens=NEW_TOKENS)  # never stops
    # Declare as "</s>" a token that row 0 emits at some step k but row 1 never emits.
    k, eos = next((k, int(t)) for k, t in enumerate(free[0]) if k > 2 and t not in free[1] and t not in free[0][:k])
    out = generate_ids(small_model, ids, mask, max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=PAD)
    np.testing.assert_array_equal(out[0, :k + 1], free[0, :k + 1])
    assert np.all(out[0, k + 1:] == PAD)
    np.testing.assert_array_equal(out[1], free[1])


def test_generation_with_fsdp_sharded_parameters_equals_one_device(tmp_path):
    from zephyr_jax.sharding import make_mesh, model_shardings

    assert jax.device_count() == 8
    tm = torch_mistral(seed=12, initializer_range=0.2)
    path = save_torch(tm, tmp_path)
    single = hf.load_pretrained(path, dtype=jnp.float32)
    shardings = model_shardings(single.config, make_mesh((1, -1, 1)))
    sharded = hf.load_pretrained(path, dtype=jnp.float32, shardings=shardings)
    embed = sharded.embed_tokens.get_value()
    assert len(embed.sharding.device_set) == 8 and embed.addressable_shards[0].data.shape[1] == 64 // 8
    ids, mask = _left_padded(np.random.default_rng(5), [10, 6])
    np.testing.assert_array_equal(generate_ids(sharded, ids, mask, max_new_tokens=NEW_TOKENS),
                                  generate_ids(single, ids, mask, max_new_tokens=NEW_TOKENS))
