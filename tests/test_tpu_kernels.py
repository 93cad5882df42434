"""JAX's Pallas TPU kernels (Pallas's interpreter on CPU, compiled for TPU topologies) and the all-to-all token
dispatch: the megablox grouped matmul and splash attention give one device's and float64's loss and gradients
(skewed routing; packed documents and padding), drops are counted exactly past a capacity, and the kernels are
in the module compiled for v5p and v6e with their FLOPs counted."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_RUN
from k2jax.model.layers.dispatch import slot_capacity
from k2jax.model.sharding import make_mesh
from test_moe import _moe, _numpy_params, numpy_moe

SKEW = [0, 1]  # every token picks experts 0 and 1 (one expert shard): 4x their balanced load, top-4 of 16


def _skewed_moe(c, run):
    bias = np.random.default_rng(1).normal(0, 0.05, c.n_routed_experts)
    bias[SKEW] = 10.0
    return _moe(c, bias, run=run)


def _loss_and_grads(moe, x, r, layout=None):
    """(loss, dropped, expert loads, gradients of the loss wrt x and every MoE parameter) on 1 device or a mesh."""
    graphdef, state = nnx.split(moe)

    def loss(s, x):
        y, stats = nnx.merge(graphdef, s)(x)
        return (y * r).sum(), (stats["moe_dropped"], stats["expert_load"])

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if layout is None:
        return f(state, x)
    with jax.set_mesh(make_mesh(layout)):
        return f(state, x)


@pytest.fixture(scope="module")
def inputs(tiny_config):
    rng = np.random.default_rng(2)
    shape = (8, 32, tiny_config.hidden_size)
    return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def one_device(tiny_config, inputs):
    """The XLA row-block path on one device: the reference the kernels and the dispatch must reproduce."""
    return _loss_and_grads(_skewed_moe(tiny_config, TINY_RUN), *inputs)


def _assert_same(got, want, tol=1e-5):
    (loss, (dropped, load)), grads = got
    (loss0, _), grads0 = want
    assert float(dropped) == 0.0
    np.testing.assert_allclose(float(loss), float(loss0), rtol=tol)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        scale = max(float(jnp.abs(g0).max()), 1e-12)
        assert float(jnp.abs(g - g0).max()) / scale <= tol


def test_pallas_gmm_matches_float64_and_one_device(tiny_config, inputs, one_device):
    """moe_impl=gmm (megablox gmm/tgmm, interpreted) on one device: float64 outputs, the XLA path's gradients."""
    run = TINY_RUN.replace(moe_impl="gmm", kernels="interpret")
    moe = _skewed_moe(tiny_config, run)
    x = inputs[0]
    ref = numpy_moe(np.asarray(x).reshape(-1, tiny_config.hidden_size), _numpy_params(moe), tiny_config)
    np.testing.assert_allclose(np.asarray(moe(x)[0]).reshape(ref.shape), ref, atol=1e-4, rtol=1e-4)
    _assert_same(_loss_and_grads(moe, *inputs), one_device)
    # the kernels are in the lowered step: gmm forward, tgmm for the weight gradient (the XLA path: neither)
    for m, want in ((moe, True), (_skewed_moe(tiny_config, TINY_RUN), False)):
        graphdef, state = nnx.split(m)
        text = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(x)[0].sum())).lower(state).as_text()
        assert ("@gmm" in text, "@tgmm" in text) == (want, want)


@pytest.mark.parametrize("layout", ["expert=4,tensor=2", "data=2,expert=4"])
def test_pallas_gmm_with_all_to_all_dispatch_equals_one_device(tiny_config, inputs, one_device, layout):
    """Pallas kernels and all-to-all dispatch (dropless) on 8 devices: the one-device loss and every gradient to
    1e-5, with experts 0 and 1 taking every token (their shard receives half of all assignments)."""
    run = TINY_RUN.replace(moe_impl="gmm", kernels="interpret", moe_dispatch="a2a")
    got = _loss_and_grads(_skewed_moe(tiny_config, run), *inputs, layout)
    load = np.asarray(got[0][1][1])
    tokens = inputs[0].shape[0] * inputs[0].shape[1]
    assert load[SKEW].tolist() == [tokens] * 2 and load.mean() == tokens * tiny_config.num_experts_per_tok / 16
    _assert_same(got, one_device)


