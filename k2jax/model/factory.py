"""Parameter creation from the declarations in k2jax.model.params (axes, initialiser, kind, dtype rule), and dtype
names: the one factory every layer's variables come from."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
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
    if spec.init in ("normal", "fan_in"):
        fan_in = math.prod(shape[1 if spec.axes[0] == "experts" else 0:-1])  # an expert adapter: per expert
        std = config.initializer_range if spec.init == "normal" else 1.0 / math.sqrt(fan_in)
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        value = jnp.full(shape, 1.0 if spec.init == "ones" else 0.0, dtype)
    return spec.kind(value, out_sharding=tuple(spec.axes), eager_sharding=False)
