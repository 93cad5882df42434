"""Accelerator facts (one table: peak dense bf16 FLOP/s, HBM, bandwidth, torus shape) and a measured matmul
rate for hosts the table does not know (CPUs)."""

from __future__ import annotations

import dataclasses
import time

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str  # libtpu's topology prefix, or the device_kind substring of a GPU
    hbm_bytes: float
    peak_flops: float  # dense bf16 FLOP/s
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus; 0 for GPUs
    cores_per_chip: int  # Cloud TPU names count TensorCores for v4/v5p, chips for v5e/v6e
    chip_config: str | None
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float = 0.0  # bytes/s per chip over all its inter-chip links (TPU ICI, GPU NVLink)


# ici_bandwidth: the published inter-chip Gbps per chip (v4 2,400; v5e 1,600; v5p 4,800; v6e 3,584) in bytes/s
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 3, 2, "megacore", 1228e9, 2400e9 / 8),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 2, 1, None, 819e9, 1600e9 / 8),
    "v5p": Chip("v5p", 95.74 * GiB, 459e12, 3, 2, "megacore", 2765e9, 4800e9 / 8),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 2, 1, None, 1640e9, 3584e9 / 8),
}
GPUS = {
    "H100": Chip("H100", 80 * GiB, 989e12, 0, 1, None, 3350e9, 900e9),
    "H200": Chip("H200", 141 * GiB, 989e12, 0, 1, None, 4800e9, 900e9),
    "A100": Chip("A100", 80 * GiB, 312e12, 0, 1, None, 2039e9, 600e9),
}
# jax device_kind substrings of each TPU family, most specific first ("TPU v5 lite" is a v5e, "TPU v5" a v5p)
_TPU_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"), ("TPU v6", "v6e"),
              ("TPU v4", "v4"))


def chip_of(device_kind: str) -> Chip | None:
    """The table's entry for a jax device_kind, or None (CPUs, unknown accelerators)."""
    kind = device_kind.lower()
    for sub, family in _TPU_KINDS:
        if sub.lower() in kind:
            return CHIPS[family]
    for name, chip in GPUS.items():
        if name.lower() in kind:
            return chip
    return None


def matmul_rate(m: int = 1024, k: int = 1024, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` jitted float32 [m, k] x [k, n] matmuls on the default device."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for jax.devices()[0]; where the table has no entry, a measured rate."""
    import jax

    kind = jax.devices()[0].device_kind
    chip = chip_of(kind)
    if chip is not None:
        return chip.peak_flops, f"{kind} peak"
    return matmul_rate(), f"measured {kind} float32 matmul rate"