def _numpy_with_drops(x, p, c, keep):
    """float64 MoE output where only the (token, k) assignments with keep[t, k] count (drops add nothing)."""
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    idx, w = _numpy_routing(x, p, c)
    out = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(c.num_experts_per_tok):
            if keep[t, j]:
                i = idx[t, j]
                out[t] += w[t, j] * (silu(x[t] @ p["wg"][i]) * (x[t] @ p["wu"][i])) @ p["wd"][i]
    sh = p["shared"]
    return out + (silu(x @ sh["gate"]) * (x @ sh["up"])) @ sh["down"]


def _numpy_routing(x, p, c):
    scores = 1 / (1 + np.exp(-(x @ p["router"])))
    idx = np.argsort(-(scores + p["router_bias"]), -1, kind="stable")[:, : c.num_experts_per_tok]
    w = np.take_along_axis(scores, idx, -1)
    return idx, w / w.sum(-1, keepdims=True) * c.routed_scaling_factor


def _expected_keep(idx, dispatch, token_shards, ep, n_local, capacity_factor):
    """Which assignments survive a capacity, by the documented rule of each dispatch (float64-independent)."""
    t, k = idx.shape
    keep = np.zeros_like(idx, bool)
    if dispatch == "a2a":  # per source shard and destination: the first `cap` in token order
        per = t // token_shards
        cap = slot_capacity(per * k, ep, capacity_factor)
        for s in range(token_shards):
            seen = np.zeros(ep, int)
            for a in range(s * per * k, (s + 1) * per * k):
                dest = idx.flat[a] // n_local
                keep.flat[a] = seen[dest] < cap
                seen[dest] += 1
        return keep
    group = t // (token_shards // ep)  # gather: each expert shard takes its experts' rows of the gathered group
    cap = int(capacity_factor * group * k / ep)
    for g0 in range(0, t, group):
        for shard in range(ep):
            rows = [(idx[tt, j], tt, j) for tt in range(g0, g0 + group) for j in range(k)
                    if idx[tt, j] // n_local == shard]
            for e, tt, j in sorted(rows)[:cap]:  # expert order, then token order
                keep[tt, j] = True
    return keep


@pytest.mark.parametrize("dispatch", ["a2a", "gather"])
def test_capacity_drops_are_counted_exactly(tiny_config, inputs, dispatch):
    """Capacity factor 1 with skewed routing on data=2,expert=4: the count of dropped assignments equals the
    rule's, and the output equals float64 with exactly those assignments left out."""
    c, ep, shards = tiny_config, 4, 8
    run = TINY_RUN.replace(moe_impl="gmm", kernels="interpret", moe_dispatch=dispatch, moe_capacity_factor=1.0)
    moe = _skewed_moe(c, run)
    x = inputs[0]
    graphdef, state = nnx.split(moe)
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    p = _numpy_params(moe)
    x64 = np.asarray(x, np.float64).reshape(-1, c.hidden_size)
    idx, _ = _numpy_routing(x64, p, c)
    keep = _expected_keep(idx, dispatch, shards, ep, c.n_routed_experts // ep, 1.0)
    assert (~keep).sum() > 0.2 * keep.size  # the skew overflows the capacity
    assert float(stats["moe_dropped"]) == (~keep).sum()
    ref = _numpy_with_drops(x64, p, c, keep)
    np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), ref, atol=1e-4, rtol=1e-4)
    # positive control: the dropless reference differs from the capacity-bounded output
    assert np.abs(numpy_moe(x64, p, c) - ref).max() > 1e-2


