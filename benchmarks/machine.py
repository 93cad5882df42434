"""What this host can do, measured: its fastest float32 GEMM and its streaming read rate; a timing helper; and
the line every benchmark prints about where it ran (JAX's backend and device count, PyTorch's threads).

The decode and train benchmarks divide their work by these to give the fastest any implementation could go here.
Benchmarks run on the devices the process has: one CPU device unless XLA_FLAGS says otherwise (they do not
import the tests' conftest, which simulates 8).
"""

import os
import time


def timed(fn, n: int, warmup: int = 1) -> list[float]:
    """Wall times in seconds of n calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def describe(jax, torch=None) -> str:
    """Where the figures come from: JAX's backend and device count, PyTorch's threads, the host's cores."""
    line = f"devices: {jax.device_count()} {jax.default_backend()} device(s) for k2jax"
    if torch is not None:
        line += f", {torch.get_num_threads()} torch threads"
    return line + f", {os.cpu_count()} cores"


def peak_gemm_rate() -> float:
    """FLOP/s of the fastest of 5 jitted [1024, 768] x [768, 32768] float32 matmuls (the small preset's lm_head)."""
    from k2jax.hardware import matmul_rate

    return matmul_rate(1024, 768, 32768)


def read_rate() -> float:
    """Bytes/s of the fastest of 5 jitted matvecs over a 512 MB float32 matrix (a streaming read)."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((1, 8192), jnp.float32), jnp.ones((8192, 16384), jnp.float32)
    mv = jax.jit(lambda x, w: x @ w)
    return w.nbytes / min(timed(lambda: jax.block_until_ready(mv(x, w)), 5))
