"""Logits of zephyr_jax's Mistral against transformers' PyTorch MistralForCausalLM with the same random weights.

The weights travel the way a user's would: transformers' save_pretrained (safetensors) -> zephyr_jax.load.
Three configs cover GQA ratios 1, 2 and 4, a head_dim unequal to hidden/heads, and sliding windows shorter than
the sequences; inputs have odd lengths, right and left padding, and packed rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.torch_reference import positions_from_mask, save_torch, torch_logits, torch_mistral
from zephyr_jax.loading import load_model
from zephyr_jax.model import MistralConfig
from zephyr_jax.model.mistral import RMSNorm, default_positions

CONFIGS = {
    # GQA ratio 1 (plain multi-head attention), no sliding window.
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=None),
    # GQA ratio 2, head_dim 24 != 64 / 4, sliding window 5 (shorter than every test sequence).
    "gqa2_headdim24_window5": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=5),
    # GQA ratio 4, head_dim 16 != 64 / 8, window 7, three layers, and rms_norm_eps 1e-6 (transformers' default,
    # not Mistral-7B's 1e-5, which the other configs and MistralConfig's default share).
    "gqa4_window7": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=7,
                         num_hidden_layers=3, rms_norm_eps=1e-6),
}
TOL = 2e-5  # float32, max |diff|: ten times the largest measured (2.0e-6; the issue asked for 1e-4)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(torch model, zephyr_jax model loaded from the torch model's safetensors, that directory)."""
    tm = torch_mistral(**CONFIGS[request.param])
    path = save_torch(tm, tmp_path_factory.mktemp(request.param))
    return tm, load_model(path, jnp.float32), path


def _random_ids(rng, batch, length, vocab=128):
    return rng.integers(3, vocab, size=(batch, length)).astype(np.int32)


def _padded(rng, lengths, side):
    """Random ids and their mask, each row padded on `side` to the longest length ("middle": between its halves)."""
    total = max(lengths)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        span = {"right": np.arange(n), "left": np.arange(total - n, total),
                "middle": np.r_[0:n // 2, total - (n - n // 2):total]}[side]
        ids[row, span] = _random_ids(rng, 1, n)[0]
        mask[row, span] = 1
    return ids, mask


def _assert_close(ours, ref, where=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    if where is not None:
        ours, ref = ours[where], ref[where]
    assert ref.std() > 0.3, "reference logits are nearly constant: the comparison would say little"
    err = np.abs(ours - ref).max()
    assert err <= TOL, f"max |diff| {err:.2e} > {TOL}"


def test_logits_match_transformers_unpadded_odd_length(pair):
    tm, model, _ = pair
    ids = _random_ids(np.random.default_rng(0), 2, 13)
    _assert_close(model(jnp.asarray(ids)), torch_logits(tm, ids))


def test_logits_match_transformers_far_into_the_context(pair):
    """RoPE at positions near Mistral-7B's 32,768 (past the test model's max_position_embeddings, which the
    forward pass does not read), given to both models: float32 angles of ~3e4 radians computed as transformers computes
    them. Attention sees only position differences, so this pins the angles' rounding far out, not the offset."""
    tm, model, _ = pair
    ids = _random_ids(np.random.default_rng(5), 2, 13)
    positions = np.tile(32_700 + np.arange(13), (2, 1))
    _assert_close(model(jnp.asarray(ids), positions=jnp.asarray(positions, jnp.int32)),
                  torch_logits(tm, ids, position_ids=positions))


@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_logits_match_transformers_padded(pair, side):
    tm, model, _ = pair
    ids, mask = _padded(np.random.default_rng(1), [17, 11], side)
    # Left and middle: padding that carries its row's segment id (1) is still hidden by the attention mask.
    segments = None if side == "right" else jnp.ones(ids.shape, jnp.int32)
    ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), segment_ids=segments)
    # transformers counts positions from the first column; give it the token-counting positions zephyr_jax uses.
    ref = torch_logits(tm, ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    _assert_close(ours, ref, where=mask.astype(bool))
    if side == "middle" and model.config.sliding_window is not None:
        return  # the window counts slots, the gap's too, as transformers counts them: not the row run alone
    # A padded row gives the same logits as the row run alone.
    short = ids[1][mask[1].astype(bool)][None]
    alone = model(jnp.asarray(short))
    np.testing.assert_allclose(np.asarray(ours)[1][mask[1].astype(bool)], np.asarray(alone)[0], atol=TOL)


def test_packed_row_equals_examples_run_alone(pair):
    tm, model, _ = pair
    rng = np.random.default_rng(2)
    a, b = _random_ids(rng, 1, 7), _random_ids(rng, 1, 9)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 7 + [2] * 9], np.int32)
    ours = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(segments)))
    _assert_close(ours[:, :7], torch_logits(tm, a))
    _assert_close(ours[:, 7:], torch_logits(tm, b))
    # The positions each example has run alone (RoPE's relative angles would hide an offset from the logits),
    # padding in front or not.
    alone = list(range(7)) + list(range(9))
    assert default_positions(jnp.ones((1, 16), jnp.int32), jnp.asarray(segments)).tolist() == [alone]
    real, front = np.array([[0] * 3 + [1] * 16]), np.array([[1] * 3 + [1] * 7 + [2] * 9])
    assert default_positions(jnp.asarray(real), jnp.asarray(front)).tolist() == [[0] * 3 + alone]


