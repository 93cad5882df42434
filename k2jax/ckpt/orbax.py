"""The one checkpoint layout (Orbax): `<root>/<step>/{model, config, [opt_state, train]}`.

`model` holds the model state (params and router biases) as a nested dict of arrays, `config` the
architecture (K2Config) and the dtype the parameters were saved in, as JSON (checkpoints of earlier versions
hold one flat dict that also has execution fields; they still load). Training adds `opt_state` and `train` (step, rng, data-iterator state). A step directory
appears only once all of it is written (Orbax writes to a temporary directory and renames it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from k2jax import storage
from k2jax.errors import CheckpointError, ConfigError
from k2jax.model.config import K2Config


def _quiet_abandoned_reads():
    """A failed read of one array leaves Orbax's other pending reads to print their own tracebacks when they are
    collected ("Task exception was never retrieved", "Event loop is closed", hundreds of lines), after the
    error itself was raised and reported (describe_damage). Those echoes, and only those, are dropped."""
    echoes = ("Encountered error while reading array index", "Event loop is closed")

    def echo(exc) -> bool:
        return exc is not None and str(exc).startswith(echoes)

    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(info):
        if not echo(info.exc_value):
            previous_unraisable(info)

    def excepthook(kind, value, tb):
        if not echo(value):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook

    class _DropEchoes(logging.Filter):
        def filter(self, record):
            return not (record.exc_info and echo(record.exc_info[1])) and "exception was never retrieved" not in \
                record.getMessage()

    logging.getLogger("asyncio").addFilter(_DropEchoes())
    # the abandoned reads' coroutines, collected at exit, warn "never awaited" (and "Enable tracemalloc ...")
    import warnings

    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


_quiet_abandoned_reads()


class _DropReadOnlyNotices(logging.Filter):
    """Orbax warns on every read-only open of a checkpoint (each k2jax.load): that it is read-only, and that the
    items it was not asked for were not restored. Neither is news to a reader; both fill a notebook."""

    NOTICES = ("read_only=True, setting save_interval_steps=0", "Given directory is read only",
               "was found in the checkpoint, but could not be restored")

    def filter(self, record):
        return not any(n in record.getMessage() for n in self.NOTICES)


logging.getLogger("absl").addFilter(_DropReadOnlyNotices())


def config_to_json(config: K2Config, param_dtype: str, lora: dict | None = None) -> dict:
    """The `config` item: the architecture and the dtype of the saved parameters (a LoRA run's checkpoint adds
    `lora`: its LoraConfig and the reference to its base, k2jax.ckpt.lora)."""
    out = {"architecture": dataclasses.asdict(config), "param_dtype": param_dtype}
    if lora is not None:
        out["lora"] = lora
    return out


def config_from_json(d: dict) -> tuple[K2Config, str]:
    """(architecture, saved parameter dtype) of a `config` item, current or flat (earlier versions)."""
    arch = d.get("architecture", d)
    known = {f.name for f in dataclasses.fields(K2Config)}
    return K2Config(**{k: v for k, v in arch.items() if k in known}), d.get("param_dtype", "float32")


def manager(root: str, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager over `root` with the k2jax items."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, read_only=read_only,
                                           create=not read_only)
    return ocp.CheckpointManager(storage.resolve(root), options=options,
                                 item_names=("model", "config", "opt_state", "train"))


def save_args(model_state, config: K2Config, param_dtype: str, opt_state=None,
              train: dict | None = None, lora: dict | None = None) -> ocp.args.Composite:
    """The Orbax items of one step: model state, config, and for training the optimizer state and `train`
    (`lora`: a LoRA run's adapters-and-base record; its `model` item then holds the adapters only)."""
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
             "config": ocp.args.JsonSave(config_to_json(config, param_dtype, lora))}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if train is not None:
        items["train"] = ocp.args.JsonSave(train)
    return ocp.args.Composite(**items)


def step_dirs(root: str) -> list[int]:
    """The complete steps under a checkpoint root, oldest first (Orbax writes _CHECKPOINT_METADATA last)."""
    steps = sorted(int(d) for d in storage.listdir(root) if d.isdigit())
    return [s for s in steps if is_complete(storage.join(root, str(s)))]


def is_complete(step_dir: str) -> bool:
    """Orbax finished writing this step: on local disks its directory was renamed into place with
    _CHECKPOINT_METADATA in it; on object stores (no rename) it also wrote commit_success.txt last."""
    if not storage.exists(storage.join(step_dir, "_CHECKPOINT_METADATA")):
        return False
    return not storage.is_url(step_dir) or storage.exists(storage.join(step_dir, "commit_success.txt"))


def is_step_dir(path: str) -> bool:
    return storage.isdir(storage.join(path, "model")) and storage.isdir(storage.join(path, "config"))


def resolve_step_dir(path: str) -> str:
    """`path` itself if it is a step directory, else the latest complete step under it (errors name the path)."""
    path = storage.resolve(path)
    if not storage.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if is_step_dir(path):
        if not is_complete(path):
            raise CheckpointError(f"{path}: checkpoint is incomplete (its writing did not finish)")
        return path
    complete = step_dirs(path)
    if not complete:
        pending = [d for d in storage.listdir(path) if "tmp" in d or d.endswith(".partial")]
        hint = f" (unfinished: {', '.join(sorted(pending))})" if pending else ""
        raise CheckpointError(f"{path}: no complete k2jax checkpoint{hint}")
    return storage.join(path, str(complete[-1]))


