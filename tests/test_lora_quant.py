"""LoRA over a quantised frozen base (int8 per output channel, fp8 in 128x128 blocks): each kernel within its
quantisation step, the logits within the first-order bound, and adapters that still learn."""

import jax
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.model.layers.lora import LoraConfig

from test_lora import _trainer, base_state  # noqa: F401 - base_state is a fixture used here


def _subset_batch(config, trainer, rows, seed):
    """Rows drawn from a fixed set of 16 token ids (the same set for training and held-out rows): a distribution
    adapters can learn, which held-out rows share."""
    vocab = np.random.default_rng(1234).choice(config.vocab_size, 16, replace=False)
    tokens = vocab[np.random.default_rng(seed).integers(0, 16, (rows, 32))].astype(np.int32)
    return {"tokens": jax.device_put(tokens, trainer.batch_sharding)}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantised_base_stays_within_its_quantisation_bound_and_lora_learns_on_it(tiny_config, base_state, kind):
    """The base held as int8 (per output channel) or fp8 (128x128 blocks): each kernel's error is within half its
    quantisation step; the logits' error, relative to their spread, is within the first-order bound
    sum_k ||dW_k|| / ||W_k|| over the quantised kernels (pre-norm residual blocks propagate each kernel's relative
    error at most once into the stream); and LoRA steps on that base lower the held-out loss."""
    from k2jax.model.quant import QArray

    graphdef, base = base_state
    mesh = k2jax.make_mesh("", devices=jax.devices()[:1])
    trainer = _trainer(tiny_config, mesh, LoraConfig(rank=8), base_quant=kind)
    state = trainer.init_state(model_state=base)
    eps = []
    for (path, qv), (_, v) in zip(nnx.to_flat_state(trainer.base), nnx.to_flat_state(base)):
        q, w = qv.get_value(), np.asarray(v.get_value(), np.float64)
        if not isinstance(q, QArray):
            assert np.array_equal(np.asarray(q), w), path  # the rest kept as it was (float32 here)
            continue
        err = np.abs(np.asarray(q.dequantize(), np.float64) - w)
        if kind == "int8":  # rounding to the nearest step: at most half a step per element
            assert (err <= np.asarray(q.scale) / 2 * (1 + 1e-5) + 1e-12).all(), path
        else:  # e4m3 has 3 mantissa bits: relative error at most 2^-4, or half the subnormal step
            sub = np.repeat(np.repeat(np.asarray(q.scale), 128, -2), 128, -1)
            assert err.max() <= max(2.0 ** -4 * np.abs(w).max(), 2.0 ** -10 * sub.max()), path
        eps.append(float(np.linalg.norm(err) / np.linalg.norm(w)))
    bound = sum(eps)
    tokens = np.random.default_rng(1).integers(0, tiny_config.vocab_size, (2, 32)).astype(np.int32)
    ref = np.asarray(nnx.merge(graphdef, base)(tokens), np.float64)
    got = np.asarray(nnx.merge(trainer.graphdef, state.params, state.bias, trainer.base)(tokens), np.float64)
    rel = np.sqrt(np.mean((got - ref) ** 2)) / np.std(ref)
    assert 0 < rel <= bound < 1, (rel, bound, len(eps))
    # positive control: a dequantisation with the scales doubled (an exponent off by one) breaks the bound
    off = jax.tree.map(lambda x: x, trainer.base, is_leaf=lambda x: isinstance(x, QArray))
    for _, v in nnx.to_flat_state(off):
        if isinstance(v.get_value(), QArray):
            v.set_value(QArray(v.get_value().q, v.get_value().scale * 2.0, v.get_value().n_in, v.get_value().n_out,
                               kind))
    bad = np.asarray(nnx.merge(trainer.graphdef, state.params, state.bias, off)(tokens), np.float64)
    assert np.sqrt(np.mean((bad - ref) ** 2)) / np.std(ref) > bound
    held = [_subset_batch(tiny_config, trainer, 8, 100)]
    before = trainer.evaluate(state, held)["eval_loss"]
    for step in range(12):
        state, _ = trainer.step(state, _subset_batch(tiny_config, trainer, 8, step))
    after = trainer.evaluate(state, held)["eval_loss"]
    assert after < before - 0.5, (before, after)
    n_q = sum(isinstance(v.get_value(), QArray) for _, v in nnx.to_flat_state(trainer.base))
    assert n_q == len(eps) > 0
