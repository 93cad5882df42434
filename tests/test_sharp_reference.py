"""Parity on a reference whose attention is sharp, with mutation checks: the logits, each decode step and greedy
generation against HF transformers must fail when the softmax scale is off or the keys' RoPE is one position off.

HF's default initialisation gives near-uniform attention (mean max probability ~0.08 on 64 tokens), where such
errors move the logits by about the tolerance; the reference here scales queries and keys (attention_gain=12) so
that the mean max attention probability is ~0.7, reported in every failure message.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax.model.config import K2Config
from k2jax.model.layers import attention
from k2jax.model.layers.rope import yarn_inv_freq
from k2jax.testing.reference import build_hf_model, hf_logits, mean_max_attention

TOL = 1e-4
GAIN = 12.0


@pytest.fixture(scope="module")
def sharp(tiny_config, tmp_path_factory, tokens_2x64):
    """(k2jax model, torch model, mean max attention probability on tokens_2x64)."""
    folder = str(tmp_path_factory.mktemp("hf_sharp"))
    torch_model = build_hf_model(tiny_config, folder, seed=2, attention_gain=GAIN)
    sharpness = mean_max_attention(torch_model, tokens_2x64)
    assert sharpness >= 0.5, sharpness
    return k2jax.load_hf(folder), torch_model, sharpness


@contextlib.contextmanager
def _mutated(kind, config, monkeypatch):
    """A deliberately wrong k2jax: the softmax scale 5% off, or every key rotated one position further than its
    own (queries untouched: a shift of both would cancel, RoPE being relative)."""
    with monkeypatch.context() as m:
        if kind == "softmax_scale":
            right = K2Config.softmax_scale.fget
            m.setattr(K2Config, "softmax_scale", property(lambda self: 1.05 * right(self)))
        else:
            inv_freq, _ = yarn_inv_freq(config)
            cw, sw = jnp.cos(jnp.asarray(inv_freq)), jnp.sin(jnp.asarray(inv_freq))
            right = attention.apply_rope

            def shifted(x, cos, sin):
                if x.ndim == 3:  # the rope key [b, t, r] (queries are [b, t, h, r]): angle + one position
                    cos, sin = cos * cw - sin * sw, sin * cw + cos * sw
                return right(x, cos, sin)

            m.setattr(attention, "apply_rope", shifted)
        yield


def _decode_logits(model, prompt, steps):
    """(greedy sequence, logits [steps, vocab] of prefill and every decode step but the last) of one prompt."""
    sampler = model.sampler()
    logits, cache, lengths = sampler.prefill([prompt], sampler.check_request([prompt], steps))
    pos, seq, out = jnp.asarray(lengths), list(prompt), []
    for _ in range(steps):
        out.append(np.asarray(logits)[0])
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        seq.append(int(tok[0]))
        with jax.set_mesh(model.mesh):
            logits, cache = sampler.jit_decode_step(model.state, cache, jnp.asarray(tok), pos)
        pos = pos + 1
    return seq, np.stack(out)


@pytest.mark.parametrize("mutation", [None, "softmax_scale", "key_rope_offset"])
def test_sharp_logits_decode_steps_and_greedy_generation(sharp, tokens_2x64, mutation, monkeypatch):
    """The three comparisons pass on the sharp reference, and each mutation makes every one of them fail."""
    import torch

    model, torch_model, sharpness = sharp
    ctx = contextlib.nullcontext() if mutation is None else _mutated(mutation, model.config, monkeypatch)
    with ctx:
        model = model.with_execution()  # a fresh graph: nothing compiled before the mutation is reused
        logits = np.asarray(model.logits(tokens_2x64))
        prompt = [int(t) for t in tokens_2x64[0, :12]]
        seq, steps = _decode_logits(model, prompt, 16)
        generated = model.generate([prompt], max_new_tokens=16, stop=[])[0]
    ref_logits = hf_logits(torch_model, tokens_2x64)
    ref_steps = hf_logits(torch_model, np.array([seq[:-1]]))[0][len(prompt) - 1:]
    ref_generated = torch_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                         min_new_tokens=16, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    diffs = {"logits": np.abs(logits - ref_logits).max(), "decode steps": np.abs(steps - ref_steps).max()}
    where = f"mean max attention probability of the reference {sharpness:.2f}; max |diff| {diffs}"
    if mutation is None:
        assert max(diffs.values()) <= TOL, where
        assert generated == ref_generated, where
    else:  # each comparison must catch it
        assert min(diffs.values()) > 10 * TOL, f"{mutation} not caught: {where}"
        assert generated != ref_generated, f"{mutation} not caught by greedy generation: {where}"


@pytest.mark.parametrize("stage", ["long_context", "pretraining"])
def test_logits_near_the_maximum_position_match_transformers(stage, tiny_config, tmp_path, tokens_2x64):
    """K2's two stages at the tiny shape: YaRN (the tiny preset: factor 4 over 1,024 positions; kimi_k2: 32 over
    4,096) and plain RoPE at the original context (kimi_k2_4k). On a sharp reference, the logits of the last 64
    positions below the configured maximum equal transformers' to 1e-4; the same weights run with the other
    stage's rotary settings do not."""
    import torch

    if stage == "long_context":
        config, other = tiny_config, dict(rope_type="default", rope_factor=1.0)
    else:
        config = tiny_config.replace(rope_type="default", rope_factor=1.0, max_position_embeddings=1024)
        other = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=256)
    folder = str(tmp_path / "hf")
    torch_model = build_hf_model(config, folder, seed=4, attention_gain=GAIN)
    sharpness = mean_max_attention(torch_model, tokens_2x64)
    t = tokens_2x64.shape[1]
    pos = np.broadcast_to(np.arange(config.max_position_embeddings - t, config.max_position_embeddings), (2, t))
    with torch.no_grad():
        want = torch_model(torch.as_tensor(tokens_2x64), position_ids=torch.as_tensor(pos.copy())).logits.numpy()
    model = k2jax.load_hf(folder)
    assert model.config.uses_yarn == (stage == "long_context")
    err = float(np.abs(np.asarray(model.logits(tokens_2x64, positions=pos)) - want).max())
    assert err <= TOL, f"{stage}: max logit error {err:.2e} at positions up to {pos.max()} (mean max attention {sharpness:.2f})"
    wrong = k2jax.load_hf(folder, **other)
    bad = float(np.abs(np.asarray(wrong.logits(tokens_2x64, positions=pos)) - want).max())
    assert bad > 100 * TOL, f"the other stage's rope went unnoticed: {bad:.2e} (mean max attention {sharpness:.2f})"
