"""The HF (official release) tensor names of every k2jax parameter, and loading HF safetensors into a mesh."""

from __future__ import annotations

import sys

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from k2jax.model.config import K2Config
from k2jax.model.params import is_stacked, spec_of, stack_layers
from k2jax.ckpt.safetensors import SafetensorsFolder
from k2jax.errors import CheckpointError

FP8_BLOCK = 128
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One k2jax array assembled from HF tensors: stacked over `layers`, optionally over experts.

    `template` is the HF name with {layer} and {e} fields; an HF tensor [out, in] is transposed and reshaped
    to `unit_shape` (the destination shape without the layer/expert axes); 1-D tensors are copied.
    """

    path: tuple[str, ...]
    template: str
    layers: tuple[int, ...] | None
    n_experts: int | None
    unit_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    transposed: bool = True

    def hf_names(self) -> list[str]:
        layers = self.layers if self.layers is not None else (None,)
        experts = range(self.n_experts) if self.n_experts else (None,)
        return [self.template.format(layer=l, e=e) for l in layers for e in experts]

    @property
    def shape(self) -> tuple[int, ...]:
        lead = ((len(self.layers),) if self.layers is not None else ()) + ((self.n_experts,) if self.n_experts else ())
        return lead + self.unit_shape

    def to_unit(self, hf: np.ndarray) -> np.ndarray:
        """HF tensor -> destination unit layout."""
        return hf if hf.ndim == 1 or not self.transposed else hf.T.reshape(self.unit_shape)

    def to_hf(self, unit: np.ndarray) -> np.ndarray:
        """Destination unit -> HF tensor layout (the inverse of to_unit)."""
        if unit.ndim == 1 or not self.transposed:
            return unit
        rows = self.hf_shape[1]
        return unit.reshape(rows, -1).T


def units(m: TensorMap):
    """(index into the destination array, HF name) of every source tensor of a destination array."""
    layers = [None] if m.layers is None else list(enumerate(m.layers))
    experts = [None] if not m.n_experts else list(range(m.n_experts))
    for lay in layers:
        for e in experts:
            idx = ((lay[0],) if lay is not None else ()) + ((e,) if e is not None else ())
            yield idx, m.template.format(layer=lay[1] if lay is not None else None, e=e)


def tensor_maps(config: K2Config, abstract_state) -> list[TensorMap]:
    """Every k2jax parameter with the HF tensors it comes from (names from k2jax.model.params)."""
    layers_of = stack_layers(config)
    maps = []
    for path, var in nnx.to_flat_state(abstract_state):
        path = tuple(str(p) for p in path)
        spec = spec_of(path)
        layers = tuple(layers_of[path[0]]) if is_stacked(path) else None
        experts = config.n_routed_experts if "{e}" in spec.hf else None
        unit = tuple(var.shape)[(layers is not None) + (experts is not None):]
        template = spec.hf if layers is None else "model.layers.{layer}." + spec.hf
        if len(unit) == 1 or not spec.hf_transposed:
            hf_shape = unit
        else:  # k2jax [in..., out...] is HF [out, in]
            hf_shape = (math.prod(unit[spec.hf_in_dims:]), math.prod(unit[:spec.hf_in_dims]))
        maps.append(TensorMap(path, template, layers, experts, unit, hf_shape, spec.hf_transposed))
    return maps


def _check_scale(w, scale_inv, name):
    out, inp = w.shape
    want = (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"tensor {name}_scale_inv: expected shape {list(want)} for {name} of shape "
                              f"{[out, inp]}, got {list(scale_inv.shape)}")


@functools.partial(jax.jit, static_argnames=("unit_shape", "transpose", "dtype"))
def _to_unit(w, scale_inv, *, unit_shape, transpose, dtype):
    """(FP8 · block scales or plain) HF tensor (or a strip of its rows) -> destination layout, fused by XLA."""
    x = w
    if scale_inv is not None:
        out, inp = w.shape
        bo, bi = scale_inv.shape
        s = scale_inv.astype(jnp.float32)
        if out == bo * FP8_BLOCK and inp == bi * FP8_BLOCK:  # whole blocks: a broadcast multiply, no repeat
            x = (w.astype(jnp.float32).reshape(bo, FP8_BLOCK, bi, FP8_BLOCK) * s[:, None, :, None]).reshape(out, inp)
        else:
            x = w.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, FP8_BLOCK, 0), FP8_BLOCK, 1)[:out, :inp]
    if transpose and x.ndim == 2:
        x = x.T
    return x.reshape(unit_shape).astype(dtype)


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, name: str) -> np.ndarray:
    """float32 W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128] (edge blocks partial)."""
    _check_scale(w, scale_inv, name)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(_to_unit(w, scale_inv, unit_shape=w.shape, transpose=False, dtype=jnp.float32))


class HFSource:
    """Reads k2jax arrays (or any slice of them) out of an HF safetensors folder, dequantising FP8."""

    def __init__(self, folder: SafetensorsFolder, maps: list[TensorMap], *, allow_extra: tuple[str, ...] = ()):
        self.folder, self.maps = folder, {m.path: m for m in maps}
        self.dropped = self.validate(allow_extra)
        if self.dropped:  # one line, as transformers says it
            print(f"k2jax: {folder.folder}: dropped {len(self.dropped)} multi-token-prediction tensors "
                  f"({', '.join(sorted({n.split('.')[0] + '.' + n.split('.')[1] + '.' + n.split('.')[2] + '.*' for n in self.dropped}))}); "
                  "the next-token model does not use them", file=sys.stderr)

    def validate(self, allow_extra=()) -> list[str]:
        """Every expected tensor present with its expected shape; no unknown tensors (raises CheckpointError);
        returns the tensors under `allow_extra` prefixes, which are skipped."""
        where = self.folder.folder
        expected = set()
        for m in self.maps.values():
            for name in m.hf_names():
                expected.add(name)
                if name not in self.folder:
                    raise CheckpointError(f"{where}: tensor {name} is missing (expected shape {list(m.hf_shape)})")
                dtype, shape = self.folder.info(name)
                if shape != m.hf_shape:
                    raise CheckpointError(f"{where}: tensor {name} has shape {list(shape)}, expected "
                                          f"{list(m.hf_shape)}")
                if dtype == np.dtype(ml_dtypes.float8_e4m3fn):
                    if name + "_scale_inv" not in self.folder:
                        raise CheckpointError(f"{where}: FP8 tensor {name} has no {name}_scale_inv")
                    want = tuple(-(-n // FP8_BLOCK) for n in shape)
                    have = self.folder.info(name + "_scale_inv")[1]
                    if tuple(have) != want:
                        raise CheckpointError(f"{where}: tensor {name}_scale_inv has shape {list(have)}, expected "
                                              f"{list(want)} for {name} of shape {list(shape)}")
                    expected.add(name + "_scale_inv")
                elif dtype.kind not in "f" and dtype != np.dtype(ml_dtypes.bfloat16):
                    raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}, expected a float type")
        rest = [n for n in self.folder.names() if n not in expected and not IGNORED.match(n)]
        dropped = [n for n in rest if any(n.startswith(p) for p in allow_extra)]
        unknown = sorted(set(rest) - set(dropped))
        if unknown:
            more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            raise CheckpointError(f"{where}: unknown tensor names not in this architecture: "
                                  f"{', '.join(unknown[:20])}{more}")
        return dropped

    def unit(self, m: "TensorMap", name: str, dtype) -> np.ndarray:
        """One HF tensor as the destination unit (dequantised, transposed, reshaped) in `dtype`."""
        return self.piece(m, name, None, m.unit_shape, dtype)

    def piece(self, m: "TensorMap", name: str, rows: tuple[int, int] | None, shape: tuple[int, ...],
              dtype) -> np.ndarray:
        """Source rows [r0, r1) of one HF tensor (all of it when rows is None) as their block of the
        destination unit, of `shape`. For FP8 tensors r0 must be a multiple of the 128-row scale block."""
        w = self.folder.get(name, rows)
        scale = None
        if w.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            r0, r1 = rows or (0, w.shape[0])
            if r0 % FP8_BLOCK:
                raise CheckpointError(f"{name}: row strip {rows} does not start on a {FP8_BLOCK}-row scale block")
            scale = self.folder.get(name + "_scale_inv", (r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)))
            _check_scale(w, scale, name)
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(_to_unit(w, scale, unit_shape=tuple(shape), transpose=m.transposed and w.ndim == 2,
                                       dtype=np.dtype(dtype)))

    def hf_tensor(self, name: str) -> np.ndarray:
        """One HF tensor as float32 (FP8 dequantised with its block scales)."""
        w = self.folder.get(name)
        if w.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            return dequantize_fp8(w, self.folder.get(name + "_scale_inv"), name)
        return w.astype(np.float32)

    def read(self, path: tuple[str, ...], index=None, dtype=np.float32) -> np.ndarray:
        """The slice `index` (a tuple of slices) of the k2jax array at `path`, assembled from HF tensors."""
        m = self.maps[path]
        index = tuple(index) if index is not None else ()
        index = index + (slice(None),) * (len(m.shape) - len(index))
        rest = list(index)
        layers = [None] if m.layers is None else list(m.layers)[rest.pop(0)]
        experts = [None] if not m.n_experts else list(range(m.n_experts))[rest.pop(0)]
        units = [[m.to_unit(self.hf_tensor(m.template.format(layer=l, e=e)))[tuple(rest)].astype(dtype)
                  for e in experts] for l in layers]
        out = np.stack([np.stack(u) for u in units])
        if not m.n_experts:
            out = out[:, 0]
        if m.layers is None:
            out = out[0]
        return out


def load_state(source: HFSource, abstract_state, shardings):
    """The model state with every array built shard by shard on its devices from `source`, in the abstract
    state's dtypes (the execution's parameter dtype; float32 where the declaration says so)."""
    flat = dict(nnx.to_flat_state(abstract_state))
    flat_sh = dict(nnx.to_flat_state(shardings))
    out = {}
    for path, var in flat.items():
        dtype = np.dtype(var.dtype)
        sharding = flat_sh[path].get_value()
        shards = {}  # replicas ask for the same slice: read it once per array

        def read(idx, p=path, d=dtype, shards=shards):
            key = tuple((s.start, s.stop, s.step) for s in idx)
            if key not in shards:
                shards[key] = source.read(p, idx, d)
            return shards[key]

        out[path] = var.replace(jax.make_array_from_callback(tuple(var.shape), sharding, read))
    return nnx.from_flat_state(out)


def load_hf_state(hf_dir: str, config: K2Config, abstract_state, shardings):
    """Validates the folder against the config, then loads it into `shardings`. Errors name the tensor;
    multi-token-prediction tensors are dropped with a notice."""
    from k2jax.model.config import mtp_prefixes

    folder = SafetensorsFolder(hf_dir)
    source = HFSource(folder, tensor_maps(config, abstract_state), allow_extra=mtp_prefixes(hf_dir))
    return load_state(source, abstract_state, shardings)
