"""Train step: gradients vs PyTorch autograd, accumulation, QK-Clip, bias balancing, falling loss on 1 and 8 devices."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.data.pipeline import make_dataset, open_source
from k2jax.model.params import RouterBias
from conftest import TINY_RUN
from k2jax.train.optim import OptimConfig, qk_clip
from k2jax.train.step import LossConfig, Trainer


def _batch(tokens, segs=None):
    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    return {"tokens": tokens, "segment_ids": np.ones((b, t), np.int32) if segs is None else segs,
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def _trainer(config, mesh_spec="", run=TINY_RUN, **optim):
    mesh = k2jax.make_mesh(mesh_spec, devices=None if mesh_spec else jax.devices()[:1])
    defaults = dict(learning_rate=1e-3, warmup_steps=1, total_steps=100)
    return Trainer(config, OptimConfig(**{**defaults, **optim}), mesh, loss=LossConfig(aux_loss_alpha=0.0),
                   execution=run)


def test_loss_and_grads_match_pytorch_autograd(hf_tiny, tiny_config):
    import torch

    folder, torch_model = hf_tiny
    model = k2jax.load_hf(folder)
    tokens = np.random.default_rng(5).integers(0, tiny_config.vocab_size, (2, 48)).astype(np.int32)
    trainer = _trainer(tiny_config)
    _, params, bias = nnx.split(model.module, nnx.Param, RouterBias)
    (loss, _), grads = jax.value_and_grad(
        lambda p: (lambda r: (r[0] / r[2]["tokens"], r))(trainer.loss_fn(p, bias, _batch(tokens))), has_aux=True)(params)
    torch_model.zero_grad()
    ids = torch.from_numpy(tokens.astype(np.int64))
    out = torch_model(ids, labels=ids)
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    from k2jax.ckpt.hf import tensor_maps

    worst = 0.0
    g_flat = dict(nnx.to_flat_state(grads))
    named = dict(torch_model.named_parameters())
    for m in tensor_maps(model.config, nnx.state(model.module)):
        if m.path[-1] == "router_bias":
            continue
        g = np.asarray(g_flat[m.path].get_value())
        for li, layer in enumerate(m.layers or [None]):
            for ei, e in enumerate(range(m.n_experts) if m.n_experts else [None]):
                name = m.template.format(layer=layer, e=e)
                ref = _torch_grad(named, name)
                mine = g[li] if m.layers is not None else g
                mine = mine[ei] if m.n_experts else mine
                ref_unit = m.to_unit(ref)
                rel = np.abs(mine - ref_unit).max() / max(np.abs(ref_unit).max(), 1e-12)
                worst = max(worst, rel)
                assert rel <= 1e-4, (name, rel)
    assert worst > 0


def _torch_grad(named, name):
    """Gradient of an official tensor name in transformers' module (experts are fused there)."""
    import re

    m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
    if not m:
        return named[name].grad.numpy()
    prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind == "down":
        return named[prefix + ".down_proj"].grad[e].numpy()
    gate_up = named[prefix + ".gate_up_proj"].grad[e].numpy()
    half = gate_up.shape[0] // 2
    return gate_up[:half] if kind == "gate" else gate_up[half:]


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    tokens = np.random.default_rng(1).integers(0, 512, (8, 32))
    segs = np.repeat(np.array([[1] * 20 + [2] * 12]), 8, 0).astype(np.int32)
    batch = {k: jnp.asarray(v) for k, v in _batch(tokens, segs).items()}
    t = _trainer(tiny_config, optimizer="adamw")
    state = t.init_state(3)
    results = []
    for micro in (1, 4):
        t.microbatches = micro
        loss, grads, aux = jax.jit(t._grads)(state.params, state.bias, batch)
        results.append((float(loss), float(aux["ce_sum"]), jax.device_get(grads)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][2]), jax.tree.leaves(results[1][2])):
        np.testing.assert_allclose(a, b, atol=1e-6 * max(np.abs(a).max(), 1e-3), rtol=1e-4)


