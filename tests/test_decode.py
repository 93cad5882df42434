"""Decoding with the absorbed latent cache: HF greedy parity, per-step logits, sampling controls, errors."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax.inference.sampler import DecodeError

PROMPT_LENS = (5, 17, 9)


@pytest.fixture(scope="module")
def model(hf_tiny):
    return k2jax.load_hf(hf_tiny[0])


@pytest.fixture(scope="module")
def prompts(tiny_config):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 3800, n).tolist() for n in PROMPT_LENS]


def test_greedy_matches_transformers_generate(model, hf_tiny, prompts):
    import torch

    outs = model.generate(prompts, max_new_tokens=32, stop=[])
    for p, o in zip(prompts, outs):
        ref = hf_tiny[1].generate(torch.tensor([p]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                  eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o == ref


@pytest.mark.parametrize("layout", [None, "data=2,expert=2,tensor=2"])
def test_each_decode_step_equals_a_full_forward(hf_tiny, model, prompts, layout):
    m = model if layout is None else k2jax.load_hf(hf_tiny[0], mesh=layout)
    sampler = m.sampler()
    max_len = sampler.check_request(prompts, 12)
    logits, cache, lengths = sampler.prefill(prompts + [prompts[-1]] * (-len(prompts) % 2 if layout else 0), max_len)
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    pos = jax.numpy.asarray(lengths)
    got = []
    for step in range(12):
        got.append(np.asarray(logits)[:n])
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        for i in range(n):
            seqs[i].append(int(tok[i]))
        with jax.set_mesh(m.mesh):
            logits, cache = sampler.jit_decode_step(m.state, cache, jax.numpy.asarray(tok), pos)
        pos = pos + 1
    # causal attention: the full forward's logits at position p are those of the forward over the prefix [:p+1]
    for i, s in enumerate(seqs):
        full = np.asarray(model.logits(np.array([s[:-1]])))[0]
        want = full[len(prompts[i]) - 1:]
        np.testing.assert_allclose(np.stack([g[i] for g in got]), want, atol=1e-4, rtol=0)
    c = m.config
    for entry in cache.values():
        assert entry["latent"].shape[-1] + entry["k_rope"].shape[-1] == c.kv_lora_rank + c.qk_rope_head_dim
        assert set(entry) == {"latent", "k_rope"}  # nothing per head is cached
    assert sampler.cache_bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_sampling_controls(model, prompts):
    kw = dict(max_new_tokens=10, stop=[])
    greedy = model.generate(prompts, **kw)
    assert model.generate(prompts, temperature=1.0, top_k=1, seed=3, **kw) == greedy
    a = model.generate(prompts, temperature=1.0, top_p=0.9, seed=7, **kw)
    assert model.generate(prompts, temperature=1.0, top_p=0.9, seed=7, **kw) == a
    assert model.generate(prompts, temperature=1.0, seed=8, **kw) != model.generate(prompts, temperature=1.0, seed=9, **kw)


def test_stop_tokens_end_sequences_independently(model, prompts):
    full = model.generate(prompts, max_new_tokens=12, stop=[])
    stop_tok = full[1][4]  # the 5th token of the second sequence
    outs = model.generate(prompts, max_new_tokens=12, stop=[stop_tok])
    for f, o in zip(full, outs):
        cut = f.index(stop_tok) + 1 if stop_tok in f else len(f)
        assert o == f[:cut]
    assert len(outs[1]) == 5
    per_seq = model.generate(prompts, max_new_tokens=12, stop=[[full[0][2]], [], []])
    assert per_seq[0] == full[0][:3] and per_seq[1] == full[1] and per_seq[2] == full[2]


def test_device_loop_equals_streamed_loop(model, prompts):
    """generate() without a stream runs one lax.while_loop on device; with one, a host loop: same tokens."""
    full = model.generate(prompts, max_new_tokens=12, stop=[])
    for kw in (dict(stop=[full[1][4]]), dict(temperature=0.8, top_p=0.9, seed=5, stop=[full[0][3]])):
        steps = []
        streamed = model.generate(prompts, max_new_tokens=12, stream=lambda i, t, d: steps.append(i), **kw)
        assert model.generate(prompts, max_new_tokens=12, **kw) == streamed
        assert steps == list(range(len(steps))) and max(map(len, streamed)) == len(steps)


def _teacher_forced_logits(model, prompts, cache_dtype, tokens=None, steps=10, corrupt=False):
    """(logits [steps+1, b, v] of prefill and each decode step, the tokens fed, the cache after prefill): greedy
    tokens, or `tokens` fed instead (so every cache dtype sees the same sequence); `corrupt` doubles the int8
    scales before each step (a wrong dequantisation)."""
    s = model.sampler(cache_dtype)
    logits, cache, lengths = s.prefill(prompts, s.check_request(prompts, steps))
    prefilled = jax.tree.map(np.asarray, cache)  # the decode step donates the cache
    pos, out, fed = jax.numpy.asarray(lengths), [np.asarray(logits)], []
    for i in range(steps):
        tok = np.asarray(logits).argmax(-1).astype(np.int32) if tokens is None else tokens[i]
        fed.append(tok)
        if corrupt:
            cache = {k: {n: a * 2 if n.endswith("_scale") else a for n, a in v.items()} for k, v in cache.items()}
        with jax.set_mesh(model.mesh):
            logits, cache = s.jit_decode_step(model.state, cache, jax.numpy.asarray(tok), pos)
        pos = pos + 1
        out.append(np.asarray(logits))
    return np.stack(out), fed, prefilled


def test_low_precision_caches_stay_within_their_quantisation_bound(model, prompts):
    """bfloat16 and int8 caches against the float32 cache, teacher-forced on the same tokens: the logits' RMS error
    relative to their spread is within 2·layers·eps, eps the cache's own relative quantisation error (bf16's
    rounding, int8's per-row step), measured on the prefilled cache: each layer reads keys and values from it once,
    and a relative error in either moves that layer's attention output by at most about as much, first order.
    A dequantisation with the scales doubled breaks the bound (positive control)."""
    ref, tokens, c32 = _teacher_forced_logits(model, prompts, "float32")
    layers = model.config.num_hidden_layers
    for dtype in ("bfloat16", "int8"):
        got, _, cache = _teacher_forced_logits(model, prompts, dtype, tokens)
        num = den = 0.0
        for name, entry in cache.items():
            for part in ("latent", "k_rope"):
                x = entry[part].astype(np.float64) * entry.get(f"{part}_scale", 1.0)
                num += ((x - c32[name][part]) ** 2).sum()
                den += (c32[name][part].astype(np.float64) ** 2).sum()
        eps = np.sqrt(num / den)
        rel = np.sqrt(np.mean((got - ref) ** 2)) / np.std(ref)
        assert 0 < rel <= 2 * layers * eps, (dtype, rel, eps)
        assert eps < (0.01 if dtype == "int8" else 0.004), (dtype, eps)  # ~1/254 per row; bf16 ~2^-9
    bad = _teacher_forced_logits(model, prompts, "int8", tokens, corrupt=True)[0]
    assert np.sqrt(np.mean((bad - ref) ** 2)) / np.std(ref) > 2 * layers * eps
    assert model.sampler("int8").cache_bytes_per_token() < model.sampler("bfloat16").cache_bytes_per_token()


def test_request_errors(model, small_tokenizer):
    with pytest.raises(DecodeError, match="exceeds the model's context"):
        model.generate([[1, 2, 3]], max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(DecodeError, match=r"prompts\[0\] has token ids outside"):
        model.generate([[1, 99999]])
    from k2jax.text.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="vocab_size"):
        k2jax.Model(model.config.replace(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3),
                    model.graphdef, model.state, model.mesh, model.rules).attach_tokenizer(small_tokenizer)


def test_string_prompts_with_tokenizer(model, small_tokenizer):
    m = k2jax.Model(model.config, model.graphdef, model.state, model.mesh, model.rules).attach_tokenizer(small_tokenizer)
    out = m.generate(["Hello world", "def f(x):"], max_new_tokens=5, stop=[])
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def _expert_copies(hlo_text: str, d: int, f: int) -> list[str]:
    """Instructions of a compiled program that hold more than one expert's [d, f] / [f, d] kernel (aliases aside)."""
    copies = []
    for line in hlo_text.splitlines():
        found = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]+)\]\S* ([\w-]+)\(", line)
        if found and found.group(2) not in ("parameter", "get-tuple-element", "bitcast"):  # aliases, not copies
            dims = [int(v) for v in found.group(1).split(",")]
            if dims[-2:] in ([d, f], [f, d]) and math.prod(dims[:-2]) > 1:
                copies.append(line.strip()[:160])
    return copies


def _compiled_sampler(model, prompts, max_new=4):
    """The compiled prefill and decode step of `model`'s sampler for `prompts`."""
    sampler = model.sampler()
    max_len = sampler.check_request(prompts, max_new)
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    _, cache, _ = sampler.prefill(prompts, max_len)
    with jax.set_mesh(model.mesh):
        return {"prefill": sampler._jit_prefill.lower(model.state, tokens, lengths, max_len).compile(),
                "decode": sampler.jit_decode_step.lower(model.state, cache, lengths, lengths).compile()}


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_decode_reads_each_chosen_expert_in_place(model, prompts, compute):
    """The compiled prefill and decode step never hold more than one expert's kernel at a time: no layer's
    [e, d, f] experts sliced out of the stack, no [t, k, d, f] gather of every assignment's kernels, and with
    float32 parameters and bfloat16 compute no conversion of the whole stacks."""
    if compute != "float32":
        model = k2jax.random_model(model.config, execution=model.execution.replace(param_dtype="float32",
                                                                                   dtype=compute))
    c = model.config
    for name, exe in _compiled_sampler(model, prompts).items():
        assert not _expert_copies(exe.as_text(), c.hidden_size, c.moe_intermediate_size), name


def test_expert_copy_check_flags_programs_that_copy_experts(model, prompts, tokens_2x64):
    """Positive controls of the check above: decoding with moe_impl='gather' (every assignment's kernels gathered)
    and the full forward without a cache (the scan over layers slices each layer's experts) are flagged."""
    c = model.config
    d, f = c.hidden_size, c.moe_intermediate_size
    gather = model.with_execution(moe_impl="gather")
    assert _expert_copies(_compiled_sampler(gather, prompts)["decode"].as_text(), d, f)
    with jax.set_mesh(model.mesh):
        full = model._forward.lower(model.state, tokens_2x64, None, None).compile()
    assert _expert_copies(full.as_text(), d, f)


def _cache_copies(exe, cache) -> list[str]:
    """`copy` instructions of a compiled program whose result is a whole stacked cache array."""
    shapes = {tuple(v.shape) for entry in cache.values() for v in entry.values()}
    out = []
    for line in exe.as_text().splitlines():
        found = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]+)\]\S* copy\(", line)
        if found and tuple(int(v) for v in found.group(1).split(",")) in shapes:
            out.append(line.strip()[:120])
    return out


def test_decode_step_writes_the_donated_cache_in_place(model, prompts):
    """The decode step's cache is donated (each cache array aliased to an output) and updated in place: no copy
    of a whole cache array. Positive control: the same step compiled without donation copies every one."""
    sampler = model.sampler()
    _, cache, lengths = sampler.prefill(prompts, sampler.check_request(prompts, 4))
    pos = jax.numpy.asarray(lengths)
    n_arrays = sum(len(entry) for entry in cache.values())
    with jax.set_mesh(model.mesh):
        donated = sampler.jit_decode_step.lower(model.state, cache, pos, pos).compile()
        kept = jax.jit(sampler._decode_fn).lower(model.state, cache, pos, pos).compile()
    header = donated.as_text().splitlines()[0]
    assert header.count("may-alias") == n_arrays, header[:400]
    assert not _cache_copies(donated, cache)
    assert "may-alias" not in kept.as_text().splitlines()[0]
    assert len(_cache_copies(kept, cache)) == n_arrays


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.6), (0.5, 0, 1.0)])
def test_sampling_draws_from_the_renormalised_tempered_distribution(temperature, top_k, top_p):
    """200k draws from fixed logits: every draw lies in the top-k / nucleus set computed in float64 (the
    smallest prefix of the sorted probabilities whose mass reaches top_p), every token of that set is drawn, and
    the frequencies pass a chi-square test (p > 1e-4) against the tempered softmax renormalised on it; the same
    test rejects the untempered distribution (positive control)."""
    from scipy import stats

    from k2jax.inference.sampler import SamplingParams, sample_logits

    rng = np.random.default_rng(7)
    v, n = 24, 200_000
    logits = rng.normal(0, 1.5, v)

    def target(temp):
        z = logits / temp
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)
        keep = np.zeros(v, bool)
        keep[order[: top_k or v]] = True
        if top_p < 1.0:
            q = p[order] * keep[order]
            q /= q.sum()
            nucleus = (np.cumsum(q) - q) < top_p
            keep[:] = False
            keep[order[nucleus]] = True
        out = np.where(keep, p, 0.0)
        return out / out.sum()

    want = target(temperature)
    draws = np.asarray(sample_logits(jax.numpy.asarray(np.tile(logits, (n, 1)), np.float32), jax.random.key(3),
                                     SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)))
    counts = np.bincount(draws, minlength=v)
    support = want > 0
    assert set(np.nonzero(counts)[0]) == set(np.nonzero(support)[0])
    expected = want[support] * n
    assert stats.chisquare(counts[support], expected).pvalue > 1e-4
    if temperature != 1.0:
        wrong = target(1.0)[support]
        assert stats.chisquare(counts[support], wrong / wrong.sum() * n).pvalue < 1e-6