def _tpu_kernels(hlo: str) -> list[str]:
    """Names of the Pallas (Mosaic) kernel calls in a compiled TPU module's text."""
    return re.findall(r"%([\w.]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo)


@pytest.mark.parametrize("topology, layout", [("v5p-8", "expert=4"), ("v6e-8", "context=2,expert=4")])
def test_tiny_train_step_compiles_for_tpu_with_the_kernels_and_all_to_all(monkeypatch, topology, layout,
                                                                          libtpu_env):
    """k2jax-compile's train step (tiny preset, all-to-all dispatch) for v5p-8 and v6e-8 (the sequence split over
    `context` there): the Pallas grouped matmuls (forward and both gradients of the MoE layers' scanned body) and
    splash attention are in the compiled module,
    the tokens travel by all-to-all, and the report counts the kernels (FLOPs within a few times the analytic
    count) and the bytes each collective moves."""
    import k2jax
    from k2jax import aot

    built = []
    compile_train = aot._compile_train
    monkeypatch.setattr(aot, "_compile_train", lambda *a, **k: built.append(compile_train(*a, **k)) or built[-1])
    config, run = k2jax.load_preset("tiny", moe_dispatch="a2a", moe_capacity_factor=2.0)
    seq = 512 if "context" in layout else 256  # two pieces of 128 tokens per context shard: whole kernel blocks
    report = aot.compile_train(config, topology, layout, batch=8, seq=seq, execution=run,
                               cost=topology.startswith("v5p"))
    hlo = built[0][0].as_text()
    names = _tpu_kernels(hlo)
    grouped = [n for n in names if n.startswith(("gmm", "tgmm"))]
    assert sum(n.startswith("tgmm") for n in grouped) == 3 and len(grouped) == 9, names
    # and attention by the splash kernel in both layer stacks (dense, MoE): forward once, dq / dk,dv backward
    splash = [n.rsplit(".", 1)[0] for n in names if "splash" in n]
    assert len(splash) == 6 and set(splash) == {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
                                                "splash_mha_dkv_segmented_no_residuals"}, names
    assert re.search(r" all-to-all(-start)?\(", hlo)
    assert report.fits
    if topology.startswith("v5p"):
        # the unrolled builds held one sequence per batch shard and were scaled to the batch, loop bodies by their
        # trip counts: the model's FLOPs within a few times the analytic count (unscaled ~0.3x, scaled twice ~10x)
        assert report.flops > aot._cost(built[0][0], aot.CHIPS["v5p"])[0] * report.chips
        assert 0 < report.optimizer_flops < report.flops  # MuonClip's Newton-Schulz, reported on its own line
        # by part (grouped-matmul kernels, splash, the rest), each against its analytic count:
        (moe, want_moe), (attn, want_attn), (rest, want_rest) = report.parts.values()
        # splash: the 256-token sequence is one kernel block, computed whole (twice the causal half the analytic
        # count takes), forward once (its residuals kept) plus dq and dk/dv, against 3 forwards
        qk, v = config.qk_head_dim, config.v_head_dim
        assert attn / want_attn == pytest.approx(2 * (2 * (qk + v) + 2 * (2 * qk + v) + 2 * (2 * qk + 2 * v))
                                                 / (3 * 2 * (qk + v)), rel=1e-6)
        # the rest is XLA's count of the module less the kernels': within 10% of the analytic count of the dense
        # parts (norms, router, softmax and the like on top); splash's FLOPs left in it would show (the control)
        assert 1.0 <= rest / want_rest <= 1.1, rest / want_rest
        assert not 1.0 <= (rest + attn) / want_rest <= 1.1
        # the whole: the tiny preset's 1.48 (capacity 2 for the experts, the whole-block attention above)
        total = (report.flops - report.optimizer_flops) / report.analytic_flops
        assert 1.44 <= total <= 1.53 and report.seconds > 0, total
        assert 2.0 <= moe / want_moe <= 2.1, moe / want_moe  # the row buffers of capacity factor 2
        assert want_moe < report.grouped_visits <= moe  # the kernels visit the rows they hold, and partial tiles
        assert report.collectives["all-to-all"] > 0 and report.communication_seconds > 0
        lines = "\n".join(report.lines(aot.CHIPS["v5p"].peak_flops))
        assert all(s in lines for s in ("of which the optimizer update", "bytes each chip sends", "where they go"))


def _attention_inputs(scale_qk=1.0, b=2, t=128, h=4, n=32, r=16, vd=32):
    rng = np.random.default_rng(0)
    qn, kn = (rng.normal(size=(b, t, h, n)) * scale_qk for _ in range(2))
    qr, kr, v = rng.normal(size=(b, t, h, r)) * scale_qk, rng.normal(size=(b, t, r)), rng.normal(size=(b, t, h, vd))
    seg = np.ones((b, t), np.int32)
    seg[0, 40:] = 2  # two packed documents
    seg[1, 100:] = 0  # padding
    return (qn, qr, kn, kr, v), seg


def _numpy_attention(qn, qr, kn, kr, v, seg, scale):
    """float64 (out [b,t,h,v], max logit per head over real tokens [h]) of causal attention within segments."""
    s = (np.einsum("bthn,bshn->bhts", qn, kn) + np.einsum("bthr,bsr->bhts", qr, kr)) * scale
    t = s.shape[-1]
    mask = np.tril(np.ones((t, t), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    real = (seg != 0)[:, None, :, None] & mask
    return np.einsum("bhts,bshv->bthv", p, v), np.where(real, s, -np.inf).max(axis=(0, 2, 3))


@pytest.mark.parametrize("layout", [None, "data=2,tensor=4"])
def test_splash_attention_equals_float64_and_the_blockwise_gradients(layout):
    """The splash kernel (interpreted) with packed documents and padding: float64 outputs, the XLA blockwise path's
    gradients to 1e-5 (on one device and split over batch and heads), and a max logit between the true one and
    log(keys) above it; with sharp attention (the logits QK-Clip caps) within 1e-3 of it."""
    from k2jax.model.layers.blockwise import blockwise_attention
    from k2jax.model.layers.splash import splash_attention
    from k2jax.model.sharding import ShardingRules

    arrays, seg = _attention_inputs()
    scale = 0.3
    args = tuple(jnp.asarray(a, jnp.float32) for a in arrays)
    rules, real = ShardingRules(), seg != 0
    w = jnp.asarray(np.random.default_rng(1).normal(size=arrays[-1].shape) * real[..., None, None], jnp.float32)

    def splash(*a):
        return splash_attention(*a, jnp.asarray(seg), scale, rules, interpret=True)

    def run(f):
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda *a: (f(*a)[0] * w).sum(), argnums=(0, 1, 2, 3, 4)))
        if layout is None:
            return fwd(*args), grad(*args)
        with jax.set_mesh(make_mesh(layout)):
            return fwd(*args), grad(*args)

    (out, max_h), grads = run(splash)
    ref_out, ref_max = _numpy_attention(*arrays, seg, scale)
    np.testing.assert_allclose(np.asarray(out)[real], ref_out[real], atol=1e-5)
    assert np.all(ref_max - 1e-5 <= np.asarray(max_h)) and np.all(np.asarray(max_h) <= ref_max + np.log(128))
    _, want = run(lambda *a: blockwise_attention(*a, jnp.asarray(seg), 32, scale))
    for g, g0 in zip(grads, want):
        assert float(jnp.abs(g - g0).max() / jnp.abs(g0).max()) <= 1e-5
    sharp, _ = _attention_inputs(scale_qk=4.0)
    _, sharp_max = jax.jit(splash)(*(jnp.asarray(a, jnp.float32) for a in sharp))
    np.testing.assert_allclose(np.asarray(sharp_max), _numpy_attention(*sharp, seg, scale)[1], atol=1e-3)


def test_tiny_model_with_the_kernels_gives_the_xla_logits(hf_tiny):
    """The converted tiny checkpoint with kernels="interpret" (splash attention at 128 tokens, the grouped matmul)
    gives the XLA paths' logits on packed documents; the lowered forward holds both kernels."""
    import k2jax

    model = k2jax.load_hf(hf_tiny[0])
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 128)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[:, 70:] = 2
    positions = np.where(seg == 1, np.arange(128), np.arange(128) - 70).astype(np.int32)
    want = np.asarray(model.logits(tokens, positions, seg))
    kernels = model.with_execution(kernels="interpret")
    np.testing.assert_allclose(np.asarray(kernels.logits(tokens, positions, seg)), want, atol=1e-4, rtol=1e-4)
    args = [jnp.asarray(a) for a in (tokens, positions, seg)]
    with jax.set_mesh(kernels.mesh):
        text = kernels._forward.lower(kernels.state, *args).as_text()
    assert "@gmm" in text and "splash" in text


