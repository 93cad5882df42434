"""Parameter helpers, RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx


class RouterBias(nnx.Variable):
    """MoE e_score_correction_bias: model state moved by load balancing, not by gradients."""


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], dtype, *, std: float | None = None,
          fill: float | None = None, kind=nnx.Param) -> nnx.Variable:
    """A variable of `shape` carrying logical axis `names`; normal(std) or constant(fill) initialised."""
    assert len(shape) == len(names), (shape, names)
    if fill is not None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return kind(value, out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last dim, computed in float32 (as HF's DeepseekV3RMSNorm)."""

    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, fill=1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)); kernels [d, f] and [f, d]."""

    def __init__(self, d: int, f: int, std: float, param_dtype, dtype, *, rngs: nnx.Rngs):
        self.gate = param(rngs, (d, f), ("embed", "mlp"), param_dtype, std=std)
        self.up = param(rngs, (d, f), ("embed", "mlp"), param_dtype, std=std)
        self.down = param(rngs, (f, d), ("mlp", "embed"), param_dtype, std=std)
        self.dtype = dtype

    def __call__(self, x_td: jax.Array) -> jax.Array:
        x = x_td.astype(self.dtype)
        g = checkpoint_name(jnp.einsum("...d,df->...f", x, self.gate[...].astype(self.dtype)), "mlp_hidden")
        u = checkpoint_name(jnp.einsum("...d,df->...f", x, self.up[...].astype(self.dtype)), "mlp_hidden")
        return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, self.down[...].astype(self.dtype))
