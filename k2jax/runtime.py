"""Host process settings for CPU runs: glibc malloc that keeps XLA's per-step buffers instead of unmapping them.

XLA:CPU allocates each execution's temporaries (gigabytes per train step of configs/small.py) with malloc and
frees them afterwards. glibc serves such sizes with mmap/munmap, so every step faults all of it in again (the
README has the page faults and the time they cost, `benchmarks/train_small.py` counts them). With one arena, no
mmap and no trimming, the freed memory is reused. These settings only take effect at process start, hence a
re-exec.
"""

from __future__ import annotations

import os
import platform
import sys

HOST_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
OPT_OUT = "K2JAX_HOST_MALLOC"  # =0 keeps the process's malloc settings


def accelerator_present() -> bool:
    """Whether this host has an accelerator device (TPU or NVIDIA GPU) node."""
    return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0", "/dev/nvidiactl"))


def quiet_platforms(environ=os.environ) -> bool:
    """On a host with no accelerator device, restricts JAX to the CPU (JAX_PLATFORMS=cpu) unless the user chose
    platforms: an installed libtpu (the test extras bring it for AOT compilation) otherwise probes for a TPU and
    prints its initialisation errors ("Failed to find host bounds...", "TPU_WORKER_HOSTNAMES") before every
    command's own output. Returns whether it did. AOT compilation for TPU topologies is unaffected."""
    if "JAX_PLATFORMS" in environ or accelerator_present():
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def host_malloc_env(environ, *, accelerator: bool | None = None, libc: str | None = None) -> dict | None:
    """The environment to re-exec a CPU run with, or None: already set, opted out, user-set malloc variables,
    not glibc, or an accelerator host (JAX_PLATFORMS=cpu counts as CPU)."""
    if environ.get(OPT_OUT, "1") == "0" or any(k in environ for k in HOST_MALLOC_ENV):  # ours or the user's
        return None
    if (libc if libc is not None else platform.libc_ver()[0]) != "glibc":
        return None
    accelerator = accelerator_present() if accelerator is None else accelerator
    if accelerator and environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
        return None
    return {**environ, **HOST_MALLOC_ENV}


def reexec_with_host_malloc() -> None:
    """Replace this process by itself with HOST_MALLOC_ENV when host_malloc_env says so (same argv, same pid)."""
    env = host_malloc_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def quiet_library_import() -> None:
    """quiet_platforms for `import k2jax` in a user's program: the environment variable when JAX is not imported
    yet, JAX's own setting when it is but has started no backend; nothing once a backend runs or the user chose."""
    if "jax" not in sys.modules:
        quiet_platforms()
        return
    import jax
    from jax._src import xla_bridge

    if jax.config.jax_platforms or "JAX_PLATFORMS" in os.environ or accelerator_present():
        return
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")