@pytest.mark.parametrize("accum", ["param", "float32"])
def test_accumulation_dtype_for_bfloat16_parameters(tiny_config, accum):
    """With bf16 parameters the microbatch loop carries gradient sums in the parameters' dtypes (default) or in
    float32 (`grad_accum_dtype`), and hands gradients of each parameter's dtype on."""
    t = _trainer(tiny_config, run=TINY_RUN.replace(param_dtype="bfloat16"), optimizer="adamw", grad_accum_dtype=accum)
    t.microbatches = 4
    state = t.abstract_state()
    spec = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    closed = jax.make_jaxpr(t._grads)(state.params, state.bias, {k: spec for k in ("tokens", "segment_ids", "positions")})
    n = len(jax.tree.leaves(state.params))
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    carry = [v.aval.dtype for v in scan.outvars[1:scan.params["num_carry"]]]
    want = [jnp.dtype(jnp.float32) if accum == "float32" else p.dtype for p in jax.tree.leaves(state.params)]
    assert len(carry) == n and carry == want
    grads = jax.eval_shape(t._grads, state.params, state.bias, {k: spec for k in ("tokens", "segment_ids",
                                                                                    "positions")})[1]
    assert [g.dtype for g in jax.tree.leaves(grads)] == [p.dtype for p in jax.tree.leaves(state.params)]
    assert jnp.dtype(jnp.bfloat16) in {g.dtype for g in jax.tree.leaves(grads)}


def _max_logits(trainer, params, bias, batch, inputs_from=None):
    return jax.device_get(_max_logits_jit(trainer, params, bias, {k: jnp.asarray(v) for k, v in batch.items()},
                                          inputs_from if inputs_from is not None else (params, bias)))


