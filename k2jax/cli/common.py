"""Flag helpers shared by the command-line entry points."""

from __future__ import annotations

from absl import flags

from k2jax.model.config import Execution, K2Config, load_preset, parse_assignments


def config_from_flags(config: str, sets: list[str] | None) -> tuple[K2Config, Execution]:
    """(architecture, execution) of the preset/file/config.json named by --config, with --set overrides applied
    to whichever of the two has each field (type-checked)."""
    return load_preset(config, **parse_assignments(sets))


def use_compilation_cache(flag: str | None, default_dir: str) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None: off).

    flag: a directory, or 'none' for off; unset (None) takes JAX_COMPILATION_CACHE_DIR when the environment has
    it, else `default_dir`. Only process 0 writes entries (JAX's rule), so a shared directory suits pods. A local
    directory is created here, and one that cannot be is refused naming the flag (JAX would only warn, per entry).
    """
    import os

    import jax

    if flag is not None and flag.strip().lower() in ("", "none"):
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = flag if flag is not None else (jax.config.jax_compilation_cache_dir or default_dir)
    if "://" not in path:  # gs:// and other remote stores are JAX's to open
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise flags.ValidationError(f"--compilation_cache_dir={path!r}: cannot create the directory ({e})") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise flags.ValidationError(f"--compilation_cache_dir={path!r}: the directory is not writable")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def run_main(main, *, host_malloc: bool = False):
    """absl app.run(main), turning k2jax's input errors into one clear line and exit status 2.

    host_malloc: on a CPU host, first re-execute with k2jax.runtime.HOST_MALLOC_ENV (for commands that run
    XLA executions step after step; K2JAX_HOST_MALLOC=0 keeps the current malloc settings)."""
    from absl import app

    from k2jax.runtime import quiet_platforms

    quiet_platforms()
    if host_malloc:
        from k2jax.runtime import reexec_with_host_malloc

        reexec_with_host_malloc()

    from k2jax.errors import K2Error

    def guarded(argv):
        from absl import logging

        logging.set_verbosity(logging.ERROR)  # Orbax and grain log every step at INFO/WARNING
        try:
            return main(argv)
        except (K2Error, flags.ValidationError) as e:
            import sys

            print(f"error: {e}", file=sys.stderr)
            return 2

    def parse(argv):
        """absl's flag parsing, but a bad flag value is an input error like the others: one line, exit status 2."""
        import sys

        try:
            return flags.FLAGS(argv)
        except SystemExit as e:  # absl's --help/--helpshort/--helpfull print the flags and exit 1: asked for, so 0
            if e.code == 1 and any(a.split("=")[0] in ("--help", "--helpshort", "--helpfull", "-h", "-?")
                                   for a in argv[1:]):
                sys.exit(0)
            raise
        except flags.Error as e:
            print(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=parse)
