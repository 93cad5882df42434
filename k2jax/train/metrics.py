"""Training metrics to JSONL and TensorBoard event files (written directly: no TensorFlow needed)."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time

import google_crc32c

from k2jax import storage


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    c = google_crc32c.value(data)
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
    """Appends one JSON line per logged step to metrics.jsonl and scalars to a TensorBoard event file.

    On an object store (gs://...), which has no append, both files are kept in memory and uploaded whole at
    most every `upload_every_s` seconds and at close (as TensorFlow's GCS writer does on flush)."""

    def __init__(self, workdir: str, enabled: bool = True, upload_every_s: float = 30.0):
        self.enabled = enabled
        if not enabled:
            return
        self.remote, self.upload_every_s, self.uploaded = storage.is_url(workdir), upload_every_s, 0.0
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.jsonl_path, self.events_path = storage.join(workdir, "metrics.jsonl"), storage.join(workdir, name)
        if self.remote:
            old = storage.read_bytes(self.jsonl_path) if storage.exists(self.jsonl_path) else b""
            self.jsonl, self.events = io.BytesIO(old), io.BytesIO()
            self.jsonl.seek(0, io.SEEK_END)
        else:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl, self.events = open(self.jsonl_path, "ab"), open(self.events_path, "ab")
        self._write_record(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write_record(self, data: bytes):
        header = struct.pack("<Q", len(data))
        self.events.write(header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data)))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write((json.dumps({"step": step, **metrics}) + "\n").encode())
        now = time.time()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._write_record(_event(now, step, summary=_scalar_summary(k, float(v))))
        self._flush(force=False)

    def _flush(self, force: bool):
        if not self.remote:
            self.jsonl.flush()
            self.events.flush()
        elif force or time.monotonic() - self.uploaded >= self.upload_every_s:
            storage.write_bytes(self.jsonl_path, self.jsonl.getvalue())
            storage.write_bytes(self.events_path, self.events.getvalue())
            self.uploaded = time.monotonic()

    def close(self):
        if self.enabled:
            self._flush(force=True)
            self.jsonl.close()
            self.events.close()
