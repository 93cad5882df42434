"""Progress bars for long work (conversion, long generation, compilation).

tqdm bars on stderr when it is a terminal or inside a Jupyter kernel; silent when stderr goes to a file or a pipe
(CI, logs, a launcher's log file). K2JAX_PROGRESS=1 or 0 forces them on or off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading


def in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def enabled() -> bool:
    """Whether progress bars are shown: forced by K2JAX_PROGRESS, else on a terminal or in a notebook."""
    forced = os.environ.get("K2JAX_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or in_notebook()


def bar(total: int | None = None, desc: str = "", unit: str = "it", *, unit_scale: bool = False,
        quiet: bool = False, **kw):
    """A tqdm bar on stderr (disabled, and writing nothing, when not `enabled()` or `quiet`)."""
    from tqdm import tqdm  # the plain bar: it renders in terminals and in notebooks' stderr alike

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, dynamic_ncols=True,
                disable=quiet or not enabled(), **kw)


@contextlib.contextmanager
def busy(desc: str, quiet: bool = False):
    """While the block runs (one blocking call, e.g. a compile), a line with `desc` and the seconds elapsed."""
    b = bar(desc=desc, quiet=quiet, bar_format="{desc}: {elapsed}")
    if b.disable:
        yield
        return
    stop = threading.Event()

    def tick():
        while not stop.wait(0.5):
            b.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        b.close()
