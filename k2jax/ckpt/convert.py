"""k2jax-convert: the official HF release (FP8 or bf16 safetensors) to a k2jax Orbax checkpoint, and back.

Import streams one source tensor at a time: each (layer, expert) unit of a destination array is one chunk of
a zarr array (tensorstore creates the arrays; the uncompressed chunks are written directly as files), and a
unit larger than CHUNK_BYTES is cut into strips of source rows, each read, dequantised and written on its
own, so peak memory is a few chunks per worker whatever the checkpoint size or its largest tensor. Units finish independently (`--workers` threads); a marker per finished unit makes an
interrupted conversion resumable with the same command. Everything is staged in `<output>/0.partial` and
renamed to `<output>/0` only when complete, so a half-written conversion never loads.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import shutil
import threading
import time

import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import nnx

from k2jax import storage
from k2jax.progress import bar
from k2jax.ckpt.hf import FP8_BLOCK, HFSource, TensorMap, tensor_maps, units
from k2jax.ckpt.orbax import config_to_json, leaf_name, leaf_reader, read_config, resolve_step_dir, write_json
from k2jax.ckpt.safetensors import SafetensorsFolder, write_safetensors
from k2jax.errors import CheckpointError
from k2jax.model.config import PARAM_DTYPES, Execution, K2Config, from_hf_config, mtp_prefixes, to_hf_config
from k2jax.model.init import abstract_model
from k2jax.model.factory import dtype_of
from k2jax.model.params import spec_of

STEP = 0
CHUNK_BYTES = 32 * 2**20
_ZARR_DTYPE = {np.dtype(np.float32): "<f4", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def _spec(path: str, shape, chunks, dtype, create: bool):
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
            "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": _ZARR_DTYPE[dtype],
                         "compressor": None, "dimension_separator": "."}}
    return ts.open(spec, create=create, open=not create, delete_existing=False).result()


class Progress:
    """Tensors done of the total and the GB/s read, as a progress bar (k2jax.progress: silent off a terminal)."""

    def __init__(self, total: int, quiet: bool):
        self.bar = bar(total, "tensors", unit="tensor", quiet=quiet)
        self.bytes, self.t0, self.lock = 0, time.perf_counter(), threading.Lock()

    def add(self, nbytes: int, count: int = 1):
        with self.lock:
            self.bytes += nbytes
            rate = self.bytes / max(time.perf_counter() - self.t0, 1e-9) / 1e9
            self.bar.set_postfix_str(f"{self.bytes / 1e9:.2f} GB read, {rate:.2f} GB/s", refresh=False)
            self.bar.update(count)

    def finish(self):
        self.bar.close()


# the orbax-checkpoint releases whose on-disk layout _finalize writes (its metadata files and handler names are
# Orbax's own, written here so a conversion streams without holding the model): tests/test_convert.py restores a
# converted step through Orbax's CheckpointManager of the installed release
ORBAX_LAYOUT = ((0, 12), (0, 13))  # from, before


def check_orbax_layout(version: str | None = None) -> None:
    """Refuses, before any work, an orbax-checkpoint release whose layout the converter was not checked against."""
    import orbax.checkpoint as ocp

    version = version or ocp.__version__
    found = tuple(int(p) for p in version.split(".")[:2])
    if not ORBAX_LAYOUT[0] <= found < ORBAX_LAYOUT[1]:
        want = ".".join(map(str, ORBAX_LAYOUT[0]))
        raise CheckpointError(f"orbax-checkpoint {version} is installed; k2jax-convert writes the checkpoint layout of "
                              f"orbax-checkpoint {want}.x (setup.py pins it): install that release")


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(_bytes(a), digest_size=16).hexdigest()


def import_hf(hf_dir: str, output_dir: str, *, dtype: str = "bfloat16", workers: int = 4, verify: bool = False,
              quiet: bool = False, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Converts an HF folder into `<output_dir>/0` (a k2jax checkpoint); returns that step directory.

    Units over `chunk_bytes` are written in strips of at most that size (when their shape allows)."""
    if dtype not in PARAM_DTYPES:
        raise CheckpointError(f"--dtype: expected one of {list(PARAM_DTYPES)}, got {dtype!r}")
    check_orbax_layout()
    config = from_hf_config(hf_dir)
    _, abstract = abstract_model(config, execution=Execution(param_dtype=dtype, dtype=dtype))
    maps = tensor_maps(config, abstract)
    source = HFSource(SafetensorsFolder(hf_dir), maps, allow_extra=mtp_prefixes(hf_dir))  # validates names, shapes, dtypes
    final = os.path.join(output_dir, str(STEP))
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists; choose an empty --output_dir")
    stage = os.path.join(output_dir, f"{STEP}.partial")
    os.makedirs(os.path.join(stage, "done"), exist_ok=True)
    _check_stage_config(stage, config, dtype)

    arrays, jobs = {}, []
    for m in maps:
        dt = np.dtype(dict(nnx.to_flat_state(abstract))[m.path].dtype)  # the declared dtype rule
        lead = (1 if m.layers is not None else 0) + (1 if m.n_experts else 0)
        fp8 = source.folder.info(m.hf_names()[0])[0] == np.dtype(ml_dtypes.float8_e4m3fn)
        split = _split(m, dt.itemsize, fp8, chunk_bytes)
        unit = list(m.unit_shape)
        if split is not None:
            unit[split[0]] = split[1]
        chunks = (1,) * lead + tuple(unit)
        path = os.path.join(stage, "model", leaf_name(m.path))
        arrays[m.path] = (path, dt, chunks)
        store = _spec(path, m.shape, chunks, dt, create=not os.path.exists(os.path.join(path, ".zarray")))
        for idx, name in units(m):
            jobs.append((m, path, store, idx, name, dt, split))
    progress = Progress(len(jobs), quiet)
    todo = []
    for job in jobs:
        if os.path.exists(_marker(stage, job[4])):
            progress.add(0)
        else:
            todo.append(job)

    def run(job):
        m, path, _, idx, name, dt, split = job
        digest = hashlib.blake2b(digest_size=16)
        for chunk, rows, shape, _ in _pieces(m, idx, split):
            piece = source.unit(m, name, dt) if rows is None else source.piece(m, name, rows, shape, dt)
            digest.update(_bytes(piece))
            _write_chunk(os.path.join(path, ".".join(map(str, chunk))), piece)
            del piece
        with open(_marker(stage, name) + ".tmp", "w") as f:
            f.write(digest.hexdigest())
        os.replace(_marker(stage, name) + ".tmp", _marker(stage, name))
        dtype, shape = source.folder.info(name)
        progress.add(int(np.prod(shape)) * dtype.itemsize)

    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for fut in cf.as_completed([pool.submit(run, j) for j in todo]):
            fut.result()
    progress.finish()
    if verify:
        verify_import(stage, source, jobs)
    _finalize(stage, final, config, dtype, arrays, abstract)
    return final


