"""Blockwise (flash-style) causal MLA attention: query chunks, each an online softmax over the key blocks up to
its own (later blocks are skipped), forward and backward, so no step holds more than a chunk x block of scores.

Queries have a per-head part (q_nope, against the keys expanded from the latent) and a rotary part (q_rope,
against the rope key shared by every head); values are per head. Both passes are loops (lax.fori_loop) over
chunks and blocks, so the compiled program does not grow with the sequence and blocks run one after another.
The backward pass recomputes each block's probabilities from the saved log-sum-exp (a custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name


def _scores(qn, qr, kn, kr, scale):
    """Scaled float32 scores [b, h, c, k] of a query chunk against a key block."""
    s = jnp.einsum("bthn,bshn->bhts", qn, kn, preferred_element_type=jnp.float32)
    s += jnp.einsum("bthr,bsr->bhts", qr, kr.astype(qr.dtype), preferred_element_type=jnp.float32)
    return s * scale


def _mask(seg_q, seg_k, q0, k0):
    """[b, 1, c, k]: causal (query q0 + i sees key k0 + j when k0 + j <= q0 + i) and within one segment."""
    c, k = seg_q.shape[1], seg_k.shape[1]
    causal = (q0 + jnp.arange(c))[:, None] >= (k0 + jnp.arange(k))[None, :]
    return causal[None, None] & (seg_q[:, None, :, None] == seg_k[:, None, None, :])


def _at(x, start, size, axis=1):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def online_softmax_step(m, l, acc, s, v):
    """One key block of an online softmax: running max m [b,h,t], sum l [b,h,t] and output acc [b,t,h,v]
    (float32) updated with masked scores s [b,h,t,k] (-inf where hidden) and the block's values v [b,k,h,v]."""
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing visible yet stays at zero
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    pv = jnp.einsum("bhts,bshv->bthv", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc * jnp.swapaxes(corr, 1, 2)[..., None] + pv


def _forward(qn, qr, kn, kr, v, seg_q, seg_k, q_off, c, scale):
    b, t, h, _ = qn.shape
    vd = v.shape[-1]

    def chunk(j, carry):
        out, lse, max_logit = carry
        q0 = j * c
        qn_j, qr_j, seg_j = _at(qn, q0, c), _at(qr, q0, c), _at(seg_q, q0, c)

        def block(i, st):
            m, l, acc, max_logit = st
            k0 = i * c
            s = _scores(qn_j, qr_j, _at(kn, k0, c), _at(kr, k0, c), scale)
            mask = _mask(seg_j, _at(seg_k, k0, c), q_off + q0, k0)
            real = mask & (seg_j != 0)[:, None, :, None]  # padding attends within itself, but is no statistic
            max_logit = jnp.maximum(max_logit, jnp.max(jnp.where(real, s, -jnp.inf), axis=(0, 2, 3)))
            return (*online_softmax_step(m, l, acc, jnp.where(mask, s, -jnp.inf), _at(v, k0, c)), max_logit)

        init = (jnp.full((b, h, c), -jnp.inf, jnp.float32), jnp.zeros((b, h, c), jnp.float32),
                jnp.zeros((b, c, h, vd), jnp.float32), max_logit)
        # key blocks up to the chunk's own: the later ones are causally masked, skipped
        m, l, acc, max_logit = lax.fori_loop(0, q_off // c + j + 1, block, init)
        o = acc / jnp.swapaxes(l, 1, 2)[..., None]  # every query sees at least itself: l > 0
        out = lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), q0, 1)
        lse = lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), q0, 2)
        return out, lse, max_logit

    init = (jnp.zeros((b, t, h, vd), v.dtype), jnp.zeros((b, h, t), jnp.float32), jnp.full((h,), -jnp.inf))
    return lax.fori_loop(0, t // c, chunk, init)


def blockwise_attention(qn, qr, kn, kr, v, seg, c: int, scale: float):
    """(out [b, t, h, v], max pre-softmax logit per head [h]) of causal attention within segments: q_nope
    [b, t, h, n] against k_nope [b, t, h, n], q_rope [b, t, h, r] against the shared k_rope [b, t, r], values
    [b, t, h, v]; seg [b, t] segment ids (0: padding, attending within itself, left out of the max logit).
    Query chunks and key blocks of c tokens (t % c == 0)."""
    return blockwise_attention_at(qn, qr, kn, kr, v, seg, seg, jnp.int32(0), c, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def blockwise_attention_at(qn, qr, kn, kr, v, seg_q, seg_k, q_off, c: int, scale: float):
    """blockwise_attention of queries [b, tq, ...] that sit at positions q_off.. of the keys' sequence [b, tk, ...]
    (seg_q [b, tq], seg_k [b, tk]; q_off, which may be traced, a multiple of c): a context-parallel shard's
    piece of the sequence against every key. Key blocks past each query chunk are skipped."""
    out, _, max_logit = _forward(qn, qr, kn, kr, v, seg_q, seg_k, q_off, c, scale)
    return out, max_logit


def _fwd(qn, qr, kn, kr, v, seg_q, seg_k, q_off, c, scale):
    out, lse, max_logit = _forward(qn, qr, kn, kr, v, seg_q, seg_k, q_off, c, scale)
    # named, so that a remat policy that saves them (save_moe_attn) does not run the forward's blocks again
    out, lse = checkpoint_name(out, "attn_out"), checkpoint_name(lse, "attn_lse")
    return (out, max_logit), (qn, qr, kn, kr, v, seg_q, seg_k, q_off, out, lse)


def _bwd(c, scale, res, cts):
    qn, qr, kn, kr, v, seg_q, seg_k, q_off, out, lse = res
    f32 = jnp.float32
    d_out = cts[0].astype(f32)  # the max logit is a statistic: no gradient flows through it
    delta = jnp.swapaxes(jnp.sum(d_out * out.astype(f32), -1), 1, 2)  # [b, h, t]
    t = qn.shape[1]

    def chunk(j, carry):
        dqn, dqr, dkn, dkr, dv = carry
        q0 = j * c
        qn_j, qr_j, seg_j, do_j = _at(qn, q0, c), _at(qr, q0, c), _at(seg_q, q0, c), _at(d_out, q0, c)
        lse_j, delta_j = _at(lse, q0, c, 2), _at(delta, q0, c, 2)

        def block(i, st):
            dqn_j, dqr_j, dkn, dkr, dv = st
            k0 = i * c
            knb, krb, vb = _at(kn, k0, c), _at(kr, k0, c), _at(v, k0, c)
            s = _scores(qn_j, qr_j, knb, krb, scale)
            p = jnp.where(_mask(seg_j, _at(seg_k, k0, c), q_off + q0, k0), jnp.exp(s - lse_j[..., None]), 0.0)
            ds = p * (jnp.einsum("bthv,bshv->bhts", do_j, vb.astype(f32)) - delta_j[..., None]) * scale
            dqn_j += jnp.einsum("bhts,bshn->bthn", ds, knb.astype(f32))
            dqr_j += jnp.einsum("bhts,bsr->bthr", ds, krb.astype(f32))

            def add(acc, upd):
                return lax.dynamic_update_slice_in_dim(acc, _at(acc, k0, c) + upd, k0, 1)

            dkn = add(dkn, jnp.einsum("bhts,bthn->bshn", ds, qn_j.astype(f32)))
            dkr = add(dkr, jnp.einsum("bhts,bthr->bsr", ds, qr_j.astype(f32)))
            dv = add(dv, jnp.einsum("bhts,bthv->bshv", p, do_j))
            return dqn_j, dqr_j, dkn, dkr, dv

        init = (jnp.zeros(qn_j.shape, f32), jnp.zeros(qr_j.shape, f32), dkn, dkr, dv)
        dqn_j, dqr_j, dkn, dkr, dv = lax.fori_loop(0, q_off // c + j + 1, block, init)
        dqn = lax.dynamic_update_slice_in_dim(dqn, dqn_j, q0, 1)
        dqr = lax.dynamic_update_slice_in_dim(dqr, dqr_j, q0, 1)
        return dqn, dqr, dkn, dkr, dv

    zeros = tuple(jnp.zeros(x.shape, f32) for x in (qn, qr, kn, kr, v))
    dqn, dqr, dkn, dkr, dv = lax.fori_loop(0, t // c, chunk, zeros)
    grads = dqn.astype(qn.dtype), dqr.astype(qr.dtype), dkn.astype(kn.dtype), dkr.astype(kr.dtype), dv.astype(v.dtype)
    return (*grads, None, None, None)


blockwise_attention_at.defvjp(_fwd, _bwd)
