"""Context parallelism: one sequence split over the mesh axes of `act_seq` (the `context` axis), with causal
work balanced between the shards.

Layout: the sequence is cut into 2N pieces and shard i holds pieces i and 2N-1-i, an early and a late one, so
that every shard has the same number of causal (query, key) pairs. The model permutes its inputs into this
layout on entry (`to_balanced`) and its outputs back (`from_balanced`); everything but attention works per
token and does not see it.

Attention all-gathers only what MLA's keys and values are made from: the normalised latent and the shared rope
key, kv_lora_rank + qk_rope_head_dim values per token (576 for K2, against 64 heads x (192 + 128) expanded).
Every shard expands keys and values from the gathered latent and runs the attention kernel for its two pieces,
each against the key blocks up to its own end: splash (layers/splash.py) where the Pallas kernels run and a
piece is whole kernel blocks, else the XLA blockwise kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from k2jax.errors import ConfigError
from k2jax.model.layers.blockwise import blockwise_attention_at
from k2jax.model.layers.splash import splash_attention, splash_fits
from k2jax.model.sharding import ShardingRules, constrain


def context_axes(rules: ShardingRules) -> tuple[str, ...]:
    """The mesh axes (of size > 1 on the current mesh) that split the sequence; () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in rules.mesh_axes("act_seq") if mesh.shape.get(a, 1) > 1)


def context_size(rules: ShardingRules) -> int:
    """How many shards the sequence is split into on the current mesh (1: no context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in context_axes(rules))


def check_length(t: int, n: int, chunk: int) -> None:
    """Raises ConfigError unless a sequence of t tokens splits into 2n pieces of whole attention chunks."""
    if t % (2 * n):
        raise ConfigError(f"sequence length {t} is split over a context mesh axis of {n} shards, each holding two "
                          f"pieces: it must be a multiple of {2 * n}")
    if chunk and (t // (2 * n)) % chunk:
        raise ConfigError(f"execution.attn_chunk = {chunk}: with sequence length {t} on {n} context shards each "
                          f"piece has {t // (2 * n)} tokens, which must be a multiple of attn_chunk; choose a "
                          f"divisor of {t // (2 * n)} or a longer sequence")


def to_balanced(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """x with its `axis` (the sequence) reordered into the balanced layout of n shards."""
    x = jnp.moveaxis(x, axis, 0)
    t = x.shape[0]
    pieces = x.reshape(2, n, t // (2 * n), *x.shape[1:])
    early, late = pieces[0], jnp.flip(pieces[1], axis=0)  # shard i: piece i, then piece 2n-1-i
    return jnp.moveaxis(jnp.stack([early, late], axis=1).reshape(x.shape), 0, axis)


def balanced_positions(t: int, n: int) -> np.ndarray:
    """The sequence position of each place of the balanced layout of n shards (to_balanced of arange(t))."""
    pieces = np.arange(t).reshape(2, n, t // (2 * n))
    return np.stack([pieces[0], pieces[1][::-1]], axis=1).reshape(t)


def from_balanced(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """x in sequence order again, from the balanced layout of n shards along `axis`."""
    x = jnp.moveaxis(x, axis, 0)
    t = x.shape[0]
    pieces = x.reshape(n, 2, t // (2 * n), *x.shape[1:])
    early, late = pieces[:, 0], jnp.flip(pieces[:, 1], axis=0)
    return jnp.moveaxis(jnp.concatenate([early, late], axis=0).reshape(x.shape), 0, axis)


def context_attention(q_nope, q_rope, latent_btc, k_rope_btr, seg_bt, expand, rules: ShardingRules, chunk: int,
                      scale: float, pallas: str | None = None):
    """(out [b, t, h, v], max pre-softmax logit per head [h]) of causal attention within segments, with queries,
    latent, rope key and segment ids in the balanced layout, their sequence split over the context axes.

    `expand(latent [b, t, c]) -> (k_nope [b, t, h, n], v [b, t, h, v])` makes the keys and values (the kv_b
    projection, with its adapter); `chunk`: the kernel's query chunk and key block (0: one block per piece).
    """
    axes = context_axes(rules)
    n = context_size(rules)
    t = q_nope.shape[1]
    piece = t // (2 * n)
    c = chunk or piece
    whole = ("batch", None, None)
    # the all-gather of the latent and rope key: what the keys of every position are made from
    latent = from_balanced(constrain(latent_btc, rules, whole), n)
    k_rope = from_balanced(constrain(k_rope_btr, rules, whole), n)
    seg_k = from_balanced(constrain(seg_bt, rules, ("batch", None)), n)
    k_nope, v = expand(latent)
    if pallas is not None and splash_fits(piece):
        return splash_attention(q_nope, q_rope, k_nope, k_rope, v, seg_bt, scale, rules,
                                interpret=pallas == "interpret", positions=balanced_positions(t, n), seg_k=seg_k,
                                context_axes=axes)
    split, rep = P(None, axes), P()

    def local(qn, qr, kn, kr, vv, seg_q, seg_k):
        i = jax.lax.axis_index(axes)
        outs, maxes = [], []
        for half, start in ((0, i * piece), (1, (2 * n - 1 - i) * piece)):
            sl = slice(half * piece, (half + 1) * piece)
            o, m = blockwise_attention_at(qn[:, sl], qr[:, sl], kn, kr, vv, seg_q[:, sl], seg_k,
                                          start.astype(jnp.int32), c, scale)
            outs.append(o)
            maxes.append(m)
        return jnp.concatenate(outs, axis=1), jax.lax.pmax(jax.lax.stop_gradient(jnp.maximum(*maxes)), axes)

    mesh = jax.sharding.get_abstract_mesh()
    run = jax.shard_map(local, mesh=mesh, in_specs=(split, split, rep, rep, rep, split, rep), out_specs=(split, rep),
                        axis_names=set(axes), check_vma=False)
    return run(q_nope, q_rope, k_nope, k_rope, v, seg_bt, seg_k)
