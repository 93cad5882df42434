"""Dropless grouped expert matmuls: every (token, expert) assignment is computed, none dropped.

Two formulations with the same result:
- "ragged": rows sorted by expert and `jax.lax.ragged_dot` (costs ~1x the ideal on TPU/GPU, but lowers to
  dense work over every expert on the CPU backend);
- "blocks": rows sorted by expert, each expert's group padded to a multiple of a row block, and one batched
  matmul over blocks, each block gathering its expert's weights (near-ideal on CPU: padding < 1 block/expert).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def resolve_impl(impl: str) -> str:
    """'auto' -> 'ragged' on TPU/GPU backends, 'blocks' on CPU."""
    if impl != "auto":
        return impl
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


def block_size_for(rows: int, n_groups: int, requested: int = 0) -> int:
    """Rows per block: padding (< one block per non-empty group) stays within ~1/8 of `rows`."""
    if requested:
        return requested
    groups = max(1, min(n_groups, rows))
    target = max(1, rows // (8 * groups))
    return int(min(512, max(8, 2 ** int(math.log2(target)))))


def _swiglu_rows(x_md, wg, wu, wd, gs, dtype):
    g = jax.lax.ragged_dot(x_md, wg, gs, preferred_element_type=dtype)
    u = jax.lax.ragged_dot(x_md, wu, gs, preferred_element_type=dtype)
    return jax.lax.ragged_dot((jax.nn.silu(g) * u).astype(dtype), wd, gs, preferred_element_type=dtype)


def expert_ffn(x_td: jax.Array, idx_tk: jax.Array, w_tk: jax.Array, wg_edf: jax.Array, wu_edf: jax.Array,
               wd_efd: jax.Array, *, impl: str, block_size: int = 0) -> jax.Array:
    """sum_k w[t,k] * SwiGLU_{idx[t,k]}(x[t]) -> [t, d]; ids outside [0, e) contribute nothing (other shards)."""
    t, k = idx_tk.shape
    n_exp = wg_edf.shape[0]
    dtype = x_td.dtype
    flat = idx_tk.reshape(-1)
    valid = (flat >= 0) & (flat < n_exp)
    key = jnp.where(valid, flat, n_exp)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    token = order // k
    weight = jnp.where(valid, w_tk.reshape(-1), 0.0)[order]
    group_sizes = jnp.zeros((n_exp + 1,), jnp.int32).at[key].add(1)[:n_exp]
    x_md = x_td[token]
    m = t * k
    if resolve_impl(impl) == "ragged":
        y_md = _swiglu_rows(x_md, wg_edf, wu_edf, wd_efd, group_sizes, dtype)
    else:
        b = block_size_for(m, n_exp, block_size)
        n_blocks = -(-m // b) + min(n_exp, m)
        padded = -(-group_sizes // b) * b
        padded_end = jnp.cumsum(padded)
        start = jnp.cumsum(group_sizes) - group_sizes
        sk = jnp.minimum(sorted_key, n_exp - 1)
        dest = padded_end[sk] - padded[sk] + jnp.arange(m) - start[sk]
        dest = jnp.where(sorted_key < n_exp, dest, n_blocks * b)  # rows for other shards: dropped
        x_nbd = jnp.zeros((n_blocks * b, x_md.shape[-1]), dtype).at[dest].set(x_md, mode="drop")
        x_nbd = x_nbd.reshape(n_blocks, b, -1)
        block_expert = jnp.searchsorted(padded_end, jnp.arange(n_blocks) * b, side="right")
        block_expert = jnp.minimum(block_expert, n_exp - 1)
        g = jnp.einsum("nbd,ndf->nbf", x_nbd, wg_edf[block_expert])
        u = jnp.einsum("nbd,ndf->nbf", x_nbd, wu_edf[block_expert])
        y_nbd = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(g) * u, wd_efd[block_expert])
        y_md = y_nbd.reshape(n_blocks * b, -1).at[dest].get(mode="fill", fill_value=0)
    y_md = y_md * weight[:, None].astype(dtype)
    return jnp.zeros_like(x_td).at[token].add(y_md)


def ideal_moe_flops(tokens: int, config) -> int:
    """2·tokens·hidden·(n_experts + 3·(k + n_shared)·moe_intermediate): router plus the experts actually used."""
    c = config
    return 2 * tokens * c.hidden_size * (c.n_routed_experts
                                         + 3 * (c.num_experts_per_tok + c.n_shared_experts) * c.moe_intermediate_size)
