"""MuonClip's Muon update against a float64 NumPy reference; the per-layer loop equals the batched update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import k2jax
from k2jax.model.params import state_path
from conftest import TINY_RUN
from k2jax.train.optim import NS_COEFFS, OptimConfig, make_optimizer
from k2jax.train.step import Trainer

LR, WD, MU = 0.02, 0.1, 0.95


def _ns64(x, steps=5, eps=1e-7):
    """Quintic Newton-Schulz of one 2-D matrix in float64 (Muon's coefficients)."""
    a, b, c = NS_COEFFS
    transpose = x.shape[0] > x.shape[1]
    x = x.T if transpose else x
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        xx = x @ x.T
        x = a * x + (b * xx + c * xx @ xx) @ x
    return x.T if transpose else x


def _ortho64(x):
    return _ns64(x) * 0.2 * np.sqrt(max(x.shape))


def _muon_direction64(name, m, kv_lora_rank, split="whole"):
    """The reference Muon direction of one layer's (or one expert's) parameter, matrix by matrix."""
    if name == "kv_a" and split == "per_head":  # [d, latent + rope]: the latent and the rope key apart
        return np.concatenate([_ortho64(m[:, :kv_lora_rank]), _ortho64(m[:, kv_lora_rank:])], axis=1)
    if name in ("q_b", "kv_b") and split == "per_head":  # [in, heads, out]: one matrix per head
        return np.stack([_ortho64(m[:, h]) for h in range(m.shape[1])], axis=1)
    if name in ("q_b", "kv_b"):  # one [in, heads·out] matrix (K2's recipe)
        return _ortho64(m.reshape(m.shape[0], -1)).reshape(m.shape)
    if name == "o":  # [heads, v, d]: one [heads*v, d] matrix
        return _ortho64(m.reshape(-1, m.shape[-1])).reshape(m.shape)
    if m.ndim == 3:  # experts [E, in, out]
        return np.stack([_ortho64(e) for e in m])
    return _ortho64(m)


def _flat(tree):
    return {state_path(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("split", ["whole", "per_head"])
def test_muon_matches_float64_numpy_and_the_layer_loop_equals_the_batched_update(tiny_config, split):
    """Two MuonClip steps (momentum carried) on random params and grads: every Muon-updated matrix equals a
    float64 NumPy Muon built matrix by matrix (by default each weight matrix whole, as K2's recipe; with
    muon_split=per_head q_b/kv_b per head and kv_a split), experts batched, and the in-place per-layer loop gives
    the batched update's params and momentum. The other split's reference is told apart (positive control)."""
    mesh = k2jax.make_mesh("", devices=jax.devices()[:1])
    # grad_clip left at its default: K2's MuonClip recipe clips no gradient (the NumPy reference has none; with a
    # clip at 1.0 this comparison fails, the gradients' global norms being ~1.6e3 and ~16)
    o = OptimConfig(learning_rate=LR, schedule="constant", warmup_steps=0, weight_decay=WD, muon_momentum=MU,
                    **({} if split == "whole" else {"muon_split": split}))
    assert o.clip == 0.0 and OptimConfig(optimizer="adamw").clip == 1.0
    trainer = Trainer(tiny_config, o, mesh, execution=TINY_RUN)
    rng = np.random.default_rng(0)
    rand = lambda t: jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), t)  # noqa: E731
    params = rand(trainer.abstract_params)
    # the second step's gradients 100x smaller: a global-norm clip would rescale the two steps differently and move
    # the momentum's direction
    grads = [rand(trainer.abstract_params), jax.tree.map(lambda g: 0.01 * g, rand(trainer.abstract_params))]

    def run(tx):
        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for g in grads:
            p, s = step(p, s, g)
        return p, s

    looped = run(trainer.tx)  # the Trainer of a scanned model loops over layers
    batched = run(make_optimizer(o, trainer.abstract_params, tiny_config.kv_lora_rank, layer_loop=False))
    for a, b in zip(jax.tree.leaves(looped), jax.tree.leaves(batched)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    checked = set()
    new, g1s, g2s = _flat(looped[0]), _flat(grads[0]), _flat(grads[1])
    for path, p in _flat(params).items():
        if path[-1] in ("embed", "lm_head", "scale") or p.ndim < 2:
            continue  # AdamW
        g1, g2 = g1s[path], g2s[path]
        m = MU * g1 + g2
        stacked = path[0] in ("dense_layers", "moe_layers")
        def reference(mode, p=p):
            for step_m in (g1, m):  # the first step's direction uses M = G1, the second M = mu·G1 + G2
                d = np.stack([_muon_direction64(path[-1], ml, tiny_config.kv_lora_rank, mode) for ml in step_m]) \
                    if stacked else _muon_direction64(path[-1], step_m, tiny_config.kv_lora_rank, mode)
                p = p - LR * (d + WD * p)
            return p

        p = reference(split)
        np.testing.assert_allclose(new[path], p, rtol=0, atol=2e-5 * np.abs(p).max(), err_msg=str(path))
        if path[-1] in ("q_b", "kv_b", "kv_a"):
            other = reference("per_head" if split == "whole" else "whole")
            assert np.abs(new[path] - other).max() > 1e-3 * np.abs(p).max(), path
        checked.add(path[-1])
    assert {"q_a", "q_b", "kv_a", "kv_b", "o", "wg", "wu", "wd", "router", "gate", "up", "down"} <= checked


def test_optimizer_groups_come_from_the_parameter_declarations(tiny_config):
    """Every parameter's optimizer group is its declaration's (k2jax.model.params), and a parameter without one
    (a renamed lm_head, say) is refused by name instead of silently landing in another group."""
    from flax import nnx

    from k2jax.model.params import spec_of
    from k2jax.train.optim import labels

    mesh = k2jax.make_mesh("", devices=jax.devices()[:1])
    params = Trainer(tiny_config, OptimConfig(), mesh, execution=TINY_RUN).abstract_params
    groups = {state_path(k): g for k, g in jax.tree_util.tree_flatten_with_path(labels(params))[0]}
    assert groups == {path: spec_of(path).group for path in groups} and len(groups) == len(jax.tree.leaves(params))
    want = {("embed",): "adam", ("lm_head",): "adam", ("final_norm", "scale"): "adam_nodecay",
            ("moe_layers", "attn", "q_b"): "muon", ("moe_layers", "mlp", "router"): "muon",
            ("moe_layers", "mlp", "wg"): "muon", ("dense_layers", "attn_norm", "scale"): "adam_nodecay"}
    assert {p: groups[p] for p in want} == want
    renamed = nnx.State({"lm_head2": nnx.Param(jnp.zeros((4, 4)))})
    with pytest.raises(KeyError, match="lm_head2 has no declaration"):
        labels(renamed)


def _wsd64(step, o):
    """The warm-up-stable-decay learning rate, written out: linear warm-up to the peak, constant, then a cosine
    to the minimum over the last `decay_steps`."""
    if step < o.warmup_steps:
        return o.learning_rate * (step + 1) / o.warmup_steps
    start = o.total_steps - o.decay_steps
    frac = min(max((step - start) / o.decay_steps, 0.0), 1.0)
    return o.min_learning_rate + 0.5 * (o.learning_rate - o.min_learning_rate) * (1 + np.cos(np.pi * frac))


def test_adamw_with_schedule_clipping_and_decay_mask_matches_float64_numpy(tiny_config):
    """Six AdamW steps through warm-up, the stable phase and the decay, with gradients large enough to be clipped:
    every parameter equals a float64 NumPy AdamW (global-norm clipping, bias correction, the WSD rate, weight decay
    on the `adam`/`muon` groups only, not on norms); and a decay applied to the norms too is caught."""
    from k2jax.model.params import spec_of

    mesh = k2jax.make_mesh("", devices=jax.devices()[:1])
    o = OptimConfig(optimizer="adamw", learning_rate=3e-2, min_learning_rate=3e-3, warmup_steps=2, decay_steps=3,
                    total_steps=6, weight_decay=0.1, grad_clip=0.5, b1=0.9, b2=0.95, eps=1e-8)
    trainer = Trainer(tiny_config, o, mesh, execution=TINY_RUN)
    rng = np.random.default_rng(3)
    rand = lambda t: jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), t)  # noqa: E731
    params, grads = rand(trainer.abstract_params), [rand(trainer.abstract_params) for _ in range(6)]

    @jax.jit
    def step(p, s, g):
        u, s = trainer.tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, trainer.tx.init(params)
    for g in grads:
        p, s = step(p, s, g)
    got = _flat(p)

    def numpy_adamw(decay_norms=False):
        p = _flat(params)
        m = {k: np.zeros_like(v) for k, v in p.items()}
        v = {k: np.zeros_like(x) for k, x in p.items()}
        for t, g in enumerate(grads):
            g = _flat(g)
            norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
            lr = _wsd64(t, o)
            for k in p:
                gk = g[k] * min(1.0, o.grad_clip / norm)
                m[k] = o.b1 * m[k] + (1 - o.b1) * gk
                v[k] = o.b2 * v[k] + (1 - o.b2) * gk ** 2
                mh, vh = m[k] / (1 - o.b1 ** (t + 1)), v[k] / (1 - o.b2 ** (t + 1))
                wd = o.weight_decay if spec_of(k).group != "adam_nodecay" or decay_norms else 0.0
                p[k] = p[k] - lr * (mh / (np.sqrt(vh) + o.eps) + wd * p[k])
        return p

    want = numpy_adamw()
    assert any(spec_of(k).group == "adam_nodecay" for k in want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5 * max(np.abs(want[k]).max(), 1.0),
                                   err_msg=str(k))
    wrong = numpy_adamw(decay_norms=True)  # positive control
    assert max(np.abs(got[k] - wrong[k]).max() for k in want if spec_of(k).group == "adam_nodecay") > 1e-4


