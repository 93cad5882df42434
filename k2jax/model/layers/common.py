"""Which kernels run (`pallas_mode`), RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from k2jax.model.factory import dtype_of, param
from k2jax.model.layers.lora import Adapter


def pallas_mode(execution) -> str | None:
    """'compiled', 'interpret' or None (the XLA paths) for `execution.kernels`: 'auto' compiles the Pallas kernels
    where the default backend is a TPU; 'pallas' always (k2jax-compile for a TPU target from a CPU host);
    'interpret' runs them in Pallas's interpreter (CPU tests); 'xla' never uses them."""
    kernels = execution.kernels
    if kernels == "auto":
        return "compiled" if jax.default_backend() == "tpu" else None
    return {"pallas": "compiled", "interpret": "interpret", "xla": None}[kernels]


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
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)); kernels [d, f] and [f, d]; with `lora`, the targeted
    kernels carry adapters (`<kernel>_lora`)."""

    def __init__(self, key: str, d: int, f: int, config, execution, *, rngs: nnx.Rngs, lora=None):

        self.gate = param(rngs, f"{key}.gate", (d, f), config, execution)
        self.up = param(rngs, f"{key}.up", (d, f), config, execution)
        self.down = param(rngs, f"{key}.down", (f, d), config, execution)
        for name, shapes in (("gate", ((d,), (f,))), ("up", ((d,), (f,))), ("down", ((f,), (d,)))):
            adapted = lora is not None and lora.adapts(f"{key}.{name}")
            setattr(self, f"{name}_lora", Adapter(f"{key}.{name}", *shapes, lora, config, execution, rngs=rngs)
                    if adapted else None)
        self.dtype = dtype_of(execution.dtype)

    def _project(self, name: str, eq: str, x: jax.Array, key) -> jax.Array:
        y = jnp.einsum(eq, x, getattr(self, name)[...].astype(self.dtype))
        adapter = getattr(self, f"{name}_lora")
        return y if adapter is None else y + adapter(x, key)

    def __call__(self, x_td: jax.Array, key=None) -> jax.Array:
        """The feed-forward of x [..., d]; `key`: the adapters' dropout key (training)."""
        x = x_td.astype(self.dtype)
        g = checkpoint_name(self._project("gate", "...d,df->...f", x, key), "mlp_hidden")
        u = checkpoint_name(self._project("up", "...d,df->...f", x, key), "mlp_hidden")
        return self._project("down", "...f,fd->...d", jax.nn.silu(g) * u, key)
