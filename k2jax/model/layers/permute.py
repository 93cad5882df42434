"""Moving token rows to expert order and back by gathers only, in both passes.

Sorting a MoE layer's assignments gathers token rows into expert order; the plain way back is a scatter-add,
and the transpose of a gather is a scatter-add too. On TPU a scatter of rows is the slow form (updates
serialised), so `take_rows` carries each row's destinations: its backward pass gathers the cotangents of those
destinations and sums them, a gather again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _take(x_nd: jax.Array, idx: jax.Array) -> jax.Array:
    """x[idx] with rows of zeros where idx < 0."""
    out = jnp.take(x_nd, jnp.maximum(idx, 0), axis=0)
    return jnp.where((idx >= 0)[(...,) + (None,) * (x_nd.ndim - 1)], out, 0)


@jax.custom_vjp
def take_rows(x_nd: jax.Array, src_m: jax.Array, dst_nk: jax.Array) -> jax.Array:
    """out[i] = x[src[i]] ([m, d]; a zero row where src[i] < 0). dst [n, k] lists, for each row of x, every i
    with src[i] equal to it (-1 for none): the backward pass is dx[r] = sum_j dout[dst[r, j]], a gather."""
    return _take(x_nd, src_m)


def _take_rows_fwd(x_nd, src_m, dst_nk):
    return _take(x_nd, src_m), (src_m, dst_nk)


def _take_rows_bwd(res, dout_md):
    src_m, dst_nk = res
    n, k = dst_nk.shape
    dx = _take(dout_md, dst_nk.reshape(-1)).reshape((n, k) + dout_md.shape[1:]).sum(1)
    return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def inverse(order_m: jax.Array, n: int) -> jax.Array:
    """inv [n] with inv[order[i]] = i, and -1 for the n values order does not hold (an int scatter of m values)."""
    return jnp.full((n,), -1, jnp.int32).at[order_m].set(jnp.arange(order_m.shape[0], dtype=jnp.int32), mode="drop")
