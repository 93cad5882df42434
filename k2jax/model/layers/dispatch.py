"""Expert parallelism by all-to-all: each (token, expert) assignment travels only to the `expert` shard that holds
its expert, is computed there and comes back (called inside the MoE's shard_map)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from k2jax.model.layers.permute import inverse, take_rows


def slot_capacity(assignments: int, shards: int, capacity_factor: float) -> int:
    """Rows one shard sends to each expert shard: capacity_factor x the balanced load (assignments / shards), a
    multiple of 8 rows; 0 (dropless) sizes every slot for all of the shard's assignments."""
    if capacity_factor <= 0:
        return assignments
    return min(assignments, -(-max(1, math.ceil(capacity_factor * assignments / shards)) // 8) * 8)


def a2a_experts(x_td: jax.Array, idx_tk: jax.Array, w_tk: jax.Array, ffn, *, shards: int, n_local: int,
                capacity_factor: float, axis: str = "expert", tensor: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum_k w[t,k]·SwiGLU_{idx[t,k]}(x[t]) [t, d], assignments dropped) with the experts split over `axis`.

    The assignments are sorted by destination shard into slots of `slot_capacity` rows ([shards, cap, d]); an
    all-to-all delivers each slot with its routing weights to its shard, which runs `ffn(rows [shards·cap, d],
    local ids [shards·cap, 1], weights [shards·cap, 1])` over its local experts (empty rows carry id -1 and cost
    nothing there; the weights are applied there, so the weights' gradient needs no unweighted output), and a
    second all-to-all brings the weighted rows back to be summed per token. Assignments past a slot's capacity
    are dropped (they add nothing) and counted. `tensor`: the experts' hidden dim is split over "tensor", so the
    partial rows are summed there before their way back.
    """
    t, k = idx_tk.shape
    d = x_td.shape[-1]
    a = t * k
    cap = slot_capacity(a, shards, capacity_factor)
    flat = idx_tk.reshape(-1)
    dest = flat // n_local
    # rank of each assignment among those for the same shard, in token order
    order = jnp.argsort(dest, stable=True)
    counts = jnp.zeros((shards,), jnp.int32).at[dest].add(1)
    start = jnp.cumsum(counts) - counts
    rank = jnp.zeros((a,), jnp.int32).at[order].set(jnp.arange(a, dtype=jnp.int32) - start[dest[order]])
    keep = rank < cap
    slot = jnp.where(keep, dest * cap + rank, -1)  # each assignment's row of the send buffer (-1: dropped)
    src = inverse(jnp.where(keep, slot, shards * cap), shards * cap)  # each row's assignment (-1: empty)
    # rows moved by gathers both ways (layers/permute.py), not scatters
    send_x = take_rows(x_td, jnp.where(src >= 0, src // k, -1), slot.reshape(t, k))
    send_e = jnp.where(src >= 0, flat[jnp.maximum(src, 0)] % n_local, -1)
    send_w = jnp.where(src >= 0, w_tk.reshape(-1).astype(jnp.float32)[jnp.maximum(src, 0)], 0.0)
    trip = lambda z: jax.lax.all_to_all(z.reshape((shards, cap) + z.shape[1:]), axis, 0, 0).reshape(z.shape)  # noqa: E731
    recv_x, recv_e, recv_w = trip(send_x), trip(send_e), trip(send_w)
    y_rows = ffn(recv_x, recv_e[:, None], recv_w[:, None])
    if tensor:
        y_rows = jax.lax.psum(y_rows, "tensor")
    back = trip(y_rows)
    y_td = take_rows(back, slot, src[:, None]).reshape(t, k, d).sum(1)  # weighted rows: summed per token
    return y_td, jnp.sum(~keep).astype(jnp.float32)
