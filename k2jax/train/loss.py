"""Next-token cross-entropy in float32, chunked over the vocabulary, with optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def vocab_chunk(vocab: int, target: int = 8192) -> int:
    """The largest divisor of vocab that is <= target (163840 -> 8192)."""
    for c in range(min(target, vocab), 0, -1):
        if vocab % c == 0:
            return c
    return vocab


def chunked_cross_entropy(h_nd: jax.Array, kernel_vd: jax.Array, targets_n: jax.Array, mask_n: jax.Array,
                          *, dtype=jnp.float32, chunk: int = 8192):
    """(sum of masked token losses, sum of masked logsumexp², max |logit|) for hidden states [n, d], lm_head [v, d].

    Logits are made one vocabulary chunk at a time (a scan whose body is rematerialised in the backward
    pass), so [n, vocab] is never held at once; everything is accumulated in float32. A chunk of the whole
    vocabulary (chunk >= vocab) keeps its logits for the backward pass instead of recomputing them.
    """
    n, d = h_nd.shape
    v = kernel_vd.shape[0]
    c = vocab_chunk(v, chunk)
    k_cvd = kernel_vd.reshape(v // c, c, d)
    h = h_nd.astype(dtype)

    def body(carry, inp):
        m, s, tgt, mx = carry
        i, k_vd = inp
        logits = jnp.einsum("nd,vd->nv", h, k_vd.astype(dtype), preferred_element_type=jnp.float32)
        new_m = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - new_m) + jnp.exp(logits - new_m[:, None]).sum(-1)
        local = targets_n - i * c
        hit = (local >= 0) & (local < c)
        tgt = tgt + jnp.where(hit, jnp.take_along_axis(logits, jnp.clip(local, 0, c - 1)[:, None], -1)[:, 0], 0.0)
        mx = jnp.maximum(mx, jnp.abs(logits).max())
        return (new_m, s, tgt, mx), None

    if v // c > 1:
        body = jax.checkpoint(body)
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((), jnp.float32))
    (m, s, tgt, mx), _ = jax.lax.scan(body, init, (jnp.arange(v // c), k_cvd))
    lse = m + jnp.log(s)
    mask = mask_n.astype(jnp.float32)
    return ((lse - tgt) * mask).sum(), (jnp.square(lse) * mask).sum(), jax.lax.stop_gradient(mx)


def next_token_targets(tokens_bt: jax.Array, segment_ids_bt: jax.Array | None):
    """(targets [b, t], mask [b, t]): token t+1 where it continues the same document, else masked."""
    targets = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros_like(tokens_bt[:, :1])], axis=1)
    if segment_ids_bt is None:
        mask = jnp.ones(tokens_bt.shape, bool).at[:, -1].set(False)
    else:
        nxt = jnp.concatenate([segment_ids_bt[:, 1:], jnp.zeros_like(segment_ids_bt[:, :1])], axis=1)
        mask = (segment_ids_bt == nxt) & (segment_ids_bt != 0)
    return targets, mask