def test_the_schedule_ends_at_a_tenth_of_whichever_peak_was_given_and_never_rises_past_it():
    """min_learning_rate unset follows the peak (a tenth of it, for any learning_rate given); a minimum above the
    peak, or below zero, is refused naming both fields; --lr's default is OptimConfig's."""
    from k2jax.cli import train as train_cli
    from k2jax.errors import ConfigError
    from k2jax.model.config import override
    from k2jax.train.optim import make_schedule

    for peak in (1e-5, 3e-3, 0.5):
        o = override(OptimConfig(learning_rate=3e-3, warmup_steps=3, total_steps=20), {"learning_rate": str(peak)})
        lrs = np.asarray([float(make_schedule(o)(s)) for s in range(25)])
        assert lrs.max() == pytest.approx(peak, rel=1e-6) and lrs[-1] == pytest.approx(peak / 10, rel=1e-6), lrs
        assert np.all(np.diff(lrs[3:]) <= 1e-12 * peak)  # after the warm-up it only falls
    # positive control: the minimum the CLI used to fix from --lr's default under `--opt learning_rate=1e-5`
    # (bypassing the check) makes the schedule decay upwards, which the check refuses
    bad = OptimConfig(learning_rate=1e-5, warmup_steps=3, total_steps=20)
    object.__setattr__(bad, "min_learning_rate", 3e-4)
    assert float(make_schedule(bad)(19)) > 1e-4
    with pytest.raises(ConfigError, match=r"min_learning_rate \(0.0003\) .* learning_rate \(1e-05\)"):
        OptimConfig(learning_rate=1e-5, min_learning_rate=3e-4)
    with pytest.raises(ConfigError, match="min_learning_rate"):
        OptimConfig(min_learning_rate=-1.0)
    assert train_cli.FLAGS["lr"].default == OptimConfig.learning_rate
