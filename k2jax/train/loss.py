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
                          *, dtype=jnp.float32, chunk: int = 8192, accuracy: bool = False):
    """(sum of masked token losses, sum of masked logsumexp², max |logit|) for hidden states [n, d], lm_head [v, d];
    with `accuracy`, also the number of masked tokens whose target is the arg-max logit (the first on ties).

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
        m, s, tgt, mx, arg = carry
        i, k_vd = inp
        logits = jnp.einsum("nd,vd->nv", h, k_vd.astype(dtype), preferred_element_type=jnp.float32)
        chunk_max = logits.max(-1)
        new_m = jnp.maximum(m, chunk_max)
        s = s * jnp.exp(m - new_m) + jnp.exp(logits - new_m[:, None]).sum(-1)
        local = targets_n - i * c
        hit = (local >= 0) & (local < c)
        tgt = tgt + jnp.where(hit, jnp.take_along_axis(logits, jnp.clip(local, 0, c - 1)[:, None], -1)[:, 0], 0.0)
        mx = jnp.maximum(mx, jnp.abs(logits).max())
        if accuracy:  # a later chunk wins only with a strictly larger maximum: the first arg-max overall
            arg = jnp.where(chunk_max > m, jnp.argmax(logits, -1).astype(jnp.int32) + i * c, arg)
        return (new_m, s, tgt, mx, arg), None

    if v // c > 1:
        body = jax.checkpoint(body)
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((), jnp.float32), jnp.zeros((n,), jnp.int32))
    (m, s, tgt, mx, arg), _ = jax.lax.scan(body, init, (jnp.arange(v // c), k_cvd))
    lse = m + jnp.log(s)
    mask = mask_n.astype(jnp.float32)
    out = ((lse - tgt) * mask).sum(), (jnp.square(lse) * mask).sum(), jax.lax.stop_gradient(mx)
    return out + ((jnp.where(arg == targets_n, mask, 0.0)).sum(),) if accuracy else out


def next_token_targets(tokens_bt: jax.Array, segment_ids_bt: jax.Array | None, weights_bt: jax.Array | None = None):
    """(targets [b, t], mask [b, t]): token t+1 where it continues the same document (and, with loss weights,
    where the target token's weight is non-zero: chat SFT trains on the assistant's tokens only), else masked."""
    def shift(x):
        return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)

    targets = shift(tokens_bt)
    if segment_ids_bt is None:
        mask = jnp.ones(tokens_bt.shape, bool).at[:, -1].set(False)
    else:
        mask = (segment_ids_bt == shift(segment_ids_bt)) & (segment_ids_bt != 0)
    if weights_bt is not None:
        mask = mask & (shift(weights_bt) != 0)
    return targets, mask
