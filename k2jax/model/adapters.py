"""A LoRA model's adapters folded into its base kernels: W + (alpha/r)·A·B, per expert for the routed experts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.model.params import LoraParam, is_stacked, lora_split, spec_of


def _delta(a, b, n_lead: int, n_in: int, out_shape, scale: float):
    """scale·A·B for A [lead..., in..., r], B [lead..., r, out...] -> [lead..., in..., out...] (float32)."""
    lead = a.shape[:n_lead]
    a2 = a.reshape(lead + (math.prod(a.shape[n_lead:n_lead + n_in]), a.shape[-1])).astype(jnp.float32)
    b2 = b.reshape(lead + (b.shape[n_lead], math.prod(out_shape))).astype(jnp.float32)
    return (a2 @ b2 * scale).reshape(a.shape[:-1] + tuple(out_shape))


def merge_adapters(state, scale: float):
    """The base state (adapters removed) with every adapter's update added to its kernel, in the kernel's dtype.

    `state`: an nnx.State of a model with adapters; `scale`: alpha / r of its LoraConfig."""
    flat = dict(nnx.to_flat_state(state))
    out = {}
    for path, var in flat.items():
        names = tuple(str(p) for p in path)
        if isinstance(var, LoraParam):
            continue
        a_var = flat.get(path[:-1] + (f"{path[-1]}_lora", "a"))
        if a_var is None:
            out[path] = var
            continue
        b_var = flat[path[:-1] + (f"{path[-1]}_lora", "b")]
        key = ".".join(names[1:]) if is_stacked(names) else ".".join(names)
        lead, ins, outs = lora_split(key, spec_of(names))
        n_lead = (1 if is_stacked(names) else 0) + len(lead)
        w = var.get_value()
        delta = _delta(a_var.get_value(), b_var.get_value(), n_lead, len(ins), w.shape[n_lead + len(ins):], scale)
        out[path] = var.replace((w.astype(jnp.float32) + delta).astype(w.dtype))
    return nnx.from_flat_state(out)


def merged_jit(state, scale: float, shardings=None):
    """merge_adapters under jit (each merged kernel stays in the base kernel's sharding when given)."""
    return jax.jit(lambda s: merge_adapters(s, scale), out_shardings=shardings)(state)
