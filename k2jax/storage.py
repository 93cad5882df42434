"""Every file k2jax reads or writes outside a checkpoint's arrays: local paths and object-store URLs alike.

One layer over etils.epath (which Orbax already uses; `gs://` goes through gcsfs), so a workdir, a checkpoint,
a tokenizer or a data file may live on Cloud Storage. Object stores have no append, no rename and no partial
write: `write_text` writes whole objects (atomic on GCS; on local disks through a temporary file and a rename),
and data files read record by record are first copied to a local cache.

Against an emulator, set STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (TensorStore) to its URL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading

from etils import epath

from k2jax.errors import StorageError

PROBE_TIMEOUT_S = 60.0  # how long a first look at a bucket may take before it is called unreachable

logging.getLogger("gcsfs").setLevel(logging.ERROR)  # gcsfs warns on every bucket-type probe without credentials


def is_url(path: str) -> bool:
    """Whether `path` names an object store (gs://, s3://, ...) rather than a local file."""
    return "://" in str(path)


def resolve(path: str) -> str:
    """A canonical spelling: local paths made absolute, URLs without a trailing slash."""
    path = str(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    """`path`/`parts`, for local paths and URLs."""
    return str(epath.Path(path).joinpath(*parts)) if is_url(path) else os.path.join(path, *parts)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _p(path: str) -> epath.Path:
    return epath.Path(path)


def exists(path: str) -> bool:
    return _p(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    return _p(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return _p(path).is_dir() if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries under a directory or prefix."""
    if is_url(path):
        return sorted(p.name for p in _p(path).iterdir())
    return sorted(os.listdir(path))


def glob(pattern: str) -> list[str]:
    """Paths matching a shell pattern (`*`, `?`, `[...]`) in its last components, sorted."""
    if not is_url(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    scheme, rest = pattern.split("://", 1)
    bucket, _, key = rest.partition("/")
    fixed = []
    for part in key.split("/"):
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    base = _p(f"{scheme}://{bucket}/" + "/".join(fixed))
    tail = "/".join(key.split("/")[len(fixed):])
    if not tail:
        return [str(base)] if base.exists() else []
    return sorted(str(p) for p in base.glob(tail))


def makedirs(path: str) -> None:
    """Creates a local directory and its parents (object stores have no directories: nothing to do)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    try:
        return _p(path).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{path}: not found") from None


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file: readers see the old content or the new one, never a part."""
    if is_url(path):
        _p(path).write_bytes(data)  # one object upload: it appears only once complete
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def open_file(path: str, mode: str = "rb"):
    """A file object (local, or a remote object read with ranged requests)."""
    return _p(path).open(mode) if is_url(path) else open(path, mode)


def rename(src: str, dst: str) -> None:
    """Moves a file or directory (on object stores: a copy of every object, then their deletion)."""
    if is_url(src):
        _p(src).rename(dst)
    else:
        os.replace(src, dst)


def size(path: str) -> int:
    return _p(path).stat().length if is_url(path) else os.path.getsize(path)


def file_sizes(path: str) -> dict[str, int]:
    """{file path: size in bytes} of every file under a directory or prefix (one listing on object stores)."""
    if is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        scheme = path.split("://", 1)[0]
        return {f"{scheme}://{k}": int(v.get("size", 0)) for k, v in fs.find(root, detail=True).items()}
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            f = os.path.join(dirpath, n)
            out[f] = os.path.getsize(f)
    return out


def local_copy(path: str, cache_dir: str | None = None, log=None) -> str:
    """`path` itself if local; else a local copy of the object (made once, keyed by its URL, size and
    modification time), for readers that seek record by record or need a real file (ArrayRecord)."""
    if not is_url(path):
        return path
    st = _p(path).stat()
    key = hashlib.sha256(f"{path}|{st.length}|{st.mtime}".encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "k2jax", "remote")
    out = os.path.join(cache_dir, key, basename(path))
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp.{os.getpid()}"
        with _p(path).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, out)
        if log:
            log(f"data: copied {path} ({st.length / 2**20:.1f} MiB) to {out}")
    return out


def check_reachable(path: str, flag: str, timeout_s: float | None = None) -> None:
    """For a URL: its bucket exists and answers within `timeout_s`, else a StorageError naming `flag` and the
    bucket (gcsfs alone retries a dead endpoint for minutes). Local paths pass."""
    if not is_url(path):
        return
    scheme, rest = path.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    result: dict = {}

    def probe():
        try:
            result["found"] = _p(bucket).exists()
        except Exception as e:  # noqa: BLE001 - any transport error is the same verdict for the user
            result["error"] = e

    # a daemon thread: a probe still retrying when the verdict is given must not hold the process at exit
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StorageError(f"{flag}={path}: the bucket {bucket} did not answer within {timeout_s:.0f} s "
                           "(network, endpoint or credentials)")
    if "error" in result:
        e = result["error"]
        raise StorageError(f"{flag}={path}: cannot reach the bucket {bucket} ({type(e).__name__}: {e})")
    if not result["found"]:
        raise StorageError(f"{flag}={path}: the bucket {bucket} does not exist or is not accessible "
                           "with these credentials")
