"""The per-block pieces of the grouped expert matmul: reading one expert's kernels (and adapters) in place,
one expert's SwiGLU over a block of rows, the loop over blocks, and the LoRA forms (a LoRA run's experts with
their adapters: on row blocks with a custom backward, or as ragged products)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.model.layers.lora import dropout


def kernel(w, layer, e, dtype):
    """Expert e's kernel read in place from w [e, ...], or from w [layers, e, ...] at `layer`, in `dtype` (cast
    after the read, so stacked kernels are never converted whole)."""
    return (w[e] if layer is None else w[layer, e]).astype(dtype)


class ExpertLora(NamedTuple):
    """The routed experts' adapters: A [e, in, r] and B [e, r, out] of the gate, up and down kernels (or stacked
    over layers, [layers, e, ...]) and the dropout key (or None); the scale alpha/r and the dropout rate go apart
    (static)."""

    ag: jax.Array
    bg: jax.Array
    au: jax.Array
    bu: jax.Array
    ad: jax.Array
    bd: jax.Array
    key: jax.Array | None = None


def adapted(x, w, a, b, scale: float, rate: float, key):
    """x·w + scale·(dropout(x)·a)·b for one expert's kernel w and adapter factors a, b (None: no adapter)."""
    y = jnp.dot(x, w, preferred_element_type=x.dtype)
    if a is None:
        return y
    xd = dropout(x, rate, key)
    return y + (jnp.dot(jnp.dot(xd, a, preferred_element_type=x.dtype), b, preferred_element_type=x.dtype)
                * scale).astype(x.dtype)


def swiglu_one(x, r, base, lo, scale: float = 1.0, rate: float = 0.0, key=None):
    """r·SwiGLU(x) of one expert's rows x [b, d] with its kernels base = (wg, wu, wd) [d, f], [d, f], [f, d] and
    adapters lo = (ag, bg, au, bu, ad, bd) or None (each read in x's dtype)."""
    dt = x.dtype
    wg, wu, wd = (w.astype(dt) for w in base)
    ag, bg, au, bu, ad, bd = (None,) * 6 if lo is None else (a.astype(dt) for a in lo)
    kg, ku, kd = (None,) * 3 if key is None else jax.random.split(key, 3)
    g = adapted(x, wg, ag, bg, scale, rate, kg)
    u = adapted(x, wu, au, bu, scale, rate, ku)
    h = jax.nn.silu(g) * u * r[:, None]
    return adapted(h, wd, ad, bd, scale, rate, kd)


def lora_at(lora: ExpertLora | None, layer, e):
    """Expert e's six adapter factors (float32, read in place), or None."""
    if lora is None:
        return None
    return tuple(a[e] if layer is None else a[layer, e] for a in lora[:6])


def scan_blocks(fn, n_used, xs, init_carry=None, unroll=1):
    """scan over blocks i = 0..n-1 of fn(carry, i, *x_i) -> (carry, y_i), skipping blocks i >= n_used."""
    n = xs[0].shape[0]

    def body(carry, inp):
        i, *x = inp
        y_shape = jax.eval_shape(lambda c, *a: fn(c, i, *a)[1], carry, *x)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), y_shape)
        return jax.lax.cond(i < n_used, lambda c: fn(c, i, *x), lambda c: (c, zeros), carry)

    return jax.lax.scan(body, init_carry, (jnp.arange(n),) + tuple(xs), unroll=n if unroll == 0 else unroll)


def blocks_forward(x_nbd, r_nb, wg, wu, wd, block_expert, n_used, unroll=1, layer=None, lora=None, scale=1.0,
                    rate=0.0):
    """block_swiglu's value, not differentiable for stacked kernels (wg [layers, e, d, f] read at `layer`); with
    `lora`, each block adds its expert's adapters (dropout keyed by the block)."""
    def fn(carry, i, x, r, e):
        base = tuple(kernel(w, layer, e, x.dtype) for w in (wg, wu, wd))
        key = None if lora is None or lora.key is None else jax.random.fold_in(lora.key, i)
        return carry, swiglu_one(x, r, base, lora_at(lora, layer, e), scale, rate, key)

    return scan_blocks(fn, n_used, (x_nbd, r_nb, block_expert), unroll=unroll)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def block_swiglu_lora(x_nbd, r_nb, base, lora: ExpertLora, block_expert, n_used, scale, rate, unroll=1):
    """block_swiglu with the experts' adapters (the base kernels (wg, wu, wd) frozen): [n, b, d] -> [n, b, d].

    The backward pass goes block by block again: each block's vector-Jacobian product gives its rows'
    gradient and its expert's adapter gradients, accumulated in place into [e, ...]; no base-kernel gradient is
    formed (a LoRA run never trains the base), and nothing per row is kept but the block inputs.
    """
    return blocks_forward(x_nbd, r_nb, *base, block_expert, n_used, unroll, None, lora, scale, rate)


def _block_swiglu_lora_fwd(x_nbd, r_nb, base, lora, block_expert, n_used, scale, rate, unroll):
    y = blocks_forward(x_nbd, r_nb, *base, block_expert, n_used, unroll, None, lora, scale, rate)
    return y, (x_nbd, r_nb, base, lora, block_expert, n_used)


def _block_swiglu_lora_bwd(scale, rate, unroll, res, dy_nbd):
    x_nbd, r_nb, base, lora, block_expert, n_used = res

    def fn(dlo, i, x, r, dy, e):
        key = None if lora.key is None else jax.random.fold_in(lora.key, i)
        base_e = tuple(w[e] for w in base)
        _, vjp = jax.vjp(lambda x, r, lo: swiglu_one(x, r, base_e, lo, scale, rate, key), x, r, lora_at(lora, None, e))
        dx, dr, dlo_e = vjp(dy)
        return tuple(acc.at[e].add(d.astype(acc.dtype)) for acc, d in zip(dlo, dlo_e)), (dx, dr)

    zeros = tuple(jnp.zeros_like(a) for a in lora[:6])
    dlo, (dx, dr) = scan_blocks(fn, n_used, (x_nbd, r_nb, dy_nbd, block_expert), zeros, unroll=unroll)
    d_key = None if lora.key is None else np.zeros(lora.key.shape, jax.dtypes.float0)
    return dx, dr.astype(r_nb.dtype), None, ExpertLora(*dlo, d_key), None, None  # None: the base is frozen


block_swiglu_lora.defvjp(_block_swiglu_lora_fwd, _block_swiglu_lora_bwd)
def ragged_lora(x_md, wg, wu, wd, gs, lora: ExpertLora, scale: float, rate: float):
    """The grouped SwiGLU of sorted rows with the experts' adapters, as ragged products (differentiated by JAX;
    the frozen base gets no gradient)."""
    dt = x_md.dtype

    def lin(x, w, a, b, key):
        y = jax.lax.ragged_dot(x, w.astype(dt), gs, preferred_element_type=dt)
        xa = jax.lax.ragged_dot(dropout(x, rate, key), a.astype(dt), gs, preferred_element_type=dt)
        return y + scale * jax.lax.ragged_dot(xa, b.astype(dt), gs, preferred_element_type=dt)

    kg, ku, kd = (None,) * 3 if lora.key is None else jax.random.split(lora.key, 3)
    g = lin(x_md, wg, lora.ag, lora.bg, kg)
    u = lin(x_md, wu, lora.au, lora.bu, ku)
    return lin((jax.nn.silu(g) * u).astype(dt), wd, lora.ad, lora.bd, kd)
