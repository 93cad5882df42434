"""Low-rank adapters (LoRA): the settings of a LoRA run and the adapter of one dense projection.

An adapted projection computes base(x) + (alpha/r)·(dropout(x)·A)·B with A [in..., r], B [r, out...]; B starts
at zero, so an adapted model starts exactly at its base. The routed experts' adapters are applied inside the
grouped expert matmul (k2jax.model.layers.grouped), on the same sorted row blocks as the base kernels.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.errors import ConfigError
from k2jax.model.factory import param
from k2jax.model.params import LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What a LoRA run adapts and how: rank r, alpha (the update is scaled by alpha/r), dropout on the adapters'
    input, and the target groups (attn, dense_mlp, shared, experts)."""

    rank: int
    alpha: float = 0.0  # 0: equal to the rank (scaling 1)
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"--lora_rank: expected a positive integer, got {self.rank!r}")
        if self.alpha < 0:
            raise ConfigError(f"--lora_alpha: expected >= 0 (0: the rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora_dropout: expected a probability in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"--lora_targets: unknown target {bad[0] if bad else '(none given)'!r}; "
                              f"choose from {','.join(LORA_TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))
        object.__setattr__(self, "alpha", float(self.alpha or self.rank))

    @property
    def scale(self) -> float:
        """alpha / r."""
        return self.alpha / self.rank

    def adapts(self, key: str) -> bool:
        """Whether the declared projection `key` (e.g. 'attn.q_b', 'mlp.wg') has an adapter."""
        return any(key in LORA_TARGETS[t] for t in self.targets)

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: dict) -> "LoraConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]))


def dropout(x: jax.Array, rate: float, key) -> jax.Array:
    """Inverted dropout of x (identity without a key or at rate 0)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def fold(key, name: str):
    """`key` folded with a stable id of `name` (each adapter draws its own dropout mask); None stays None."""
    return None if key is None else jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class Adapter(nnx.Module):
    """The adapter of one dense projection: A [in..., r] and B [r, out...], declared as `<key>_lora.{a,b}`."""

    def __init__(self, key: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], lora: LoraConfig, config,
                 execution, *, rngs: nnx.Rngs):

        self.a = param(rngs, f"{key}_lora.a", tuple(in_shape) + (lora.rank,), config, execution)
        self.b = param(rngs, f"{key}_lora.b", (lora.rank,) + tuple(out_shape), config, execution)
        self.n_in, self.scale, self.rate, self.name = len(in_shape), lora.scale, lora.dropout, key

    def __call__(self, x: jax.Array, key=None) -> jax.Array:
        """(alpha/r)·(dropout(x)·A)·B for x [..., in...] -> [..., out...] in x's dtype."""
        dt = x.dtype
        x = dropout(x, self.rate, fold(key, self.name))
        xa = jnp.tensordot(x, self.a[...].astype(dt), axes=self.n_in)
        return (jnp.tensordot(xa, self.b[...].astype(dt), axes=1) * self.scale).astype(dt)



class ExpertAdapter(nnx.Module):
    """The adapters of one routed-expert kernel: A [e, in, r] and B [e, r, out], one pair per expert."""

    def __init__(self, key: str, n_experts: int, d_in: int, d_out: int, lora: LoraConfig, config, execution, *,
                 rngs: nnx.Rngs):

        self.a = param(rngs, f"{key}_lora.a", (n_experts, d_in, lora.rank), config, execution)
        self.b = param(rngs, f"{key}_lora.b", (n_experts, lora.rank, d_out), config, execution)
