"""Declared-parameter creation, dtype names, RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from k2jax.model.params import BLOCK, DENSE_FFN, MOE_FFN, TOP

_DECLARED = {**TOP, **BLOCK, **DENSE_FFN, **MOE_FFN}


def dtype_of(name: str):
    """The jnp dtype of a config dtype name ('float32', 'bfloat16')."""
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, key: str, shape: Sequence[int], config, execution) -> nnx.Variable:
    """The variable declared as `key` in k2jax.model.params: its axes, initialiser, kind and dtype rule."""
    spec = _DECLARED[key]
    assert len(shape) == len(spec.axes), (key, shape, spec.axes)
    dtype = jnp.float32 if spec.float32 else dtype_of(execution.param_dtype)
    if spec.init == "normal":
        value = (config.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        value = jnp.full(shape, 1.0 if spec.init == "ones" else 0.0, dtype)
    return spec.kind(value, out_sharding=tuple(spec.axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last dim, computed in float32 (as HF's DeepseekV3RMSNorm)."""

    def __init__(self, key: str, dim: int, config, execution, *, rngs: nnx.Rngs, eps: float | None = None):
        self.scale = param(rngs, f"{key}.scale", (dim,), config, execution)
        self.eps = config.rms_norm_eps if eps is None else eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)); kernels [d, f] and [f, d]."""

    def __init__(self, key: str, d: int, f: int, config, execution, *, rngs: nnx.Rngs):
        self.gate = param(rngs, f"{key}.gate", (d, f), config, execution)
        self.up = param(rngs, f"{key}.up", (d, f), config, execution)
        self.down = param(rngs, f"{key}.down", (f, d), config, execution)
        self.dtype = dtype_of(execution.dtype)

    def __call__(self, x_td: jax.Array) -> jax.Array:
        x = x_td.astype(self.dtype)
        g = checkpoint_name(jnp.einsum("...d,df->...f", x, self.gate[...].astype(self.dtype)), "mlp_hidden")
        u = checkpoint_name(jnp.einsum("...d,df->...f", x, self.up[...].astype(self.dtype)), "mlp_hidden")
        return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, self.down[...].astype(self.dtype))
