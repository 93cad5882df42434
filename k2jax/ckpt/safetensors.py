"""Reading and writing safetensors files with NumPy memory maps (no pickle, no torch, bf16/fp8 via ml_dtypes)."""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from k2jax import storage
from k2jax.errors import CheckpointError

SAFETENSORS_DTYPES = {  # the dtype codes of the safetensors header
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """One .safetensors file: `entries[name] = (dtype, shape, offsets)`; `get(name)` reads one tensor.

    Tensors are read with positioned reads into fresh buffers rather than through a memory map, so pages of
    tensors already converted do not stay mapped (and counted) in the process."""

    def __init__(self, path: str):
        self.path = path
        try:
            with storage.open_file(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                raw = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        self.metadata = raw.pop("__metadata__", None) or {}
        self._offset = 8 + n
        self.entries = {}
        for name, info in raw.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            self.entries[name] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), tuple(info["data_offsets"]))
    def keys(self):
        return self.entries.keys()

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor `name`, or only its rows [r0, r1) (leading dimension) when `rows` is given."""
        dtype, shape, (start, end) = self.entries[name]
        if rows is not None:
            row_bytes = (end - start) // max(shape[0], 1)
            start, end, shape = start + rows[0] * row_bytes, start + rows[1] * row_bytes, (rows[1] - rows[0],) + shape[1:]
        buf = np.empty(end - start, np.uint8)
        if storage.is_url(self.path):  # one ranged request
            with storage.open_file(self.path, "rb") as f:
                f.seek(self._offset + start)
                data = f.read(end - start)
            if len(data) != len(buf):
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
            buf[:] = np.frombuffer(data, np.uint8)
            return buf.view(dtype).reshape(shape)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < len(buf):
                n = os.preadv(fd, [view[done:]], self._offset + start + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
                done += n
        finally:
            os.close(fd)
        return buf.view(dtype).reshape(shape)


class SafetensorsFolder:
    """All tensors of an HF folder: `model.safetensors.index.json` with its shards, or one `model.safetensors`."""

    def __init__(self, folder: str):
        self.folder = folder
        index = storage.join(folder, "model.safetensors.index.json")
        single = storage.join(folder, "model.safetensors")
        if storage.isfile(index):
            weight_map = json.loads(storage.read_text(index)).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [fn for fn in files if not storage.isfile(storage.join(folder, fn))]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        elif storage.isfile(single):
            files, weight_map = ["model.safetensors"], None
        else:
            raise CheckpointError(f"{folder}: no model.safetensors.index.json or model.safetensors")
        self.files = {fn: SafetensorsFile(storage.join(folder, fn)) for fn in files}
        self.where: dict[str, str] = {}
        for fn, st in self.files.items():
            for name in st.keys():
                self.where[name] = fn
        if weight_map is not None:
            absent = [n for n, fn in weight_map.items() if n not in self.files[fn].entries]
            if absent:
                raise CheckpointError(f"{index}: tensors listed but absent from their shard: {absent[:10]}")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _ = self.files[self.where[name]].entries[name]
        return dtype, shape

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.files[self.where[name]].get(name, rows)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes `tensors` to `path` atomically (a temporary file renamed into place)."""
    header, offset = {}, 0
    items = list(tensors.items())
    for name, arr in items:
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)