def test_inputs_the_model_cannot_read_are_named():
    """-1 read the last embedding row and vocab_size filled NaN, which attention spread over the whole row; inputs
    of another shape failed in jax's broadcasting, naming neither; config values of another type ran on."""
    from zephyr_jax.model import Mistral, MistralConfig

    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)
    model, ids = Mistral(cfg, rngs=nnx.Rngs(0)), jnp.ones((1, 6), jnp.int32)
    for bad in (-1, 128):
        with pytest.raises(ValueError, match=rf"input_ids holds {bad}, outside the vocabulary \[0, 128\)"):
            model(ids.at[0, 3].set(bad))
    with pytest.raises(ValueError, match=r"positions has shape \(1, 3\), input_ids \(1, 6\): they must match"):
        model(ids, positions=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids of shape \[batch, length\], got float"):
        model(jnp.ones((1, 6)))
    # Nested lists are read as input_ids are (positions, segment ids and mask failed in .astype or list indexing).
    as_arrays = dict(positions=jnp.asarray([[0, 1, 2, 0, 1, 2]]), segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 2]]),
                     attention_mask=jnp.asarray([[1, 1, 1, 1, 1, 0]]))
    np.testing.assert_array_equal(model(ids.tolist(), **{k: v.tolist() for k, v in as_arrays.items()}),
                                  model(ids, **as_arrays))
    # Traced ids go unchecked, and the jitted call runs: the same logits up to float32 rounding (XLA fuses the
    # jitted program differently from the op-by-op eager one; on an AMD EPYC host 110 of 768 differ by <= 6e-8).
    np.testing.assert_allclose(nnx.jit(lambda m, i: m(i))(model, ids), model(ids), rtol=1e-5, atol=1e-6)
    for field, value, message in [("sliding_window", "4096", "a whole number or None"),
                                  ("scan_layers", "False", "must be True or False"),
                                  ("param_dtype", "int8", "a floating-point dtype"),
                                  ("hidden_size", 32.0, "must be a whole number >= 1"),
                                  ("head_dim", 7, "must be even, RoPE rotates"),  # a numpy split error named none
                                  ("rope_theta", "1e6", "must be a positive number"),  # a TypeError naming none
                                  ("rms_norm_eps", True, "must be a positive number"),  # ran as eps = 1
                                  ("hidden_act", "gelu", "only 'silu'"),
                                  ("attention_impl", "flash", "expected one of"),
                                  ("remat", "partial", "expected one of")]:
        with pytest.raises(ValueError, match=f"{field}={value!r}: {message}" if field != "param_dtype" else message):
            cfg.replace(**{field: value})
    # A size int32 cannot hold failed in jax with an OverflowError ("argument path is y") naming no field, and more
    # heads than hidden_size gave head_dim 0, a model that reached the train step.
    with pytest.raises(ValueError, match=r"sliding_window=0 must be positive or None"):
        cfg.replace(sliding_window=0)
    with pytest.raises(ValueError, match=r"num_hidden_layers=2147483648: above 2\*\*31 - 1"):
        cfg.replace(num_hidden_layers=2 ** 31)
    with pytest.raises(ValueError, match=r"head_dim=0 \(hidden_size=32 // num_attention_heads=64\): must be at least"):
        cfg.replace(num_attention_heads=64, head_dim=None)  # (None: hidden_size // num_attention_heads)


