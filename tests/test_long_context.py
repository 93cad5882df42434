"""Long context: context parallelism (one sequence split over the `context` mesh axis,
k2jax.model.layers.context) and chunked prefill's memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.errors import ConfigError
from k2jax.model.layers.context import from_balanced, to_balanced

SEG = np.array([[1] * 40 + [2] * 20 + [0] * 4, [1] * 64])  # two packed documents and padding; one whole row
POS = np.array([list(range(40)) + list(range(20)) + [0] * 4, list(range(64))])


def _causal_pairs_per_shard(order: np.ndarray, n: int) -> list[int]:
    """(query, key) pairs with key <= query that each of n equal shards of `order` (original indices) computes."""
    return [int(sum(q + 1 for q in part)) for part in np.split(order, n)]


def test_balanced_layout_gives_each_shard_an_early_and_a_late_piece():
    """Shard i holds pieces i and 2N-1-i; from_balanced inverts to_balanced; the causal work per shard is equal
    (the natural order, the positive control, gives the last shard 7x the first's at N=4)."""
    n, t = 4, 64
    order = np.asarray(to_balanced(jnp.arange(t)[None], n))[0]
    pieces = order.reshape(n, 2, t // (2 * n))[:, :, 0] // (t // (2 * n))
    assert pieces.tolist() == [[i, 2 * n - 1 - i] for i in range(n)]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, t, 5)))
    np.testing.assert_array_equal(from_balanced(to_balanced(x, n, axis=2), n, axis=2), x)
    balanced = _causal_pairs_per_shard(order, n)
    assert max(balanced) - min(balanced) <= t // (2 * n), balanced  # pieces of 8: within a piece's length
    natural = _causal_pairs_per_shard(np.arange(t), n)
    assert natural[-1] > 6 * natural[0], natural


def _loss_grads(model, tokens, chunk):
    """(loss, max logits, gradients) of sum(h²) over the final hidden states, on the model's mesh."""
    model = model.with_execution(attn_chunk=chunk)

    def loss(state):
        h, _, stats = nnx.merge(model.graphdef, state).forward(tokens, POS, SEG, head=False)
        return (h ** 2).sum(), {k: s["max_logit"] for k, s in stats.items()}

    with jax.set_mesh(model.mesh):
        (value, max_logit), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(model.state)
    return value, max_logit, grads


@pytest.fixture(scope="module")
def one_device(hf_tiny):
    return k2jax.load_hf(hf_tiny[0])


@pytest.fixture(scope="module")
def reference(one_device, tokens_2x64):
    """One device's (loss, max logits, gradients) for attn_chunk 8 and 0."""
    return {chunk: _loss_grads(one_device, tokens_2x64, chunk) for chunk in (8, 0)}


@pytest.mark.parametrize("layout", ["context=4,data=2", "context=2,expert=2,tensor=2"])
def test_context_parallel_equals_one_device(layout, hf_tiny, one_device, reference, tokens_2x64):
    """Logits, max attention logits and every gradient on 8 devices with the sequence split over `context` equal
    one device's to 1e-5, with packed documents and padding, blockwise (attn_chunk 8) and one block per piece."""
    model = k2jax.load_hf(hf_tiny[0], mesh=layout)
    assert model.mesh.shape["context"] == int(layout.split(",")[0].split("=")[1])
    np.testing.assert_allclose(np.asarray(model.logits(tokens_2x64, positions=POS, segment_ids=SEG)),
                               np.asarray(one_device.logits(tokens_2x64, positions=POS, segment_ids=SEG)),
                               atol=1e-5, rtol=0)
    for chunk in (8, 0):
        v0, m0, g0 = reference[chunk]
        v1, m1, g1 = _loss_grads(model, tokens_2x64, chunk)
        np.testing.assert_allclose(v1, v0, rtol=1e-5)
        for name in m0:
            np.testing.assert_allclose(m1[name], m0[name], rtol=1e-5)
        for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
            a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max() + 1e-8, (chunk, path)


