"""YaRN rotary position embedding on MLA's decoupled rope dims, in DeepSeek's interleaved-pair layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.model.config import yarn_mscale


def yarn_inv_freq(config) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim // 2] (float32) and the cos/sin attention factor of YaRN (or plain RoPE)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if not config.uses_yarn:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = config.rope_factor
    orig = config.rope_original_max_position_embeddings

    def correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation

    if config.rope_mscale and config.rope_mscale_all_dim:
        attn_factor = yarn_mscale(factor, config.rope_mscale) / yarn_mscale(factor, config.rope_mscale_all_dim)
    else:
        attn_factor = yarn_mscale(factor, 1.0)
    return inv_freq.astype(np.float32), float(attn_factor)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray, attn_factor: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [b, t, rope_dim // 2] in float32 for integer positions [b, t]."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x0, x1), (x2, x3)… of x [..., r]; returns [rotated evens ‖ rotated odds].

    The output is a fixed permutation of the usual interleaved result (HF does the same); queries and keys
    are permuted alike, so their dot products are unchanged. cos/sin broadcast as [b, t, (1,) r/2].
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