def test_bf16_compute_within_documented_tolerance(pair):
    """bf16 activations over float32 parameters: max |diff| to float32 logits <= 5% of the logits' range.

    bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); a few layers of rounding compound to about 1%.
    """
    _, model, path = pair
    model_bf16 = load_model(path, jnp.bfloat16, param_dtype=jnp.float32)
    assert model_bf16.embed_tokens[...].dtype == jnp.float32
    ids = jnp.asarray(_random_ids(np.random.default_rng(3), 2, 16))
    ref = np.asarray(model(ids))
    ours = np.asarray(model_bf16(ids))
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])  # inference's weights; training's
def test_bf16_compute_keeps_norms_and_softmax_in_float32(pair, param_dtype):
    """As transformers does, RMSNorm and the attention softmax compute in float32 under bf16 activations: every
    reduction, exp and rsqrt of the bf16 forward pass takes float32 operands. (Logit tolerances cannot see this on
    tiny models, where plain bf16 rounding is already ~2%.)"""
    model = load_model(pair[2], jnp.bfloat16, param_dtype=param_dtype)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(_random_ids(np.random.default_rng(5), 2, 8))
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state)
    checked = {"reduce_sum", "reduce_max", "exp", "rsqrt"}
    seen = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in checked:
                seen.append((eqn.primitive.name, {str(v.aval.dtype) for v in eqn.invars}))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert {name for name, _ in seen} == checked, seen  # norms (sum, rsqrt) and softmax (max, exp, sum) were found
    assert all(dtypes == {"float32"} for _, dtypes in seen), seen
    # The residual stream between layers (the layer scan's carry) is bf16, and the LM head's matmul, the last
    # one, accumulates into float32 logits (logit tolerances cannot see either).
    (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert str(scan.outvars[0].aval.dtype) == "bfloat16" and scan.outvars[0].aval.shape == (2, 8, 64)
    head = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"][-1]
    assert str(head.outvars[0].aval.dtype) == "float32" and head.outvars[0].aval.shape[-1] == 128


def test_bf16_norm_scale_gradient_sums_the_tokens_in_float32():
    """The RMSNorm scale's gradient under bf16 activations is a sum over every token of the batch: summed in
    float32 and rounded once, as transformers' bf16 model does (torch reduces bf16 in float32): off float64 by 0.0015
    of the largest entry (bound 2^-8 = 0.0039); 0.015 when the 2,048 terms were summed in bf16."""
    cfg = MistralConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, state = nnx.split(RMSNorm(cfg))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 1024, 16)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.bfloat16)
    _, vjp = jax.vjp(lambda s: nnx.merge(graphdef, s)(x), state)
    got = np.asarray(jax.jit(vjp)(g)[0]["scale"][...], np.float64)
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    normed = np.asarray(jnp.asarray(normed, jnp.float32).astype(jnp.bfloat16), np.float64)  # as HF casts it
    want = (np.asarray(g, np.float64) * normed).sum((0, 1))
    assert np.abs(got - want).max() <= 2.0 ** -8 * np.abs(want).max()
    # What the backward pass keeps of the norm (all of it under remat "none"): activations in the compute dtype,
    # not float32 copies of them (twice a layer's hidden states in bytes, twice a layer).
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    kept = saved_residuals(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert all(a.dtype == jnp.bfloat16 for a, _ in kept if a.shape == x.shape), kept


def test_splash_option_honours_window_segments_and_padding(pair):
    """attention_impl="splash" (Pallas splash attention, in interpret mode on CPU) gives the einsum path's logits
    with the sliding window, packed segments and left padding. The kernels themselves: tests/test_attention.py."""
    _, model, path = pair
    splash_model = load_model(path, jnp.float32, attention_impl="splash")
    rng = np.random.default_rng(4)
    ids = jnp.asarray(_random_ids(rng, 2, 128))  # splash takes multiples of 128 positions
    segments = jnp.asarray([[1] * 50 + [2] * 78, [1] * 128], jnp.int32)
    mask = jnp.asarray([[1] * 128, [0] * 4 + [1] * 124], jnp.int32)
    for kwargs in [{}, {"segment_ids": segments}, {"attention_mask": mask}]:
        np.testing.assert_allclose(np.asarray(splash_model(ids, **kwargs)), np.asarray(model(ids, **kwargs)),
                                   atol=TOL)


def test_every_remat_name_the_config_accepts_has_a_policy():
    from zephyr_jax.model.config import REMAT_POLICIES
    from zephyr_jax.model.mistral import remat_policy

    assert all(callable(remat_policy(name)) for name in REMAT_POLICIES if name != "none")


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_all_but_mlp"])
def test_remat_gives_same_loss_and_gradients(pair, policy):
    from flax import nnx

    _, model, path = pair
    remat_model = load_model(path, jnp.float32, remat=policy)
    ids = jnp.asarray(_random_ids(np.random.default_rng(6), 2, 12))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids), axis=-1))

    g_plain = nnx.grad(loss)(model)
    g_remat = nnx.grad(loss)(remat_model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_plain, g_remat)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_match_transformers_logits(pair, side):
    """Per-sequence summed log-probs from our logits (chunked) equal torch's log_softmax over transformers'
    logits on the same tokens and masks, for padded batches."""
    import torch

    from zephyr_jax.losses import sequence_logps

    tm, model, _ = pair
    ids, mask = _padded(np.random.default_rng(8), [16, 9], side)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss_mask = mask[:, 1:] * mask[:, :-1]
    loss_mask[:, :3] = 0  # a "prompt" that is not scored
    ours = sequence_logps(model(jnp.asarray(inputs), attention_mask=jnp.asarray(mask[:, :-1])),
                          jnp.asarray(targets), jnp.asarray(loss_mask), chunk_size=4)
    ref_logits = torch.as_tensor(torch_logits(tm, inputs, attention_mask=mask[:, :-1],
                                              position_ids=positions_from_mask(mask[:, :-1])))
    token = torch.log_softmax(ref_logits.double(), -1).gather(-1, torch.as_tensor(targets).long()[..., None])[..., 0]
    ref = (token * torch.as_tensor(loss_mask)).sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)


