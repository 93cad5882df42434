"""Reads back the TensorBoard event files k2jax-train writes, checking each record's CRC (for tests; needs the test
extras): the reading is written apart from the writer (train/metrics.py), the masked CRC-32C is TensorBoard's own
(its record reader's), so a CRC bug in the writer cannot cancel out here."""

from __future__ import annotations

import struct

from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as masked_crc


def read_events(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file written by MetricsWriter (checks the CRCs)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        if struct.unpack("<I", data[i + 8:i + 12])[0] != masked_crc(data[i:i + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        rec = data[i + 12:i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != masked_crc(rec):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + n
        out.extend(_parse_event(rec))
    return out


def _read_varint(b: bytes, i: int):
    shift = n = 0
    while True:
        c = b[i]
        n |= (c & 0x7F) << shift
        i += 1
        if not c & 0x80:
            return n, i
        shift += 7


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        yield num, v


def _parse_event(rec: bytes):
    step, out = 0, []
    for num, v in _fields(rec):
        if num == 2:
            step = v
        elif num == 5:
            for snum, sval in _fields(v):
                if snum == 1:
                    tag, val = None, None
                    for vnum, vv in _fields(sval):
                        if vnum == 1:
                            tag = vv.decode()
                        elif vnum == 2:
                            val = struct.unpack("<f", vv)[0]
                    out.append((step, tag, val))
    return out
