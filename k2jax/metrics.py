"""Training metrics to JSONL and TensorBoard event files (written directly: no TensorFlow needed)."""

from __future__ import annotations

import json
import os
import socket
import struct
import time


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _event(wall_time: float, step: int, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    """A tensorflow.Event protobuf: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        v = file_version.encode()
        msg += _field(3, 2, _varint(len(v)) + v)
    if summary is not None:
        msg += _field(5, 2, _varint(len(summary)) + summary)
    return msg


def _scalar_summary(tag: str, value: float) -> bytes:
    t = tag.encode()
    val = _field(1, 2, _varint(len(t)) + t) + _field(2, 5, struct.pack("<f", value))
    return _field(1, 2, _varint(len(val)) + val)


class MetricsWriter:
    """Appends one JSON line per logged step to metrics.jsonl and scalars to a TensorBoard event file."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.events = open(os.path.join(workdir, name), "ab")
        self._write_record(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write_record(self, data: bytes):
        header = struct.pack("<Q", len(data))
        self.events.write(header + struct.pack("<I", _masked(header)) + data + struct.pack("<I", _masked(data)))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        now = time.time()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._write_record(_event(now, step, summary=_scalar_summary(k, float(v))))
        self.events.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.events.close()


def read_events(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file written by MetricsWriter (checks the CRCs)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked(data[i:i + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        rec = data[i + 12:i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != _masked(rec):
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