def test_splash_kernels_flops_are_counted_by_the_report(libtpu_env):
    """Splash attention compiled for v5p carries no cost estimate (XLA counts ~0 for it); the report's count of its
    calls equals XLA's count of the one-score-matrix forward times the causal blocks' share (10 of 16 at 2048
    tokens in blocks of 512; 36 of 64 split over 4 context shards), and the backward's calls add dq and dk/dv."""
    from jax.sharding import SingleDeviceSharding

    from k2jax import aot
    from k2jax.model.layers.splash import splash_attention
    from k2jax.model.sharding import ShardingRules
    from k2jax.report import splash_flops

    sh = SingleDeviceSharding(aot.topology_devices("v5p-8")[1][0])
    b, t, h, n, r, vd = 1, 2048, 16, 128, 64, 128
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh)  # noqa: E731
    args = (shape(b, t, h, n), shape(b, t, h, r), shape(b, t, h, n), shape(b, t, r), shape(b, t, h, vd))
    seg = jnp.ones((b, t), jnp.int32)

    def splash(*a):
        return splash_attention(*a, seg, 0.1, ShardingRules())[0]

    def one_matrix(qn, qr, kn, kr, v):
        s = jnp.einsum("bthn,bshn->bhts", qn, kn) + jnp.einsum("bthr,bsr->bhts", qr, kr)
        return jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(s.astype(jnp.float32), -1).astype(v.dtype), v)

    fwd = jax.jit(splash).lower(*args).compile()
    xla_fwd = aot._cost(jax.jit(one_matrix).lower(*args).compile(), aot.CHIPS["v5p"])[0]
    assert aot._cost(fwd, aot.CHIPS["v5p"])[0] < 0.01 * xla_fwd  # the kernel itself is not counted by XLA
    counted = splash_flops(fwd.as_text(), n + r, vd)
    np.testing.assert_allclose(counted, xla_fwd * 10 / 16, rtol=0.03)  # XLA's adds the softmax's ~2%
    grad = jax.jit(jax.grad(lambda *a: splash(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4)))
    # the forward once (the backward kernels read its residuals: output and log-sum-exp), dq and dk/dv
    per_pair = (n + r + vd) + (2 * (n + r) + vd) + (2 * (n + r) + 2 * vd)
    np.testing.assert_allclose(splash_flops(grad.lower(*args).compile().as_text(), n + r, vd),
                               counted * per_pair / (n + r + vd), rtol=1e-6)
    # under remat the names keep those residuals (save_moe_attn's "attn_out"); saving nothing runs the forward again
    for policy, forwards in (("attn_out", 1), ("", 2)):
        keep = jax.checkpoint(splash, policy=jax.checkpoint_policies.save_only_these_names(*filter(None, [policy])))
        loss = jax.value_and_grad(lambda *a: keep(*a).astype(jnp.float32).sum())  # the primal forward is used
        text = jax.jit(loss).lower(*args).compile().as_text()
        assert len(re.findall(r"%splash_mha_fwd\S* = ", text)) == forwards, policy
    # the sequence split over 4 context shards (the balanced layout, layers/context.py): pieces of 256 tokens in
    # blocks of 256, each shard 2·4 + 1 of the 64 blocks of the score matrix, 36 of 64 for the four
    from k2jax.model.layers.context import balanced_positions

    devices = aot.topology_devices("v5p-8")[1]
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 1, 4, 1, 1), ("data", "fsdp", "context", "expert", "tensor"))
    with jax.set_mesh(mesh):
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        split = jax.jit(lambda *a: splash_attention(*a, seg, 0.1, ShardingRules(), positions=balanced_positions(t, 4),
                                                    seg_k=seg, context_axes=("context",))[0])
        hlo = split.lower(*(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args)).compile()
    np.testing.assert_allclose(4 * splash_flops(hlo.as_text(), n + r, vd), xla_fwd * 36 / 64, rtol=0.03)