def test_scanned_layers_give_the_unrolled_models_and_transformers_gradients(pair):
    """The layers run under one lax.scan; scan_layers=False unrolls it. Both give the same logits and gradients,
    and the gradients of a next-token loss equal PyTorch autograd's through transformers' model."""
    import torch
    from flax import nnx

    tm, model, path = pair
    unrolled = load_model(path, jnp.float32, scan_layers=False)
    ids = _random_ids(np.random.default_rng(9), 2, 13)

    def loss(m):
        logps = jax.nn.log_softmax(m(jnp.asarray(ids[:, :-1])), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logps, jnp.asarray(ids[:, 1:, None]), axis=-1))

    np.testing.assert_allclose(unrolled(jnp.asarray(ids)), model(jnp.asarray(ids)), rtol=0, atol=1e-6)
    grads, unrolled_grads = nnx.grad(loss)(model), nnx.grad(loss)(unrolled)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, unrolled_grads)

    tm.zero_grad()
    out = tm(input_ids=torch.as_tensor(ids[:, :-1]).long()).logits.double()
    ref = -torch.log_softmax(out, -1).gather(-1, torch.as_tensor(ids[:, 1:, None]).long()).mean()
    ref.backward()
    last, layers = tm.config.num_hidden_layers - 1, tm.model.layers
    for ours, theirs in [(grads.embed_tokens[...], tm.model.embed_tokens.weight.grad),
                         (grads.layers.self_attn.q_proj.kernel[...][last], layers[last].self_attn.q_proj.weight.grad.T),
                         (grads.layers.mlp.down_proj.kernel[...][0], layers[0].mlp.down_proj.weight.grad.T),
                         (grads.lm_head.kernel[...], tm.lm_head.weight.grad.T)]:
        theirs = theirs.detach().numpy()
        assert np.abs(theirs).max() > 0
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
