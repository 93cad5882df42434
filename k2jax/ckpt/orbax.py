"""The one checkpoint layout (Orbax): `<root>/<step>/{model, config, [opt_state, train]}`.

`model` holds the model state (params and router biases) as a nested dict of arrays, `config` the
architecture (K2Config) and the dtype the parameters were saved in, as JSON (checkpoints of earlier versions
hold one flat dict that also has execution fields; they still load). Training adds `opt_state` and `train` (step, rng, data-iterator state). A step directory
appears only once all of it is written (Orbax writes to a temporary directory and renames it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from k2jax.errors import CheckpointError, ConfigError
from k2jax.model.config import K2Config


def config_to_json(config: K2Config, param_dtype: str) -> dict:
    """The `config` item: the architecture and the dtype of the saved parameters."""
    return {"architecture": dataclasses.asdict(config), "param_dtype": param_dtype}


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
    return ocp.CheckpointManager(os.path.abspath(root), options=options,
                                 item_names=("model", "config", "opt_state", "train"))


def save_args(model_state, config: K2Config, param_dtype: str, opt_state=None,
              train: dict | None = None) -> ocp.args.Composite:
    """The Orbax items of one step: model state, config, and for training the optimizer state and `train`."""
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
             "config": ocp.args.JsonSave(config_to_json(config, param_dtype))}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if train is not None:
        items["train"] = ocp.args.JsonSave(train)
    return ocp.args.Composite(**items)


def resolve_step_dir(path: str) -> str:
    """`path` itself if it is a step directory, else the latest complete step under it (errors name the path)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if os.path.isdir(os.path.join(path, "model")) and os.path.isdir(os.path.join(path, "config")):
        if not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
            raise CheckpointError(f"{path}: checkpoint is incomplete (its writing did not finish)")
        return path
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d)))
    complete = [s for s in steps if os.path.exists(os.path.join(path, str(s), "_CHECKPOINT_METADATA"))]
    if not complete:
        pending = [d for d in os.listdir(path) if "tmp" in d or d.endswith(".partial")]
        hint = f" (unfinished: {', '.join(sorted(pending))})" if pending else ""
        raise CheckpointError(f"{path}: no complete k2jax checkpoint{hint}")
    return os.path.join(path, str(complete[-1]))


def read_config(step_dir: str) -> tuple[K2Config, str]:
    """(architecture, saved parameter dtype) of a step directory."""
    path = os.path.join(step_dir, "config", "metadata")  # the file Orbax's JSON handler writes
    if not os.path.isfile(path):
        raise CheckpointError(f"{step_dir}: no config item ({path} is missing)")
    try:
        with open(path) as f:
            return config_from_json(json.load(f))
    except (json.JSONDecodeError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a k2jax config item ({e})") from None


def restore_model_state(step_dir: str, abstract_state, shardings):
    """The `model` item restored straight into `shardings` (dtype of the abstract state), as an nnx.State."""
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
    root, step = os.path.split(step_dir.rstrip("/"))
    with manager(root, read_only=True) as mgr:
        restored = mgr.restore(int(step), args=ocp.args.Composite(model=ocp.args.StandardRestore(target))).model
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state


def check_shapes(step_dir: str, abstract) -> None:
    """Compares the checkpoint's array metadata with the config's shapes before reading any weight."""
    root, step = os.path.split(step_dir.rstrip("/"))
    try:
        with manager(root, read_only=True) as mgr:
            tree = mgr.item_metadata(int(step))["model"]
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
