"""K2's noaux_tc router: sigmoid scores, bias used only to choose, group-limited top-k, normalised weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(x_td: jax.Array, kernel_de: jax.Array, bias_e: jax.Array, *, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns expert ids [t, k] (int32), combine weights [t, k] (float32) and sigmoid scores [t, e]."""
    logits = jnp.einsum("td,de->te", x_td.astype(jnp.float32), kernel_de.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias_e.astype(jnp.float32)
    n_exp = choice.shape[-1]
    if n_group > 1:
        grouped = choice.reshape(-1, n_group, n_exp // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [t, g]
        _, keep = jax.lax.top_k(group_scores, topk_group)
        group_mask = jnp.zeros_like(group_scores, dtype=bool).at[jnp.arange(keep.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, n_exp // n_group, axis=-1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), weights * scaling, scores