def split_step_dir(step_dir: str) -> tuple[str, int]:
    """(root, step) of a step directory."""
    step_dir = step_dir.rstrip("/")
    name = storage.basename(step_dir)
    return step_dir[: len(step_dir) - len(name) - 1], int(name)


def read_config(step_dir: str) -> tuple[K2Config, str]:
    """(architecture, saved parameter dtype) of a step directory."""
    return config_from_json(read_config_item(step_dir))


def read_config_item(step_dir: str) -> dict:
    """The raw `config` item of a step directory (errors name the file)."""
    path = storage.join(step_dir, "config", "metadata")  # the file Orbax's JSON handler writes
    if not storage.isfile(path):
        raise CheckpointError(f"{step_dir}: no config item ({path} is missing)")
    try:
        item = json.loads(storage.read_text(path))
        config_from_json(item)
        return item
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a k2jax config item ({e})") from None


def restore_model_state(step_dir: str, abstract_state, shardings, flag: str = ""):
    """The `model` item restored straight into `shardings` (dtype of the abstract state), as an nnx.State.

    A step that cannot be read is reported by step, tensor and file, with the newest other step that can be
    (`flag` names where the path came from)."""
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
    root, step = split_step_dir(step_dir)

    def read(at: int):
        with manager(root, read_only=True) as mgr:
            return mgr.restore(at, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))).model

    try:
        restored = read(step)
    except Exception as e:  # noqa: BLE001 - TensorStore and Orbax raise plain Exceptions
        msg = f"{flag + ': ' if flag else ''}checkpoint step {step} in {root} is damaged: {describe_damage(step_dir, e)}"
        for other in reversed([s for s in step_dirs(root) if s != step]):
            try:
                read(other)
            except Exception:  # noqa: BLE001
                continue
            raise CheckpointError(f"{msg}. Step {other} is intact: use {storage.join(root, str(other))}") from None
        raise CheckpointError(f"{msg}; no other step in {root} can be read") from None
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state


def describe_damage(step_dir: str, error: BaseException) -> str:
    """Which tensor and file of a step directory a failed read tripped on, from TensorStore's error chain."""
    import re

    messages = []
    while error is not None and len(messages) < 8:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    detail = next((m for m in reversed(messages) if "Error reading" in m or "NOT_FOUND" in m), messages[-1])
    detail = detail.strip().splitlines()[0][:400]
    found = re.search(r'Error reading "([^"/]+)/', detail)
    what = f"tensor {found.group(1)}" if found else "a tensor"
    size = re.search(r"value of size (\d+)", detail)
    files = []
    if size:  # a truncated data file: the one whose size the reader saw
        files = [f for f, n in storage.file_sizes(step_dir).items()
                 if n == int(size.group(1)) and f.rsplit("/", 2)[-2] == "d"]
    where = f", file {files[0]}" if len(files) == 1 else ""
    return f"{what}{where} cannot be read ({detail})"


def check_shapes(step_dir: str, abstract) -> None:
    """Compares the checkpoint's array metadata with the config's shapes before reading any weight."""
    root, step = split_step_dir(step_dir)
    try:
        with manager(root, read_only=True) as mgr:
            tree = mgr.item_metadata(step)["model"]
    except Exception:  # metadata layout differs between Orbax versions: the restore itself still checks
        return
    if tree is None:
        return
    want = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
    have = {"/".join(str(getattr(k, "key", k)) for k in kp): tuple(getattr(m, "shape", ()))
            for kp, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"{step_dir}: tensor {name} is missing (expected shape {list(shape)})")
        if have[name] != shape:
            raise CheckpointError(f"{step_dir}: tensor {name} has shape {list(have[name])}, expected {list(shape)}")


# ------------------------------------------------------------------------------------------------ leaves, read alone
def leaf_name(path: tuple[str, ...]) -> str:
    """Orbax's directory name of a model leaf (its dict keys joined by dots)."""
    return ".".join(path)


def _open_leaf(item_dir: str, name: str):
    """A tensorstore view of one saved leaf, whether the item was written with OCDBT (training) or not; the
    item may be local or in a bucket (gs://)."""
    if storage.exists(storage.join(item_dir, name, ".zarray")):
        kv = (storage.join(item_dir, name) + "/" if storage.is_url(item_dir)
              else {"driver": "file", "path": os.path.join(item_dir, name)})
        return ts.open({"driver": "zarr", "kvstore": kv}, open=True).result()
    base = item_dir.rstrip("/") + "/" if storage.is_url(item_dir) else f"file://{item_dir}"
    return ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": name}},
                   open=True).result()


def leaf_reader(item_dir: str):
    """read(path, idx) -> one unit (an array at a layer/expert index) of a saved model item, stores opened once."""
    stores = {}

    def read(path: tuple[str, ...], idx: tuple[int, ...]) -> np.ndarray:
        if path not in stores:
            stores[path] = _open_leaf(item_dir, leaf_name(path))
        return np.asarray(stores[path][idx].read().result())

    return read


def write_json(path: str, obj) -> None:
    """Writes a local JSON file whole or not at all (a temporary file renamed into place)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)