def _row_moves(fn, *args) -> dict:
    """{"scatter": shapes, "gather": shapes} of the equations over rows of the hidden size (d = 128 here) in fn's
    forward-and-backward jaxpr, shard_map and loop bodies included."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = {"scatter": [], "gather": []}

    def walk(j):
        for eqn in j.eqns:
            shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
            kind = eqn.primitive.name.split("-")[0].split("_")[0]
            if kind in found and len(shape) >= 2 and shape[-1] == 128:
                found[kind].append(shape)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("layout", [None, "data=2,expert=4"])
def test_token_rows_move_by_gathers_in_both_passes(tiny_config, inputs, layout):
    """The gmm path (and the all-to-all dispatch) moves token rows to expert order and back without one scatter of
    rows, forward or backward (a scatter of rows is the slow form on TPU); positive control: the plain
    x[idx] / .at[idx].add round trip has them."""
    run = TINY_RUN.replace(moe_impl="gmm", kernels="interpret", moe_dispatch="a2a")
    graphdef, state = nnx.split(_skewed_moe(tiny_config, run))
    grad = jax.grad(lambda s, x: nnx.merge(graphdef, s)(x)[0].sum(), argnums=(0, 1))
    if layout is None:
        moves = _row_moves(grad, state, inputs[0])
    else:
        with jax.set_mesh(make_mesh(layout)):
            moves = _row_moves(grad, state, inputs[0])
    assert moves["scatter"] == [] and len(moves["gather"]) >= 4, moves  # both ways, both passes
    idx = jnp.arange(64) % 16
    plain = jax.grad(lambda x: jnp.zeros_like(x).at[idx].add(x[idx] * 2.0).sum())
    assert _row_moves(plain, jnp.ones((16, 128)))["scatter"] != []