@pytest.mark.parametrize("layout", ["context=4,data=2", "context=2,data=2,tensor=2"])
def test_context_parallel_splash_equals_float64_and_the_blockwise_gradients(layout):
    """Splash attention (interpreted) with the queries in the balanced layout split over `context` and the keys in
    sequence order: float64 outputs and the one-device blockwise kernel's gradients to 1e-5 with packed documents
    and padding, the max logit within log(keys) above the true one. The positive control: the same kernels told
    the queries sit in sequence order (their mask then wrong for every late piece) miss by far more."""
    from k2jax.model.layers.blockwise import blockwise_attention
    from k2jax.model.layers.context import balanced_positions, context_axes
    from k2jax.model.layers.splash import splash_attention
    from k2jax.model.sharding import ShardingRules, make_mesh
    from test_tpu_kernels import _attention_inputs, _numpy_attention

    n = int(layout.split(",")[0].split("=")[1])
    t, scale, rules = 256 * n, 0.3, ShardingRules()  # pieces of 128 tokens: one kernel block each
    arrays, seg = _attention_inputs(t=t)
    seg[1, t - 60:] = 0
    args = [jnp.asarray(a, jnp.float32) for a in arrays]
    real = seg != 0
    w = jnp.asarray(np.random.default_rng(1).normal(size=arrays[-1].shape) * real[..., None, None], jnp.float32)

    def splash(qn, qr, kn, kr, v, positions=balanced_positions(t, n)):
        out, max_h = splash_attention(to_balanced(qn, n), to_balanced(qr, n), kn, kr, v,
                                      to_balanced(jnp.asarray(seg), n), scale, rules, interpret=True,
                                      positions=positions, seg_k=jnp.asarray(seg), context_axes=context_axes(rules))
        return from_balanced(out, n), max_h

    with jax.set_mesh(make_mesh(layout)):
        out, max_h = jax.jit(splash)(*args)
        grads = jax.jit(jax.grad(lambda *a: (splash(*a)[0] * w).sum(), argnums=(0, 1, 2, 3, 4)))(*args)
        wrong, _ = jax.jit(lambda *a: splash(*a, positions=np.arange(t)))(*args)
    ref_out, ref_max = _numpy_attention(*arrays, seg, scale)
    np.testing.assert_allclose(np.asarray(out)[real], ref_out[real], atol=1e-5)
    assert np.all(ref_max - 1e-5 <= np.asarray(max_h)) and np.all(np.asarray(max_h) <= ref_max + np.log(t))
    want = jax.jit(jax.grad(lambda *a: (blockwise_attention(*a, jnp.asarray(seg), 128, scale)[0] * w).sum(),
                            argnums=(0, 1, 2, 3, 4)))(*args)
    for g, g0 in zip(grads, want):
        assert float(jnp.abs(g - g0).max() / jnp.abs(g0).max()) <= 1e-5
    assert np.abs(np.asarray(wrong)[real] - ref_out[real]).max() > 0.1


