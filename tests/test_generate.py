"""Greedy decoding with the KV cache against transformers' generate(do_sample=False), token for token."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.torch_reference import save_torch, torch_mistral
from zephyr_jax import hf
from zephyr_jax.generate import generate_ids
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
