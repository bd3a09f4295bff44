"""Padding-free batches: packed rows give the numbers of padded rows, and both give the full-head reference's.

The reference is the plain path nobody optimised: the model's full logits for each sequence in a row of its own
(model(...) and losses.sequence_logps / losses.sft_loss), then losses.dpo_loss. The train step's path packs
sequences into shared rows (segments), applies the LM head only at loss positions (logprobs.head_logps) and puts
pairs back together from per-segment sums.
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from zephyr_jax import losses, train_steps
from zephyr_jax.data import pack, pack_pairs, pad_sft
from zephyr_jax.data.batches import (PackedRow, best_fit_decreasing, loss_count, loss_positions, multiples, pack_rows,
                                     pair_sequence_lengths, plan_length, plan_pairs, preference_rows,
                                     stack_rows)
from zephyr_jax.data.loader import pair_batcher
from zephyr_jax.data.preference import PreferenceExample
from zephyr_jax.data.sft import SFTExample
from zephyr_jax.model import Mistral, MistralConfig

CFG = MistralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=24)
DPO = ml_collections.ConfigDict(dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference_free=False))


def random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, CFG.vocab_size, k).astype(np.int32)
    return [PreferenceExample(np.concatenate([[1], ids(rng.integers(2, 20))]).astype(np.int32),
                              ids(rng.integers(1, 30)), ids(rng.integers(1, 30)), False) for _ in range(n)]


def random_sft(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.concatenate([[1], rng.integers(3, CFG.vocab_size, rng.integers(4, 40))]).astype(np.int32)
        mask = np.arange(len(ids)) >= rng.integers(1, len(ids) - 1)  # a prompt without loss, then the reply
        out.append(SFTExample(ids, mask, False))
    return out


def with_loss_positions(batch):
    batch["loss_positions"] = loss_positions(batch["loss_mask"], batch["loss_mask"].shape[1])
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def model():
    return nnx.split(Mistral(CFG, rngs=nnx.Rngs(0)))


def reference_pair_logps(graphdef, params, pairs):
    """[B, 2] log pi(y|x) from full logits, each sequence in a row of its own, right-padded to 64."""
    rows = [(ex.prompt, completion) for ex in pairs for completion in (ex.chosen, ex.rejected)]
    ids, mask, real = (np.zeros((len(rows), 65), np.int32) for _ in range(3))
    for r, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        ids[r, :n] = np.concatenate([prompt, completion])
        mask[r, len(prompt):n] = 1  # targets[t] = ids[t + 1]: the completion's tokens
        real[r, :n] = 1
    logits = nnx.merge(graphdef, params)(jnp.asarray(ids[:, :-1]), attention_mask=jnp.asarray(real[:, :-1]))
    logps = losses.sequence_logps(logits, jnp.asarray(ids[:, 1:]), jnp.asarray(mask[:, 1:]))
    return np.asarray(logps).reshape(len(pairs), 2)


def dpo_value_and_grad(graphdef, params, reference, batch, num_pairs):
    fn = lambda p: train_steps.dpo_loss_fn(p, graphdef, batch, reference, DPO, num_pairs, 1)
    return jax.value_and_grad(fn, has_aux=True)(params)


def test_packed_dpo_batch_gives_the_padded_batch_and_the_full_head_reference(model):
    graphdef, params = model
    pairs = random_pairs(8)
    reference = jnp.asarray(np.random.default_rng(1).normal(-60, 5, (8, 2)), jnp.float32)
    padded = with_loss_positions(pack_pairs(pairs, 16, (64,)))  # a row per sequence
    packed = with_loss_positions(pack_pairs(pairs, 2, multiples(16, 512)))  # eight sequences a row
    assert padded["inputs"].shape == (16, 64) and packed["inputs"].shape[0] == 2
    assert packed["inputs"].size < 0.7 * padded["inputs"].size

    want = reference_pair_logps(graphdef, params, pairs)
    for batch in (padded, packed):
        np.testing.assert_allclose(train_steps.pair_logps(graphdef, params, batch, 8)[0], want, rtol=1e-5)
    (loss_a, metrics_a), grads_a = dpo_value_and_grad(graphdef, params, reference, padded, 8)
    (loss_b, metrics_b), grads_b = dpo_value_and_grad(graphdef, params, reference, packed, 8)
    ref_loss, ref_metrics = losses.dpo_loss(want[:, 0], want[:, 1], reference[:, 0], reference[:, 1], beta=0.1)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    np.testing.assert_allclose(loss_b, ref_loss, rtol=1e-5)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics_b[k], metrics_a[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics_b[k], ref_metrics[k], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_b, grads_a)

    # An eval split smaller than train.eval_batch_size goes in one batch of its own pairs (32 filled 24 with
    # repeats, in twice the rows), through the eval function made for 32: the same log-probs
    from zephyr_jax import train
    from zephyr_jax.sharding import DEFAULT_RULES, rules_table

    cfg = ml_collections.ConfigDict({"stage": "dpo", "train": {"eval_batch_size": 32, "global_batch_size": 8,
                                                               "progress": False},
                                     "data": {"packing": True, "packed_rows": 0, "max_length": 64, "buckets": ()},
                                     "mesh": {"rules": dict(rules_table(DEFAULT_RULES))}})
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), (jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    assert train.eval_size(cfg, mesh, len(pairs)) == 8 and train.eval_size(cfg, mesh, 40) == 32
    with jax.set_mesh(mesh):
        got = train.run_eval(cfg, train_steps.make_eval_fn("dpo", graphdef, 32), params, pairs,
                             train.batch_sharding(mesh, DEFAULT_RULES))["logps"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # and one made for fewer pairs than a batch holds refuses it before the call (its segment_sum dropped the
    # pairs past them: 4 pairs' log-probs came back for 8)
    with pytest.raises(ValueError, match=r"an eval batch of 8 pairs for an eval function made for 4 \(make_eval_fn"):
        train_steps.run_eval_batches(train_steps.make_eval_fn("dpo", graphdef, 4), params, iter([(packed, 8)]),
                                     lambda b: b)
    eight_shards = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 1})
    assert train.eval_size(cfg, eight_shards, 3) == 3  # packed: rows rounded up to the shards, not pairs
    cfg.data.packing = False  # a row per sequence: 2 x 3 pairs rounded up to 8 rows, 4 pairs
    assert train.eval_size(cfg, eight_shards, 3) == 4 and train.eval_size(cfg, eight_shards, 5) == 8

    # IPO divides each completion's log-prob by its length: the train step's and the eval's per-pair lengths are
    # the completions' own, each on its own side of the pair.
    ipo = ml_collections.ConfigDict({**DPO.to_dict(), "loss_type": "ipo"})
    lengths = np.array([[len(ex.chosen), len(ex.rejected)] for ex in pairs], np.float32)
    assert (lengths[:, 0] != lengths[:, 1]).any()
    ref_loss, ref_metrics = losses.dpo_loss(want[:, 0], want[:, 1], reference[:, 0], reference[:, 1], beta=0.1,
                                            loss_type="ipo", chosen_lengths=lengths[:, 0],
                                            rejected_lengths=lengths[:, 1])
    for batch in (packed,):  # (the padded batch's log-probs equal the packed one's, above)
        policy, pair_lengths = train_steps.pair_logps(graphdef, params, batch, 8)
        np.testing.assert_array_equal(pair_lengths, lengths)
        loss, _ = train_steps.dpo_loss_fn(params, graphdef, batch, reference, ipo, 8, 1)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        metrics = train_steps.dpo_eval_metrics(np.asarray(policy), np.asarray(reference), np.asarray(pair_lengths),
                                               ipo)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_dpo_pairs_of_a_micro_batch_stay_in_its_rows():
    pairs = random_pairs(8, seed=2)
    batch = pack_pairs(pairs, 4, multiples(16, 512), micro_batches=2)
    for row in range(4):  # split_micro gives rows m, m + 2 to micro-batch m; they must hold pairs m, m + 2, ...
        held = batch["sequence_pair"][row][batch["sequence_pair"][row] >= 0] // 2
        assert set(held % 2) <= {row % 2}
    assert sorted(batch["sequence_pair"][batch["sequence_pair"] >= 0].tolist()) == list(range(16))
    # Precomputed reference log-probs come back to their own pair and side, whole and per micro-batch.
    reference = -np.arange(1, 17, dtype=np.float32).reshape(8, 2)
    with_reference = pack_pairs([ex._replace(reference=r) for ex, r in zip(pairs, reference)], 4,
                                multiples(16, 512), micro_batches=2)
    np.testing.assert_array_equal(train_steps.per_pair(with_reference["reference_logps"],
                                                       with_reference["sequence_pair"], 8), reference)
    micro = train_steps.split_micro({k: with_reference[k] for k in ("reference_logps", "sequence_pair")}, 2)
    for m in range(2):
        np.testing.assert_array_equal(train_steps.per_pair(micro["reference_logps"][m], micro["sequence_pair"][m],
                                                           4, 2), reference[m::2])
    # Processes holding interleaved rows (as on a pod) build exactly those rows of the whole global batch: its
    # length and loss width, not their own rows' (micro-batch 1, rows 1 and 3, holds only short pairs here).
    uneven = [ex if p % 2 == 0 else ex._replace(prompt=ex.prompt[:2], chosen=ex.chosen[:1], rejected=ex.rejected[:1])
              for p, ex in enumerate(pairs)]
    batcher = pair_batcher(4, multiples(16, 512), micro_batches=2)
    whole = batcher(uneven)[0]
    for rows in ([0, 2], [1, 3]):
        part = batcher(uneven, rows)[0]
        for key in whole:
            np.testing.assert_array_equal(part[key], whole[key][rows], err_msg=key)
    # A row planned longer than the batch: named before it is placed (numpy's broadcast error named no row).
    plan = plan_pairs(pairs, 4, multiples(16, 512), micro_batches=2)
    short = plan_length(pairs, plan) - 1
    fullest = max(range(4), key=lambda r: sum(pair_sequence_lengths(pairs[p])[s] for p, s in plan[r]))
    with pytest.raises(ValueError, match=f"row {fullest} needs {short + 1} positions, more than the batch length "
                                         f"{short}"):
        preference_rows(pairs, plan, short, 16)


def test_segment_sums_are_exact_additions_not_a_matmul():
    """A one-hot matmul here rounded each log-prob to bfloat16 on TPUs (TF32 on GPUs) at default precision; CPUs
    compute it exactly, so the test also reads the program: it must hold no dot."""
    rng = np.random.default_rng(0)
    values = -rng.random((3, 40)).astype(np.float32) * 7
    segment = np.sort(rng.integers(0, 4, size=(3, 40)), axis=1).astype(np.int32)
    sums = jax.jit(train_steps.segment_sums, static_argnums=2)
    want = np.stack([[values[r][segment[r] == s].sum() for s in (1, 2, 3)] for r in range(3)])
    np.testing.assert_allclose(sums(values, segment, 3), want, rtol=1e-6)
    assert "dot_general" not in sums.lower(values, segment, 3).as_text()


def test_max_segments_is_the_most_a_packed_row_holds_rounded_up_and_describes_every_row():
    """The static bound the GPU kernel gets: from the rows themselves, not half the row length (which made cuDNN's
    call and statistics hundreds of times larger than packed rows need)."""
    from zephyr_jax import train
    from zephyr_jax.model.attention import segment_offsets

    examples = random_sft(12)
    rows = pack(examples, 96)
    most = int(rows["segment_ids"].max())
    cfg = lambda stage, packing: ml_collections.ConfigDict({"stage": stage, "data": {"packing": packing}})
    bound = train.max_segments(cfg("sft", True), pack_rows(examples, 96))  # the loader's rows, as training has them
    assert bound == train.max_segments(cfg("sft", True), [rows])  # a batch's arrays (plan, bench)
    assert 2 <= most <= bound < 2 * most and bound & (bound - 1) == 0 and bound < 96 // 2
    assert np.asarray(segment_offsets(jnp.asarray(rows["segment_ids"]), bound)[2]).all()  # every row described
    assert not np.asarray(segment_offsets(jnp.asarray(rows["segment_ids"]), most - 1)[2]).all()
    assert train.max_segments(cfg("sft", False), []) == 1 and train.max_segments(cfg("dpo", True), []) is None


def test_packed_sft_rows_refer_to_their_examples_and_build_the_batches_arrays_did():
    """The loader's packed dSFT rows hold references to the examples, not arrays (20 bytes a position for the whole
    split: 5.7 GiB a process at UltraChat-200k size): its batches, sequence lengths and digest (saved with every
    checkpoint) are those of the rows as arrays."""
    from zephyr_jax import train
    from zephyr_jax.data.batches import sequence_lengths
    from zephyr_jax.data.loader import examples_digest

    examples = random_sft(40)
    cfg = ml_collections.ConfigDict({"stage": "sft", "seed": 3, "train": {"global_batch_size": 4},
                                     "data": {"packing": True, "max_length": 96, "pack_window": 16,
                                              "buckets": (32, 64, 96)}})
    rows, batcher, _ = train.training_batches(cfg, None, examples, log=lambda _: None)
    assert all(isinstance(r, PackedRow) and not any(isinstance(x, np.ndarray) for x in r) for r in rows)
    held = {id(e) for e in examples}
    assert all(id(e) in held for r in rows for e in r.examples)  # the examples themselves, not copies
    arrays = pack([examples[i] for i in np.random.default_rng(3).permutation(40)], 96, 16)  # the rows as arrays
    as_dicts = [{k: v[i] for k, v in arrays.items()} for i in range(len(rows))]
    assert len(rows) == len(arrays["inputs"]) and examples_digest(rows) == examples_digest(as_dicts)
    batch, length, _ = batcher(rows[4:8], [1, 3])
    mask = arrays.pop("loss_mask")[[5, 7]]  # listed as loss_positions; the devices get no mask
    assert length == 96 and set(batch) == set(arrays) | {"loss_positions"}
    assert all((batch[k] == arrays[k][[5, 7]]).all() for k in arrays)
    assert (batch["loss_positions"] == loss_positions(mask, batch["loss_positions"].shape[1])).all()
    for r, d in zip(rows, as_dicts):
        ids = d["segment_ids"]
        assert sequence_lengths(r) == np.bincount(ids[ids > 0]).tolist()[1:]


def test_packed_sft_eval_gives_the_unpacked_evals_metrics_on_fewer_positions(model):
    """The dSFT eval packs the held-out split as training packs its rows (it padded an example a row to a power of
    two): the same loss, token accuracy and token count as the unpacked eval."""
    from zephyr_jax import train
    from zephyr_jax.sharding import DEFAULT_RULES, rules_table

    graphdef, params = model
    examples = random_sft(30)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), (jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    sharding = train.batch_sharding(mesh, DEFAULT_RULES)
    metrics, positions = {}, {}
    for packing in (False, True):
        cfg = ml_collections.ConfigDict({"stage": "sft", "train": {"eval_batch_size": 4, "progress": False},
                                         "data": {"packing": packing, "max_length": 96, "pack_window": 1000,
                                                  "buckets": ()}, "mesh": {"rules": dict(rules_table(DEFAULT_RULES))}})
        split = train.eval_split(cfg, examples, log=lambda _: None)
        batcher, _ = train.eval_batcher(cfg, mesh)
        positions[packing] = sum(b["inputs"].size for b, _ in train.eval_batches(split, 4, batcher))
        eval_fn = train_steps.make_eval_fn("sft", graphdef, 4, train.max_segments(cfg, split))
        metrics[packing] = train.eval_metrics(cfg, eval_fn, params, split, None, sharding)
    assert all(isinstance(r, PackedRow) for r in split) and len(split) < len(examples) // 3
    assert metrics[True]["num_tokens"] == metrics[False]["num_tokens"] == sum(int(e.loss_mask[1:].sum())
                                                                             for e in examples)
    np.testing.assert_allclose(metrics[True]["loss"], metrics[False]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics[True]["token_accuracy"], metrics[False]["token_accuracy"], rtol=1e-6)
    assert positions[True] < positions[False] / 2
    # Both are the full logits' loss and token accuracy (float64 numpy; a few of the random model's guesses are right).
    padded = pad_sft(examples, 96)
    mask = padded["loss_mask"].astype(bool)
    logits = np.asarray(nnx.merge(graphdef, params)(padded["inputs"], positions=padded["positions"],
                                                    segment_ids=padded["segment_ids"]), np.float64)[mask]
    targets = padded["targets"][mask]
    top = logits.max(-1)
    nll = top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(len(targets)), targets]
    accuracy = np.mean(logits.argmax(-1) == targets)
    np.testing.assert_allclose(metrics[True]["loss"], nll.mean(), rtol=1e-5)
    assert 0 < accuracy < 0.5
    np.testing.assert_allclose(metrics[True]["token_accuracy"], accuracy, rtol=1e-6)
    # A split smaller than an eval batch: the fewest rows that hold it (it was filled to eval_batch_size with
    # repeats of its last row), the same metrics.
    big = ml_collections.ConfigDict(cfg.to_dict())
    big.train.eval_batch_size = 64
    assert train.eval_size(big, mesh, len(split)) == len(split) < 64 and train.eval_size(cfg, mesh, len(split)) == 4
    four_shards = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 1})  # 6 rows: one batch of 8
    assert train.eval_size(big, four_shards, 6) == 8 and train.eval_size(big, four_shards, 3) == 4
    np.testing.assert_allclose(train.eval_metrics(big, eval_fn, params, split, None, sharding)["loss"],
                               metrics[True]["loss"], rtol=1e-6)


def test_packed_sft_rows_give_the_padded_rows_and_the_full_head_reference(model):
    graphdef, params = model
    examples = random_sft(12)
    padded = with_loss_positions(pad_sft(examples, 64))
    packed = with_loss_positions(pack(examples, 96))
    assert packed["inputs"].shape[0] < 12
    # Each packed segment holds its example's padded row, positions restarting at 0, under an id of its own.
    for r, row in enumerate(pack_rows(examples, 96)):
        start, ids = 0, set()
        for ex in row.examples:
            i, n = next(k for k, e in enumerate(examples) if e is ex), len(ex.ids) - 1
            for key in ("inputs", "targets", "loss_mask", "positions"):
                np.testing.assert_array_equal(packed[key][r, start:start + n], padded[key][i, :n], err_msg=key)
            ids |= set(np.asarray(packed["segment_ids"][r, start:start + n]).tolist())
            start += n
        assert len(ids) == len(row.examples) and 0 not in ids
    normalizer = float(padded["loss_mask"].sum())
    assert normalizer == float(packed["loss_mask"].sum())
    grad = lambda b: jax.value_and_grad(train_steps.sft_loss_fn, has_aux=True)(params, graphdef, b, normalizer)
    (loss_a, metrics_a), grads_a = grad(padded)
    (loss_b, metrics_b), grads_b = grad(packed)
    m = nnx.merge(graphdef, params)
    ref_loss, ref_metrics = losses.sft_loss(m(padded["inputs"], positions=padded["positions"],
                                              segment_ids=padded["segment_ids"]),
                                            padded["targets"], padded["loss_mask"])
    np.testing.assert_allclose(loss_a, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    np.testing.assert_allclose(metrics_b["correct"], metrics_a["correct"])
    np.testing.assert_allclose(metrics_a["correct"] / metrics_a["num_tokens"], ref_metrics["token_accuracy"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_b, grads_a)
    # Targets the model's own argmax: every real loss token is right, and the -1 slots that fill loss_positions
    # (they read position 0) count for nothing (a random model's accuracy, near 0, could not show it).
    for b in (padded, packed):
        logits = m(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
        b = dict(b, targets=np.asarray(jnp.argmax(logits, -1), np.int32))
        assert (b["loss_positions"] < 0).any()
        _, metrics = train_steps.sft_loss_fn(params, graphdef, b, normalizer)
        assert float(metrics["correct"]) == float(metrics["num_tokens"]) == normalizer


def test_bin_packing_places_every_item_once_within_bounds():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 100, 500).tolist()
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 128
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1  # near the lower bound on this mix
    # DPO rows: the shortest bucket at which best-fit decreasing holds all 2B sequences in the given rows.
    pairs = random_pairs(64, seed=4)
    buckets = multiples(16, 1024)
    plan = plan_pairs(pairs, 16, buckets)
    assert sorted((p, side) for row in plan for p, side in row) == [(p, s) for p in range(64) for s in (0, 1)]
    length = plan_length(pairs, plan)
    seqs = [n for ex in pairs for n in (len(ex.prompt) + len(ex.chosen) - 1, len(ex.prompt) + len(ex.rejected) - 1)]
    assert length <= min(b for b in buckets if b >= max(seqs) and len(best_fit_decreasing(seqs, b)) <= 16)
    assert length >= sum(seqs) / 16  # the lower bound
    with pytest.raises(ValueError, match="does not fit a row of 128"):
        best_fit_decreasing([129], 128)
    # dSFT rows mix examples of one window of consecutive examples only (12 examples of 4 positions, rows of 16:
    # windows of 3 give 4 rows of 3 where one window would give 3 rows of 4).
    examples = [SFTExample(np.arange(1, 6, dtype=np.int32), np.ones(5, bool), False) for _ in range(12)]
    index = {id(ex): i for i, ex in enumerate(examples)}
    windowed = pack_rows(examples, 16, window=3)
    assert len(windowed) == 4 and all(len({index[id(ex)] // 3 for ex in row.examples}) == 1 for row in windowed)
    assert len(pack_rows(examples, 16)) == len(pack_rows(examples, 16, window=0)) == 3  # 0 / None: all at once


def test_dpo_batches_come_in_few_shapes():
    """Each (row length, loss width, segment slots) compiles the train step: the width takes one of four values a
    length from a quarter of it up (powers of two below, for rows of few loss tokens), and packed rows have a fixed
    slot count (a row per sequence: one)."""
    from zephyr_jax.data.batches import loss_width, multiples, slots_for

    buckets = multiples(128, 4096)
    widths = {loss_width(most, 1024, buckets) for most in range(1, 1025)}
    assert widths == {8, 16, 32, 64, 128, 256, 512, 768, 1024}
    assert loss_width(3, 256, buckets) == 8 and loss_width(65, 256, buckets) == 128  # not 128 for 3 loss tokens
    assert loss_width(300, 1152, buckets) == 384 and loss_width(200, 1152, buckets) == 256
    assert loss_width(1000, 1152, buckets) == 1152
    assert {slots_for([[0] * n, [1]]) for n in range(2, 17)} == {16} and slots_for([[0] * 17]) == 32
    assert slots_for([[0], [1]]) == 1


def test_a_sequence_that_fills_a_bucket_exactly_takes_that_bucket():
    """A pair whose chosen sequence is exactly 128 positions (64 prompt + 65 reply tokens, less the shifted last)
    packs into rows of 128, not 256 (twice the compute), and fits when 128 is the only bucket."""
    ids = lambda n: np.full(n, 5, np.int32)  # noqa: E731
    pairs = [PreferenceExample(ids(64), ids(65), ids(10), False)] + \
        [PreferenceExample(ids(10), ids(20), ids(20), False) for _ in range(3)]
    assert max(pair_sequence_lengths(pairs[0])) == 128
    for buckets in ((128, 256, 384), (128,)):
        assert pack_pairs(pairs, 4, buckets)["inputs"].shape == (4, 128)


def test_a_rows_loss_count_is_its_batch_rows_loss_positions():
    """loss_count sizes the loss-position arrays before the rows are built: it must count what the built row's
    loss mask holds, for an example padded alone and for a packed row (one fewer would refuse a batch whose
    fullest row sits at a width's edge)."""
    examples = random_sft(24, seed=5)
    for i, ex in enumerate(examples[:8]):
        examples[i] = ex._replace(loss_mask=np.ones_like(ex.loss_mask))  # every token learned: BOS's flag too
    padded = pad_sft(examples, 64)
    assert [loss_count(ex) for ex in examples] == padded["loss_mask"].sum(1).tolist()
    rows = pack_rows(examples, 128)
    assert len(rows) < len(examples)  # (several examples a row)
    assert [loss_count(row) for row in rows] == stack_rows(rows, 128)["loss_mask"].sum(1).tolist()


def test_the_last_eval_batch_is_filled_with_its_cheapest_example():
    """eval_batches fills its last batch to the compiled size with repeats whose outputs are dropped: repeats of
    the example that takes the fewest positions, not of whichever came last. Repeats of a long last pair made the
    recipe's last dDPO eval batch 57,754 positions on average (its 16 pairs and 48 repeats; 39,731 now)."""
    from zephyr_jax import train
    from zephyr_jax.data.loader import pair_batcher

    ids = lambda n: np.full(n, 5, np.int32)  # noqa: E731
    pairs = random_pairs(13, seed=3) + [PreferenceExample(ids(40), ids(80), ids(70), False)]  # a long last one
    batcher = pair_batcher(4, multiples(32, 1024))
    *_, (last, real) = train.eval_batches(pairs, 8, batcher)
    chunk = pairs[8:]
    assert real == len(chunk) == 6
    for filler in chunk:  # no other filler computes fewer positions
        assert last["inputs"].size <= batcher(chunk + [filler] * 2)[0]["inputs"].size
    assert last["inputs"].size < batcher(chunk + [chunk[-1]] * 2)[0]["inputs"].size