def test_context_parallel_model_with_the_kernels_gives_one_devices_logits(hf_tiny, one_device):
    """The tiny checkpoint on `context=2,data=2,tensor=2` with kernels="interpret" (splash per context shard, the
    grouped matmul) gives one device's XLA logits on 512 tokens of packed documents and padding."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, one_device.config.vocab_size, (2, 512)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[:, 300:] = 2
    seg[1, 480:] = 0
    positions = np.where(seg == 1, np.arange(512), np.arange(512) - 300).astype(np.int32) * (seg != 0)
    want = np.asarray(one_device.logits(tokens, positions, seg))
    model = k2jax.load_hf(hf_tiny[0], mesh="context=2,data=2,tensor=2", kernels="interpret")
    got = np.asarray(model.logits(tokens, positions, seg))
    np.testing.assert_allclose(got[seg != 0], want[seg != 0], atol=1e-4, rtol=1e-4)
    with jax.set_mesh(model.mesh):
        text = model._forward.lower(model.state, *(jnp.asarray(a) for a in (tokens, positions, seg))).as_text()
    assert "splash" in text


def _gathered_widths(hlo: str) -> list[int]:
    """The minor dimension of every all-gather's result in an HLO module's text."""
    return [int(m.group(1)) for m in re.finditer(r"= \w+\[[\d,]*?(\d+)\]\{[^}]*\} all-gather", hlo)]


def test_only_the_latent_and_rope_key_travel(hf_tiny):
    """The compiled context-parallel forward all-gathers the 32-value latent, the 16-value rope key and segment
    ids, never per-head keys or values (the checker's positive control: a K/V-sized all-gather is caught)."""
    model = k2jax.load_hf(hf_tiny[0], mesh="context=4,data=2")
    c = model.config
    tokens = jnp.zeros((2, 64), jnp.int32)
    with jax.set_mesh(model.mesh):
        fwd = jax.jit(lambda s, t: nnx.merge(model.graphdef, s).forward(t, head=False)[0])
        widths = _gathered_widths(fwd.lower(model.state, tokens).compile().as_text())
    assert {c.kv_lora_rank, c.qk_rope_head_dim} <= set(widths), widths
    assert set(widths) <= {c.kv_lora_rank, c.qk_rope_head_dim, 64}, widths  # 64: a row of segment ids
    kv = jax.ShapeDtypeStruct((2, 64, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim), jnp.float32,
                              sharding=model.rules.sharding(("batch", "act_seq", None, None), model.mesh))
    with jax.set_mesh(model.mesh):
        gather_kv = jax.jit(lambda x: jax.lax.with_sharding_constraint(x, model.rules.spec(("batch", None, None, None),
                                                                                           model.mesh)) * 2)
        control = _gathered_widths(gather_kv.lower(kv).compile().as_text())
    assert c.qk_nope_head_dim + c.v_head_dim in control, control


def test_sequence_that_does_not_split_is_refused_by_name(hf_tiny):
    model = k2jax.load_hf(hf_tiny[0], mesh="context=8", attn_chunk=8)
    with pytest.raises(ConfigError, match="attn_chunk = 8.*64 on 8 context shards"):
        model.logits(np.zeros((1, 64), np.int32))
    with pytest.raises(ConfigError, match="sequence length 40 .* multiple of 16"):
        model.with_execution(attn_chunk=0).logits(np.zeros((1, 40), np.int32))


def test_chunked_prefill_temporaries_stay_flat_in_the_prompt_length():
    """A prefill chunk of 512 tokens against caches of 2K..16K tokens (tiny preset, compiled on CPU): its
    temporaries do not grow with the cache (each doubling at most 2.2x, here 1.0x: key blocks of the latent cache
    in a loop); the cache itself is the donated argument. The positive control: the whole prompt at once as one
    score matrix grows 3x or more per doubling."""
    config, run = k2jax.load_preset("tiny", num_hidden_layers=2, max_position_embeddings=16384)
    model = k2jax.random_model(config, mesh=k2jax.make_mesh("", devices=jax.devices()[:1]), execution=run)
    sampler = model.sampler(prefill_chunk=512)
    i32 = jnp.int32

    def chunk_temps(length):
        cache = jax.eval_shape(lambda s: sampler._empty_fn(s, 1, length), model.state)
        args = (model.state, cache, jax.ShapeDtypeStruct((1, config.vocab_size), jnp.float32),
                jax.ShapeDtypeStruct((1, 512), i32), jax.ShapeDtypeStruct((), i32), jax.ShapeDtypeStruct((1,), i32))
        return sampler._jit_prefill_chunk.lower(*args).compile().memory_analysis().temp_size_in_bytes

    def whole_temps(length):
        args = (model.state, jax.ShapeDtypeStruct((1, length), i32), jax.ShapeDtypeStruct((1,), i32))
        return sampler._jit_prefill.lower(*args, length).compile().memory_analysis().temp_size_in_bytes

    got = {n: chunk_temps(n) for n in (2048, 4096, 8192, 16384)}
    ratios = [got[2 * n] / got[n] for n in (2048, 4096, 8192)]
    assert max(ratios) <= 2.2 and got[16384] <= 1.1 * got[2048], (got, ratios)
    # a whole prompt of whole key blocks attends in causal blocks (at most 2.2x per doubling); the positive
    # control, a length that is not whole blocks, takes one score matrix and grows 3x or more
    assert whole_temps(4096) <= 2.2 * whole_temps(2048)
    assert whole_temps(4088) > 3 * whole_temps(2040)


def test_decode_cache_is_split_over_tensor_and_written_in_place_on_tpu(monkeypatch):
    """A 128K-token decode cache of the tiny preset, compiled for v5p-8 with tensor=4 (batch 1): each chip holds a
    quarter of its positions, and the step gathers no layer stack of it; the positive control, the write left to
    the partitioner (a scatter into the split positions), all-gathers the whole stacked cache."""
    from k2jax import aot
    from k2jax.model import cache as kv_cache
    from k2jax.model.init import param_count

    config = k2jax.load_config("tiny")
    grab = {}
    compile_or_oom = aot._compile_or_oom

    def compiled(lowered):
        grab["c"] = compile_or_oom(lowered)
        return grab["c"]

    monkeypatch.setattr(aot, "_compile_or_oom", compiled)

    def cache_gathers():
        report = aot.compile_decode(config, "v5p-8", "tensor=4", batch=1, context=131072, cache_dtype="bfloat16")
        hlo = grab["c"].as_text()
        stacked = rf"bf16\[{config.num_moe_layers},1,131072,{config.kv_lora_rank}\]"
        return report, len(re.findall(stacked + r"[^\n]*all-gather\(", hlo))

    report, gathers = cache_gathers()
    per_chip = config.num_hidden_layers * 131072 * (config.kv_lora_rank + config.qk_rope_head_dim) * 2 / 4
    weights = param_count(config)[0] * 4  # every weight whole on each chip in float32: an upper bound
    # the cache a quarter per chip, plus at most the weights; a replicated cache (4 quarters) would not fit under it
    assert per_chip < report.argument_bytes < per_chip + weights + 2**20 < 4 * per_chip, (report, per_chip, weights)
    assert gathers == 0
    write = kv_cache.write
    monkeypatch.setattr(kv_cache, "write", lambda *a, **k: write(*a[:5]))  # no seq_axes: a plain scatter
    assert cache_gathers()[1] > 0



def test_prefill_chunk_compiles_for_tpu_against_a_split_cache():
    """`k2jax-compile --mode=prefill`'s step, the last 2048-token chunk of a 32K-token prompt, compiled for v5p-8
    (tiny preset, tensor=4): the tokens it reports are the chunk's, and each chip is given a quarter of the
    cache (the arguments differ from a 16K prompt's by a quarter of the cache's growth, the weights alike)."""
    from k2jax import aot

    config = k2jax.load_config("tiny").replace(max_position_embeddings=32768)
    short, long = (aot.compile_decode(config, "v5p-8", "tensor=4", batch=1, context=n, prefill_chunk=2048)
                   for n in (16384, 32768))
    assert "prefill chunk (2048 tokens x batch 1, the last of a 32768-token cache" in long.mode and long.tokens == 2048
    grown = config.num_hidden_layers * 16384 * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    assert long.argument_bytes - short.argument_bytes == pytest.approx(grown / 4, rel=0.02)