def _split(m: TensorMap, itemsize: int, fp8: bool, chunk_bytes: int) -> tuple[int, int] | None:
    """(unit dim, size along it) of the strips a large unit is written in; None when it is one chunk.

    A strip is a run of the HF tensor's rows (its output features): contiguous in the source file, and one
    block along the unit dim they map to. FP8 strips start on the 128-row scale blocks."""
    unit = m.unit_shape
    nbytes = math.prod(unit) * itemsize
    if nbytes <= chunk_bytes or len(m.hf_shape) != 2:
        return None
    inp = m.hf_shape[1]
    if m.transposed:  # unit = (in dims..., out dims...): split the first out dim
        q = next((i for i in range(1, len(unit)) if math.prod(unit[:i]) == inp), None)
        if q is None:
            return None
        inner = math.prod(unit[q + 1:])
    elif tuple(unit) == tuple(m.hf_shape):
        q, inner = 0, 1
    else:
        return None
    best = 0
    for n in range(1, unit[q]):
        if unit[q] % n or (fp8 and (n * inner) % FP8_BLOCK):
            continue
        if nbytes // unit[q] * n > chunk_bytes:
            break
        best = n
    return (q, best) if best else None


def _pieces(m: TensorMap, idx: tuple[int, ...], split):
    """(chunk index, source rows or None for the whole unit, piece shape, index into the array) per piece."""
    zeros = (0,) * len(m.unit_shape)
    if split is None:
        yield idx + zeros, None, m.unit_shape, idx
        return
    q, n = split
    inner = math.prod(m.unit_shape[q + 1:]) if m.transposed else 1
    shape = tuple(n if i == q else d for i, d in enumerate(m.unit_shape))
    for j in range(m.unit_shape[q] // n):
        chunk = idx + tuple(j if i == q else 0 for i in range(len(zeros)))
        where = idx + (slice(None),) * q + (slice(j * n, (j + 1) * n),)
        yield chunk, (j * n * inner, (j + 1) * n * inner), shape, where


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def _write_chunk(path: str, piece: np.ndarray) -> None:
    """One uncompressed zarr chunk: the array's bytes in C order (what tensorstore reads back)."""
    with open(path, "wb") as f:
        f.write(_bytes(piece))


def _marker(stage: str, hf_name: str) -> str:
    return os.path.join(stage, "done", hf_name)


def _check_stage_config(stage: str, config: K2Config, dtype: str):
    """A resumed conversion must be of the same model and dtype; records it on the first run."""
    path = os.path.join(stage, "k2_config.json")
    want = config_to_json(config, dtype)
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if have != want:
            flat = lambda d: {**d.get("architecture", {}), "param_dtype": d.get("param_dtype")}  # noqa: E731
            have, want = flat(have), flat(want)
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise CheckpointError(f"{stage} holds an unfinished conversion of a different config (fields {diff}); "
                                  "remove it or use another --output_dir")
    else:
        with open(path + ".tmp", "w") as f:
            json.dump(want, f)
        os.replace(path + ".tmp", path)


def verify_import(stage: str, source: HFSource, jobs) -> None:
    """Re-reads every written unit and compares shape, dtype and checksum with a fresh read of the source."""
    for m, _, store, idx, name, dt, split in jobs:
        digest = hashlib.blake2b(digest_size=16)
        for _, rows, shape, where in _pieces(m, idx, split):
            written = store[where].read().result()
            want = source.unit(m, name, dt) if rows is None else source.piece(m, name, rows, shape, dt)
            if written.shape != want.shape or written.dtype != want.dtype:
                raise CheckpointError(f"verify: {name}: wrote {written.dtype}{list(written.shape)}, expected "
                                      f"{want.dtype}{list(want.shape)}")
            if _digest(written) != _digest(want):
                raise CheckpointError(f"verify: {name}: checksum differs from the source")
            digest.update(_bytes(want))
        with open(_marker(stage, name)) as f:
            if f.read() != digest.hexdigest():
                raise CheckpointError(f"verify: {name}: checksum differs from the one recorded at write time")


def _finalize(stage: str, final: str, config: K2Config, dtype: str, arrays, abstract):
    """Writes the Orbax metadata of the `model` and `config` items, then renames the stage into place."""
    tree = {}
    for path, (_, dt, _) in arrays.items():
        shape = tuple(dict(nnx.to_flat_state(abstract))[path].shape)
        tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)}}
    meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    write_json(os.path.join(stage, "model", "_METADATA"), meta)
    os.makedirs(os.path.join(stage, "config"), exist_ok=True)
    write_json(os.path.join(stage, "config", "metadata"), config_to_json(config, dtype))
    now = time.time_ns()
    write_json(os.path.join(stage, "_CHECKPOINT_METADATA"), {
        "item_handlers": {
            "config": "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
            "model": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"},
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
        "custom_metadata": {"converted_by": "k2jax-convert"}})
    # the marker Orbax looks for where it cannot rename (object stores): a converted step copied to a bucket
    # is complete there too
    for d in (stage, os.path.join(stage, "model"), os.path.join(stage, "config")):
        with open(os.path.join(d, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {d}")
    shutil.rmtree(os.path.join(stage, "done"))
    os.remove(os.path.join(stage, "k2_config.json"))
    os.replace(stage, final)


# ------------------------------------------------------------------------------------------------ export
def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float W [out, in] -> (e4m3 W, float32 scale_inv [ceil(out/128), ceil(in/128)]) with W ≈ fp8 · scale."""
    out, inp = w.shape
    bo, bi = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = np.zeros((bo * FP8_BLOCK, bi * FP8_BLOCK), np.float32)
    padded[:out, :inp] = w
    blocks = padded.reshape(bo, FP8_BLOCK, bi, FP8_BLOCK)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max), 1.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:out, :inp]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def export_hf(checkpoint_dir: str, output_dir: str, *, fp8: bool = False, shard_bytes: int = 5 * 2**30,
              quiet: bool = False, merge_lora: bool = False, base: str = "") -> str:
    """Writes HF-format safetensors shards (official names), an index and config.json from a k2jax checkpoint.

    Tensors are read one unit at a time from the checkpoint; `fp8` re-quantises linear weights to e4m3 with
    128x128 block scales (`<name>_scale_inv`). A LoRA run's checkpoint needs `merge_lora`: each unit is then its
    base's (the recorded base, or `base`, checked by hash) plus its adapters' update. Returns output_dir.
    """
    from k2jax.ckpt.lora import merged_unit_reader, read_lora

    step_dir = resolve_step_dir(checkpoint_dir)
    config, saved_dtype = read_config(step_dir)
    _, abstract = abstract_model(config)
    maps = tensor_maps(config, abstract)
    rec = read_lora(step_dir)
    if rec is None and merge_lora:
        raise CheckpointError(f"--merge_lora: {step_dir} is a full model's checkpoint, not a LoRA run's")
    if rec is not None and not merge_lora:
        raise CheckpointError(f"{step_dir} is a LoRA run's checkpoint (adapters only): export merged weights with "
                              "--merge_lora, or the adapters as a PEFT folder with --adapter_only")
    read_unit = (leaf_reader(storage.join(step_dir, "model")) if rec is None
                 else merged_unit_reader(step_dir, rec, config, maps, base))
    os.makedirs(output_dir, exist_ok=True)
    hf_dtype = dtype_of(saved_dtype)
    shards, current, size = [], {}, 0
    total = sum(1 for m in maps for _ in units(m))
    progress = Progress(total, quiet)
    for m in maps:
        for idx, name in units(m):
            unit = read_unit(m.path, idx)
            hf = np.ascontiguousarray(m.to_hf(unit))
            tensors = {}
            spec = spec_of(m.path)
            # the official FP8 release quantises the linear layers trained by Muon, not embed, lm_head, router
            linear = fp8 and hf.ndim == 2 and spec.group == "muon" and not spec.float32
            if linear:
                tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(hf.astype(np.float32))
            elif spec.float32:
                tensors[name] = hf.astype(np.float32)
            else:
                tensors[name] = hf.astype(hf_dtype)
            for k, v in tensors.items():
                current[k] = v
                size += v.nbytes
            progress.add(unit.nbytes)
            if size >= shard_bytes:
                shards.append(current)
                current, size = {}, 0
    if current:
        shards.append(current)
    progress.finish()
    n = len(shards)
    weight_map, total_size = {}, 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(output_dir, fname), tensors, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total_size += v.nbytes
    write_json(os.path.join(output_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    hf_config = to_hf_config(config, saved_dtype)
    if fp8:
        hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    write_json(os.path.join(output_dir, "config.json"), hf_config)
    return output_dir
