"""A frozen base held quantised at rest (LoRA runs): int8 with one scale per output channel, or float8 e4m3 with
one scale per 128x128 block (the official FP8 release's format), dequantised where each kernel is read.

A quantised kernel is a QArray in place of the array in its Variable: indexing it (`w[...]`, a layer, an expert)
returns that part dequantised, so the layers read it as they read a plain kernel, and the grouped expert matmul
dequantises one expert's kernel per row block, never a layer's whole expert stack.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
from flax import nnx

from k2jax.errors import ConfigError
from k2jax.model.params import LoraParam, is_stacked, lora_split, spec_of

QUANT_KINDS = ("int8", "fp8")
BLOCK = 128
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


@dataclasses.dataclass(frozen=True)
class QArray:
    """q (int8 or float8_e4m3fn, the kernel's shape) and float32 scales. The last `n_out` dims are the kernel's
    output, the `n_in` before them its input, any before those (layers, experts) index whole kernels, so slicing
    them (a scan over layers) keeps the layout. int8: scale has the kernel's shape with the input dims 1 (per
    output channel); fp8: [lead..., ceil(in/128), ceil(out/128)]."""

    q: jax.Array
    scale: jax.Array
    n_in: int
    n_out: int
    kind: str

    @property
    def n_lead(self) -> int:
        return self.q.ndim - self.n_in - self.n_out

    @property
    def shape(self):
        return self.q.shape

    @property
    def ndim(self):
        return self.q.ndim

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The whole array in `dtype`."""
        if self.kind == "int8":
            return (self.q.astype(jnp.float32) * self.scale).astype(dtype)
        lead, shape = self.q.shape[:self.n_lead], self.q.shape
        n_in, n_out = math.prod(shape[self.n_lead:self.n_lead + self.n_in]), math.prod(shape[self.n_lead + self.n_in:])
        s = jnp.repeat(jnp.repeat(self.scale, BLOCK, axis=-2)[..., :n_in, :], BLOCK, axis=-1)[..., :n_out]
        return (self.q.astype(jnp.float32).reshape(lead + (n_in, n_out)) * s).reshape(shape).astype(dtype)

    def astype(self, dtype) -> jax.Array:
        return self.dequantize(dtype)

    def __getitem__(self, index) -> jax.Array:
        """Leading-dim indexing (`...`, a layer, (layer, expert), an expert array): that part, dequantised."""
        if index is Ellipsis:
            return self.dequantize()
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.n_lead:
            raise IndexError(f"QArray: index {index} goes past the {self.n_lead} leading (whole-kernel) dims")
        return QArray(self.q[index], self.scale[index], self.n_in, self.n_out, self.kind).dequantize()


jax.tree_util.register_dataclass(QArray, data_fields=["q", "scale"], meta_fields=["n_in", "n_out", "kind"])


def quantize(w: jax.Array, n_lead: int, n_in: int, kind: str) -> QArray:
    """w quantised (scales from each channel's / block's max magnitude)."""
    w = w.astype(jnp.float32)
    shape = w.shape
    if kind == "int8":
        axes = tuple(range(n_lead, n_lead + n_in))
        amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        return QArray(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale, n_in,
                      w.ndim - n_lead - n_in, kind)
    lead = shape[:n_lead]
    n_i, n_o = math.prod(shape[n_lead:n_lead + n_in]), math.prod(shape[n_lead + n_in:])
    bi, bo = -(-n_i // BLOCK), -(-n_o // BLOCK)
    w2 = jnp.pad(w.reshape(lead + (n_i, n_o)), [(0, 0)] * n_lead + [(0, bi * BLOCK - n_i), (0, bo * BLOCK - n_o)])
    blocks = w2.reshape(lead + (bi, BLOCK, bo, BLOCK))
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    q = (blocks / scale[..., :, None, :, None]).reshape(lead + (bi * BLOCK, bo * BLOCK))[..., :n_i, :n_o]
    return QArray(q.reshape(shape).astype(jnp.float8_e4m3fn), scale, n_in, w.ndim - n_lead - n_in, kind)


def quantizable(path) -> tuple[int, int] | None:
    """(leading dims, input dims) of a kernel the base quantises (the linear layers the FP8 release quantises:
    Muon's matrices, not the router, embedding, lm_head or norms), else None."""
    names = tuple(str(p) for p in path)
    spec = spec_of(names)
    if spec.group != "muon" or spec.float32:
        return None
    key = ".".join(names[1:]) if is_stacked(names) else ".".join(names)
    lead, ins, _ = lora_split(key, spec)
    return (1 if is_stacked(names) else 0) + len(lead), len(ins)


def quantize_base(base, kind: str):
    """The base nnx.State with every quantisable kernel a QArray of `kind` (the rest as it is)."""
    if kind not in QUANT_KINDS:
        raise ConfigError(f"--base_dtype: expected one of {QUANT_KINDS} to quantise, got {kind!r}")

    def one(path, var):
        dims = None if isinstance(var, LoraParam) else quantizable(path)
        return var if dims is None else var.replace(quantize(var.get_value(), *dims, kind))

    flat = [(p, one(p, v)) for p, v in nnx.to_flat_state(base)]
    return nnx.from_flat_state(flat)


def quantized_shardings(base_shardings, kind: str, mesh):
    """The shardings of quantize_base's output: q as its kernel; the scales replicated but over their leading
    (layers, experts) dims, which follow the kernel's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    def one(path, var):
        dims = quantizable(path)
        if dims is None:
            return var
        sh = var.get_value()
        n_lead = dims[0]
        names = tuple(str(x) for x in path)
        ndim = len(spec_of(names).axes) + is_stacked(names)
        spec = tuple(sh.spec) + (None,) * ndim
        scale_spec = P(*(spec[:n_lead] + (None,) * (ndim - n_lead if kind == "int8" else 2)))
        return var.replace(QArray(sh, NamedSharding(mesh, scale_spec), dims[1], ndim - sum(dims), kind))

    return nnx.from_flat_state([(p, one(p, v)) for p, v in nnx.to_flat_state(base_shardings)])


def base_bytes(base) -> int:
    """Bytes the base holds at rest (quantised values and their scales included)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