def test_chunked_prefill_equals_one_full_forward(model, prompts):
    """Prompts written into the cache 5 tokens at a time (a shorter last chunk included): each prompt's next-token
    logits equal one full forward's to 1e-4 and the greedy continuation is the one-shot prefill's. Positive
    control: the last chunk's tokens alone (no earlier context) give other logits."""
    long = [p * 3 for p in prompts]
    sampler = model.sampler(prefill_chunk=5)
    logits, _, lengths = sampler.prefill(long, sampler.check_request(long, 8))
    assert list(lengths) == [len(p) for p in long] and max(lengths) % 5 and max(lengths) > 10
    for i, p in enumerate(long):
        want = np.asarray(model.logits(np.asarray([p])))[0, -1]
        np.testing.assert_allclose(np.asarray(logits[i]), want, rtol=0, atol=1e-4)
        tail = len(p) - (len(p) - 1) // 5 * 5  # the tokens of the chunk holding the last one
        alone = np.asarray(model.logits(np.asarray([p[-tail:]]), positions=np.arange(len(p) - tail, len(p))[None]))
        assert np.abs(alone[0, -1] - want).max() > 1e-2
    assert model.generate(long, max_new_tokens=8, prefill_chunk=5) == model.generate(long, max_new_tokens=8)


def test_whole_prompt_prefill_attends_in_causal_blocks(model):
    """A whole prompt whose padded length is whole key blocks (384 tokens: 3 of 128) is prefilled by the blockwise
    kernel over its own keys (causal blocks only): each prompt's next-token logits equal one full forward's to
    1e-4 and the greedy continuation is the chunk-by-chunk one's. The compiled prefill holds no [t, t] score
    matrix, which the positive control, a 383-token prompt (one matrix), does."""
    rng = np.random.default_rng(5)
    long = [rng.integers(0, 3800, 384).tolist(), rng.integers(0, 3800, 300).tolist()]
    sampler = model.sampler(prefill_chunk=0)
    logits, _, _ = sampler.prefill(long, sampler.check_request(long, 4))
    for i, p in enumerate(long):
        want = np.asarray(model.logits(np.asarray([p])))[0, -1]
        np.testing.assert_allclose(np.asarray(logits[i]), want, rtol=0, atol=1e-4)
    assert model.generate(long, max_new_tokens=4, prefill_chunk=0) == model.generate(long, max_new_tokens=4,
                                                                                      prefill_chunk=100)

    def scores_of(t):
        args = (model.state, jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
        with jax.set_mesh(model.mesh):
            hlo = sampler._jit_prefill.lower(*args, 512).compile().as_text()
        return re.findall(rf"f32\[1,{model.config.num_attention_heads},{t},{t}\]", hlo)

    assert not scores_of(384) and scores_of(383)
