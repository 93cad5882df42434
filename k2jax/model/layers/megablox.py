"""The routed experts' SwiGLU through JAX's Pallas grouped matmul for TPU (megablox: `gmm` forward and input
gradient, `tgmm` weight gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

# Largest tiles (rows, contraction, output columns). K2's d = 7168 = 7 x 1024 and f = 2048 split into whole tiles;
# a double-buffered bf16 step holds 512x1024 + 1024x1024 inputs and a 512x1024 float32 accumulator (~10 MiB of
# VMEM), inside the default scoped limit of v5p and v6e.
MAX_TILES = (512, 1024, 1024)


def _tile(dim: int, cap: int) -> int:
    """A tile of `dim`: the whole dimension when it fits (always a legal TPU block), else `cap` (a multiple of
    128; the kernel masks the last, partial tile)."""
    return dim if dim <= cap else cap


def tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
    """The kernels' tiling for an [m, k] x [k, n] product (a function: the backward pass asks again for its own
    transposed shapes). m arrives padded to a multiple of its tile (gmm_swiglu)."""
    return (MAX_TILES[0] if m % MAX_TILES[0] == 0 else m), _tile(k, MAX_TILES[1]), _tile(n, MAX_TILES[2])


def gmm_swiglu(x_md: jax.Array, wg_edf: jax.Array, wu_edf: jax.Array, wd_efd: jax.Array, group_sizes: jax.Array,
               weight_m: jax.Array, *, interpret: bool = False) -> jax.Array:
    """weight · SwiGLU_e of rows sorted by expert: [m, d] -> [m, d]; group_sizes [e + 1], whose last group is the
    rows no expert here takes (other shards' experts, padding): they are never computed and come back zero.

    Each row's routing weight scales its hidden row before the down projection (the same product): the weight's
    gradient is then Σ_f dh·h from the down projection's input gradient, and no remat policy has to keep or
    recompute the [m, d] outputs for it.

    The kernels' group offset makes them visit only the e local groups' row tiles; their own custom VJP gives
    the input gradient by `gmm` with the kernel transposed and the weight gradient by `tgmm`.
    """
    m, d = x_md.shape
    dt = x_md.dtype
    tm = MAX_TILES[0] if m >= MAX_TILES[0] else -(-m // 16) * 16
    pad = -m % tm
    x = jnp.pad(x_md, ((0, pad), (0, 0)))
    gs = group_sizes.astype(jnp.int32).at[-1].add(pad)
    offset = jnp.zeros((), jnp.int32)  # local groups first; with fewer kernels than groups the rest stay zero

    def gmm(lhs, w):
        return megablox.gmm(lhs, w.astype(dt), gs, dt, tiles, offset, None, False, interpret)

    g = checkpoint_name(gmm(x, wg_edf), "moe_hidden")
    u = checkpoint_name(gmm(x, wu_edf), "moe_hidden")
    w = jnp.pad(weight_m, (0, pad)).astype(dt)[:, None]  # in the rows' dtype: no float32 [m, f] product
    y = gmm(jax.nn.silu(g) * u * w, wd_efd)
    return y[:m]
