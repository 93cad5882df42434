"""What this host can do, measured: its fastest float32 GEMM and its streaming read rate; and a timing helper.

The decode and train benchmarks divide their work by these to give the fastest any implementation could go here.
"""

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


def peak_gemm_rate() -> float:
    """FLOP/s of the fastest of 5 jitted [1024, 768] x [768, 32768] float32 matmuls (the small preset's lm_head)."""
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones((1024, 768), jnp.float32), jnp.ones((768, 32768), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * 1024 * 768 * 32768 / min(timed(lambda: jax.block_until_ready(mm(a, b)), 5))


def read_rate() -> float:
    """Bytes/s of the fastest of 5 jitted matvecs over a 512 MB float32 matrix (a streaming read)."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((1, 8192), jnp.float32), jnp.ones((8192, 16384), jnp.float32)
    mv = jax.jit(lambda x, w: x @ w)
    return w.nbytes / min(timed(lambda: jax.block_until_ready(mv(x, w)), 5))
