"""The CPU host malloc settings: when the entry points re-exec with them, and that the re-exec takes effect."""

import os
import subprocess
import sys

import pytest

from k2jax.runtime import HOST_MALLOC_ENV, OPT_OUT, host_malloc_env


def test_host_malloc_env_decisions():
    base = {"PATH": "/bin"}
    env = host_malloc_env(base, accelerator=False, libc="glibc")
    assert env == {**base, **HOST_MALLOC_ENV}
    assert host_malloc_env(env, accelerator=False, libc="glibc") is None  # already set: no second re-exec
    assert host_malloc_env({**base, OPT_OUT: "0"}, accelerator=False, libc="glibc") is None
    assert host_malloc_env({**base, "MALLOC_ARENA_MAX": "4"}, accelerator=False, libc="glibc") is None
    assert host_malloc_env(base, accelerator=False, libc="musl") is None
    assert host_malloc_env(base, accelerator=True, libc="glibc") is None
    assert host_malloc_env({**base, "JAX_PLATFORMS": "cpu"}, accelerator=True, libc="glibc") is not None


def test_reexec_keeps_argv_and_sets_the_environment():
    code = ("import sys, os; from k2jax.runtime import reexec_with_host_malloc; reexec_with_host_malloc(); "
            "print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('MALLOC_MMAP_MAX_'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in HOST_MALLOC_ENV and k != OPT_OUT}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")[0]
    assert out == "1 0 ['a', '--b=1']", out
    env[OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code, "x"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")[0]
    assert out == "None None ['x']", out


def test_commands_on_a_host_without_tpu_do_not_print_libtpu_errors():
    """The installed k2jax-forward, with no JAX_PLATFORMS set, prints none of libtpu's initialisation errors on
    this accelerator-less host; the positive control (plain JAX in the same environment) shows they would appear."""
    import shutil

    from k2jax.runtime import accelerator_present, quiet_platforms

    # libtpu stays silent while another process (a parallel test compiling for a TPU topology) holds its lock,
    # and once k2jax.aot has declared a topology in this process (TPU_* variables, inherited by children)
    env = {**{k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")
              and not k.startswith("TPU_")}, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    noise = ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES")
    control = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert not accelerator_present()
    assert any(n in control.stderr for n in noise), control.stderr  # libtpu is installed and would speak
    exe = shutil.which("k2jax-forward")
    assert exe, "k2jax-forward is a console script of the package"
    r = subprocess.run([exe, "--batch=1", "--seq=8", "--repeats=1"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and not any(n in r.stderr for n in noise), r.stderr
    # compiling for a TPU topology loads libtpu for real: still quiet
    code = "from k2jax.aot import topology_devices; print(len(topology_devices('v5p-8')[1]))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["4"], r.stderr
    assert not any(n in r.stderr for n in noise), r.stderr
    chosen = {"JAX_PLATFORMS": "tpu"}  # a user's choice is kept
    assert not quiet_platforms(chosen) and chosen == {"JAX_PLATFORMS": "tpu"}
    empty = {}
    assert quiet_platforms(empty) and empty == {"JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("script, flag", [("k2jax-train", "--lora_rank"), ("k2jax-generate", "--prompt_ids"),
                                          ("k2jax-convert", "--merge_lora"), ("k2jax-compile", "--topology"),
                                          ("k2jax-forward", "--config")])
def test_each_console_script_runs_as_installed(script, flag):
    """Every entry point of setup.py is on PATH after `pip install` and answers --helpfull with its own flags (exit
    0, nothing on stderr: no libtpu noise on a host without a TPU)."""
    import shutil
    import subprocess

    path = shutil.which(script)
    assert path, f"{script} is not installed on PATH"
    r = subprocess.run([path, "--helpfull"], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert flag in r.stdout, r.stdout[-2000:]
    assert "TPU" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("jax_first", [False, True])
def test_the_library_on_a_host_without_tpu_prints_no_libtpu_errors(jax_first, tmp_path):
    """`import k2jax` then a JAX call, in a user's program with libtpu installed (the test extras): no libtpu
    probe errors, whether jax was imported first or not; a JAX_PLATFORMS the user set is kept. The positive
    control is test_commands_on_a_host_without_tpu_do_not_print_libtpu_errors's plain JAX run."""
    import subprocess

    env = {**{k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")
              and not k.startswith("TPU_")}, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    code = ("import jax\n" if jax_first else "") + (
        "import k2jax, jax\nm = k2jax.random_model(k2jax.load_config('tiny'))\n"
        "print(jax.default_backend(), m.config.vocab_size)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["cpu", "4096"], r.stdout
    assert "Failed to find host bounds" not in r.stderr and "TPU_WORKER_HOSTNAMES" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import k2jax, os; print(os.environ['JAX_PLATFORMS'])"],
                       env={**env, "JAX_PLATFORMS": "cpu,tpu"}, capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["cpu,tpu"], r.stdout + r.stderr
