"""MLA's decode cache: per layer stack, the normalised KV latent and the rotated rope key of every token
(kv_lora_rank + qk_rope_head_dim values per token and layer, nothing per head), in float32, bfloat16 or int8.

A stack's cache is a dict {latent [L, b, s, c], k_rope [L, b, s, r]} (+ {latent,k_rope}_scale [L, b, s, 1] for
int8). Writes go to one layer's rows in place (`.at[...]`), so a scan over layers that carries the stacked cache
never rewrites the other layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax.errors import DecodeError

CACHE_DTYPES = ("float32", "bfloat16", "int8")
_PARTS = ("latent", "k_rope")


def check_cache_dtype(name: str) -> str:
    """`name` if it is a cache dtype, else a DecodeError naming the argument."""
    if name not in CACHE_DTYPES:
        raise DecodeError(f"cache_dtype: expected one of {CACHE_DTYPES}, got {name!r}")
    return name


def bytes_per_token(config, cache_dtype: str) -> int:
    """Cache bytes per token and layer: the latent plus the rope key (int8: plus two float32 scales)."""
    n = config.kv_lora_rank + config.qk_rope_head_dim
    if cache_dtype == "int8":
        return n + 2 * 4
    return n * jnp.dtype(cache_dtype).itemsize


def empty_cache(config, layers: int, batch: int, length: int, cache_dtype: str) -> dict:
    """A zero cache of one stack of `layers` layers for `batch` sequences of up to `length` tokens."""
    store = jnp.int8 if cache_dtype == "int8" else jnp.dtype(cache_dtype)
    dims = {"latent": config.kv_lora_rank, "k_rope": config.qk_rope_head_dim}
    cache = {k: jnp.zeros((layers, batch, length, n), store) for k, n in dims.items()}
    if cache_dtype == "int8":
        cache.update({f"{k}_scale": jnp.zeros((layers, batch, length, 1), jnp.float32) for k in _PARTS})
    return cache


def _quantize(x):
    scale = jnp.maximum(jnp.abs(x).max(-1, keepdims=True), 1e-8) / 127.0
    return jnp.round(x / scale).astype(jnp.int8), scale.astype(jnp.float32)


def write(cache: dict, layer, positions_bt: jax.Array, latent_btc: jax.Array, k_rope_btr: jax.Array,
          seq_axes: tuple[str, ...] = ()) -> dict:
    """The cache with layer `layer`'s rows of each sequence written at `positions_bt` [b, t] (in place).

    `seq_axes`: the mesh axes that split the cache's positions (rules' `cache_seq`); each shard then writes the
    tokens that fall in its own range and nothing moves (left to the partitioner, a scatter into a split dim
    can gather the whole stacked cache)."""
    rows = jnp.arange(positions_bt.shape[0])[:, None]
    new = {}
    for name, x in (("latent", latent_btc), ("k_rope", k_rope_btr)):
        if f"{name}_scale" in cache:
            new[name], new[f"{name}_scale"] = _quantize(x.astype(jnp.float32))
        else:
            new[name] = x.astype(cache[name].dtype)
    if not seq_axes:
        return {k: v.at[layer, rows, positions_bt].set(new[k]) for k, v in cache.items()}

    def local(cache, layer, positions_bt, new):
        size = next(iter(cache.values())).shape[2]  # this shard's positions: [i * size, (i + 1) * size)
        pos = positions_bt - jax.lax.axis_index(seq_axes) * size
        pos = jnp.where((pos >= 0) & (pos < size), pos, size)  # another shard's: out of range, dropped
        return {k: v.at[layer, rows, pos].set(new[k], mode="drop") for k, v in cache.items()}

    split = P(None, None, seq_axes, None)
    mesh = jax.sharding.get_abstract_mesh()
    run = jax.shard_map(local, mesh=mesh, in_specs=({k: split for k in cache}, P(), P(), P()),
                        out_specs={k: split for k in cache}, axis_names=set(seq_axes), check_vma=False)
    return run(cache, layer, positions_bt, new)


def read(cache: dict, layer, length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s (latent [b, s, c], k_rope [b, s, r]) of the first `length` slots (default all),
    dequantised to float32 for an int8 cache."""
    out = []
    for name in _PARTS:
        x = cache[name][layer, :, :length]
        if f"{name}_scale" in cache:
            x = x.astype(jnp.float32) * cache[f"{name}_scale"][layer, :, :length]
        out.append(x)
    return out[0], out[1]