@functools.partial(jax.jit, static_argnums=(0,))
def _max_logits_jit(trainer, params, bias, batch, inputs_from):
    """Per stack [layers, heads] max attention logits of `params`, each layer fed the hidden states that the
    model with `inputs_from` params (default: the same) gives it: QK-Clip's guarantee is per head, on the
    same activations."""
    from k2jax.model.layers.rope import rope_cos_sin, yarn_inv_freq

    new = nnx.merge(trainer.graphdef, params, bias)
    old = nnx.merge(trainer.graphdef, *inputs_from)
    tokens, pos, seg = (jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids"))
    cos, sin = rope_cos_sin(pos, *yarn_inv_freq(trainer.config))
    x = jnp.take(old.embed[...], tokens, axis=0)
    out = {}
    for name in ("dense_layers", "moe_layers"):
        g, st_old = nnx.split(getattr(old, name))
        _, st_new = nnx.split(getattr(new, name))
        rows = []
        for i in range(jax.tree.leaves(st_old)[0].shape[0]):
            blk_new = nnx.merge(g, jax.tree.map(lambda a: a[i], st_new))
            blk_old = nnx.merge(g, jax.tree.map(lambda a: a[i], st_old))
            rows.append(blk_new.attn(blk_new.attn_norm(x), cos, sin, seg)[1])
            x = blk_old(x, cos, sin, seg)[0]
        out[name] = jnp.stack(rows)
    return out


def test_qk_clip_caps_logits_and_leaves_other_heads_bit_identical(tiny_config):
    t = _trainer(tiny_config)
    state = t.init_state(0)
    params = jax.tree.map(lambda x: x * 4.0, jax.device_get(state.params))  # larger logits
    bias = jax.device_get(state.bias)
    batch = _batch(np.random.default_rng(2).integers(0, 4000, (2, 64)))
    before = _max_logits(t, params, bias, batch)
    tau = float(np.median(np.concatenate([v.ravel() for v in before.values()])))
    clipped = qk_clip(jax.tree.map(lambda x: x, params), {k: jnp.asarray(v) for k, v in before.items()}, tau,
                      tiny_config.qk_nope_head_dim)
    after = _max_logits(t, clipped, bias, batch, inputs_from=(params, bias))
    for stack in before:
        over = before[stack] > tau
        assert over.any() and (~over).any()
        assert np.all(after[stack][over] <= tau * (1 + 1e-4))
        np.testing.assert_allclose(after[stack][over], tau, rtol=1e-4)  # exactly at tau: gamma·S
        for name in ("q_b", "kv_b"):
            old = np.asarray(params[stack]["attn"][name].get_value())
            new = np.asarray(clipped[stack]["attn"][name].get_value())
            keep = ~over  # [layers, heads]
            assert np.array_equal(old.transpose(0, 2, 1, 3)[keep], new.transpose(0, 2, 1, 3)[keep])
        kv_a_old = np.asarray(params[stack]["attn"]["kv_a"].get_value())
        assert np.array_equal(kv_a_old, np.asarray(clipped[stack]["attn"]["kv_a"].get_value()))


def test_step_applies_qk_clip_and_moves_router_bias_toward_balance(tiny_config):
    """lr = 0: the step changes only what QK-Clip and the bias update change. Every head ends at or below tau
    (on the same activations), and overloaded experts' biases go down, idle ones up."""
    t = _trainer(tiny_config, learning_rate=0.0, min_learning_rate=0.0, qk_clip_tau=0.05, weight_decay=0.0,
                 bias_update_rate=0.01)
    state = t.init_state(0)
    skew = np.zeros((tiny_config.num_moe_layers, tiny_config.n_routed_experts), np.float32)
    skew[:, :4] = 1.0  # experts 0-3 chosen by every token
    leaf = state.bias["moe_layers"]["mlp"]["router_bias"]
    state.bias["moe_layers"]["mlp"]["router_bias"] = leaf.replace(jnp.asarray(skew))
    batch = _batch(np.random.default_rng(2).integers(0, 4000, (2, 64)))
    old = jax.device_get((state.params, state.bias))
    before = _max_logits(t, *old, batch)
    state, metrics = t.step(state, batch)
    after = _max_logits(t, state.params, state.bias, batch, inputs_from=old)
    assert float(metrics["max_attention_logit"]) == pytest.approx(max(v.max() for v in before.values()), rel=1e-5)
    for stack in before:
        assert np.all(before[stack] > 0.05)
        np.testing.assert_allclose(after[stack], 0.05, rtol=1e-4)
    new = np.asarray(state.bias["moe_layers"]["mlp"]["router_bias"].get_value())
    np.testing.assert_allclose(new[:, :4], 1.0 - 0.01, rtol=0, atol=1e-7)  # overloaded: pushed down
    np.testing.assert_allclose(new[:, 4:], 0.01, rtol=0, atol=1e-7)  # idle: pushed up
    assert float(metrics["expert_load_imbalance"]) == pytest.approx(4.0)


@pytest.fixture(scope="module")
def corpus_batches(small_tokenizer, tmp_path_factory):
    """The first 60 batches [8, 64] of the packed embedded-corpus sample (pydoc topics + stdlib docstrings)."""
    from k2jax.data.corpus import default_corpus

    path = default_corpus(str(tmp_path_factory.mktemp("corpus")), min_bytes=2_000_000)
    ds = make_dataset(open_source(path), small_tokenizer.path, seq_len=64, batch_size=8, seed=0)
    it = iter(ds)
    return [next(it) for _ in range(60)]


@pytest.fixture(scope="module")
def one_device_losses(tiny_config, corpus_batches):
    t = _trainer(tiny_config, learning_rate=3e-3, warmup_steps=10)
    state = t.init_state(0)
    losses = []
    for b in corpus_batches:
        state, m = t.step(state, b)
        losses.append(float(m["loss"]))
    return losses


def test_loss_falls_on_the_embedded_corpus(one_device_losses):
    first, last = np.mean(one_device_losses[:5]), np.mean(one_device_losses[-10:])
    assert first > 7.5 and last < first - 2.0, (first, last)


def test_eight_device_mesh_agrees_and_learns(tiny_config, corpus_batches, one_device_losses):
    """Packed corpus batches on 8 devices, each sequence split over `context` (and experts over `expert`, heads
    and expert hidden dims over `tensor`): the one-device losses, and the loss falls. The context shards split
    the dense weights as fsdp does (their optimizer state with them)."""
    t = _trainer(tiny_config, "context=2,expert=2,tensor=2", learning_rate=3e-3, warmup_steps=10)
    state = t.init_state(0)
    embed = state.params["embed"].get_value()
    assert embed.sharding.shard_shape(embed.shape)[1] == embed.shape[1] // 4  # hidden dim over context x expert
    losses = []
    for b in corpus_batches[:40]:
        state, m = t.step(state, b)
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses[:5], one_device_losses[:5], atol=1e-4, rtol=0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


def test_pallas_kernels_and_all_to_all_dispatch_train_as_one_device(tiny_config, corpus_batches, one_device_losses):
    """The train step with the Pallas grouped matmul (interpreted) and all-to-all expert dispatch on data=2,expert=4:
    the one-device losses, and the step's metrics report no dropped assignment (dropless)."""
    run = TINY_RUN.replace(kernels="interpret", moe_dispatch="a2a")
    t = _trainer(tiny_config, "data=2,expert=4", run, learning_rate=3e-3, warmup_steps=10)
    state = t.init_state(0)
    losses = []
    for b in corpus_batches[:4]:
        state, m = t.step(state, b)
        losses.append(float(m["loss"]))
        assert float(m["moe_dropped"]) == 0.0
    np.testing.assert_allclose(losses, one_device_losses[:4], atol=1e-4, rtol=0)


def test_chunked_cross_entropy_matches_float64():
    """Vocabulary chunks (rematerialised) and one whole-vocabulary chunk give the float64 loss and gradients, and
    the z-loss sum (masked logsumexp²) and its gradients."""
    from k2jax.train.loss import chunked_cross_entropy

    rng = np.random.default_rng(0)
    n, d, v = 48, 16, 1024
    h, w = rng.normal(size=(n, d)), rng.normal(size=(v, d)) / 4
    tgt, mask = rng.integers(0, v, n), rng.random(n) > 0.2
    logits = h @ w.T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    p = np.exp(logits - lse[:, None])
    want = ((lse - logits[np.arange(n), tgt]) * mask).sum()
    dlogits = (p - np.eye(v)[tgt]) * mask[:, None]
    for chunk in (128, v):
        f = jax.jit(jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, tgt, mask, chunk=chunk)[0], (0, 1)))
        loss, (dh, dw) = f(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        np.testing.assert_allclose(dh, dlogits @ w, atol=1e-5)
        np.testing.assert_allclose(dw, dlogits.T @ h, atol=1e-5)
        # the z-loss term: sum of masked logsumexp², and its gradient 2·lse·softmax
        fz = jax.jit(jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, tgt, mask, chunk=chunk)[1], (0, 1)))
        z, (dhz, dwz) = fz(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
        dz = 2 * lse[:, None] * p * mask[:, None]
        np.testing.assert_allclose(z, (lse ** 2 * mask).sum(), rtol=1e-5)
        np.testing.assert_allclose(dhz, dz @ w, atol=1e-4)
        np.testing.assert_allclose(dwz, dz.T @ h, atol=1e-4)


def test_training_splits_dense_weights_and_their_state_over_the_whole_batch_group(tiny_config):
    """ZeRO-3 over fsdp x expert: every dense weight (and its optimizer state) is split 8 ways on fsdp=2,expert=4,
    expert weights over expert x fsdp; decoding's table keeps dense weights off `expert`. A hidden size the
    group does not divide is refused by name."""
    from k2jax.model.sharding import ShardingError, ShardingRules

    trainer = _trainer(tiny_config, "fsdp=2,expert=4")
    state = trainer.abstract_state()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        name = jax.tree_util.keystr(path)
        shards = np.prod(leaf.shape) // np.prod(leaf.sharding.shard_shape(leaf.shape))
        if "norm" not in name and "router_bias" not in name:  # 1-D scales and biases stay whole
            assert shards == 8, (name, leaf.sharding.spec)
    groups = state.opt_state if hasattr(state.opt_state, "inner_states") else state.opt_state[1]  # no clip: no chain
    momentum = groups.inner_states["muon"].inner_state[0].momentum
    o = momentum["moe_layers"]["attn"]["o"].get_value()
    assert o.sharding.spec == state.params["moe_layers"]["attn"]["o"].get_value().sharding.spec
    decode_o = ShardingRules().spec(("heads", "head_dim", "embed"), trainer.mesh)
    assert "expert" not in jax.tree.leaves(tuple(decode_o))
    with pytest.raises(ShardingError, match="'hidden_size' = 100 .* divisible by 8"):
        _trainer(tiny_config.replace(hidden_size=100), "fsdp=2,expert=4")


def test_step_metrics_are_fetched_one_step_late(tmp_path):
    """The loop's StepLog reads a logged step's metrics only once the next step has been dispatched (or at the
    end), so the host never waits on the step it just launched."""
    from k2jax.train.loop import RunConfig, StepLog
    from k2jax.train.metrics import MetricsWriter

    fetched = []

    class Value:  # a device value that records when the host reads it
        def __init__(self, step):
            self.step = step

        def __float__(self):
            fetched.append(self.step)
            return 1.0

    checked = []

    class Flag:  # the step's ok flag, which the host reads every step (not only logged ones)
        def __init__(self, step):
            self.step = step

        def __bool__(self):
            checked.append(self.step)
            return True

    def metrics(step):
        return {**{k: Value(step) for k in ("loss", "grad_norm", "learning_rate", "max_attention_logit")},
                "step_ok": Flag(step), "first_nonfinite_grad": -1, "stop_requested": False}

    writer = MetricsWriter(str(tmp_path))
    log = StepLog(RunConfig(workdir=str(tmp_path), steps=4, log_every=2), 1e9, 0, writer, lambda *a: None)
    log.push(1, metrics(1))
    assert checked == []
    log.push(2, metrics(2))
    assert fetched == [] and checked == [1]  # step 2 is logged, but not read while it may still run
    log.push(3, metrics(3))
    assert set(fetched) == {2} and checked == [1, 2]  # read once step 3 was dispatched
    log.push(4, metrics(4))
    assert set(fetched) == {2}
    log.settle()
    assert set(fetched) == {2, 4} and checked == [1, 2, 3, 4]
    writer.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [2, 4]
