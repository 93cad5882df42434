"""A run's checkpoints: the weights a run starts from, saving and restoring the train state, and the
fallback from a damaged step to the newest intact one."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from k2jax import storage
from k2jax.ckpt import orbax as ckpt
from k2jax.errors import CheckpointError
from k2jax.model.config import K2Config
from k2jax.model.params import RouterBias
from k2jax.train.step import Trainer, TrainState


def architecture_of(path: str) -> K2Config:
    """The architecture of an HF folder (config.json) or a k2jax checkpoint, read before any weight."""
    from k2jax.model.config import from_hf_config

    if storage.isfile(storage.join(path, "config.json")):
        return from_hf_config(path)
    return ckpt.read_config(ckpt.resolve_step_dir(path))[0]


def load_weights(path: str, trainer: Trainer):
    """The model state of an HF folder (bf16, fp32 or the FP8 release) or a k2jax checkpoint, each array read
    shard by shard straight into the trainer's shardings and dtypes (a LoRA run: its base, without adapters)."""
    p = trainer.placement
    if trainer.lora is not None:
        from k2jax.ckpt.lora import load_base

        return load_base(path, trainer.config, trainer.abstract_base_source, trainer.base_source_shardings)
    if storage.isfile(storage.join(path, "config.json")):
        from k2jax.ckpt.hf import load_hf_state

        return load_hf_state(path, trainer.config, p.abstract, p.shardings)
    step_dir = ckpt.resolve_step_dir(path)
    ckpt.check_shapes(step_dir, p.abstract)
    return ckpt.restore_model_state(step_dir, p.abstract, p.shardings, flag="--init_from")


def start_state(trainer: Trainer, mgr: ocp.CheckpointManager, run, log):
    """(train state, every process's saved data position or None, first step): the newest intact checkpoint's, or a fresh start.

    A checkpoint that cannot be read (a truncated or missing file) is reported by step and file, moved aside to
    `<step>.damaged` (kept, never deleted) by process 0, and the next older step is tried."""
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps and run.init_from:
        return _fresh_from(trainer, run, log), None, 0
    for i, latest in enumerate(steps):
        try:
            if trainer.lora is not None:
                _lora_base_for(trainer, storage.join(run.workdir, str(latest)), run, log)
            state, data_state = restore_train_state(mgr, latest, trainer)
        except CheckpointError:  # readable, but not for this run (named in the message)
            raise
        except Exception as e:  # noqa: BLE001 - TensorStore/Orbax raise many kinds; each means "unreadable"
            damage = ckpt.describe_damage(storage.join(run.workdir, str(latest)), e)
            older = f"resuming from step {steps[i + 1]} instead" if i + 1 < len(steps) else "starting afresh"
            log(f"checkpoint step {latest} is damaged: {damage}; {older}")
            _set_aside(run.workdir, latest, log)
            mgr.reload()
            continue
        log(f"resumed from {storage.join(run.workdir, str(latest))} at step {int(state.step)}")
        return state, data_state, int(state.step)
    if steps and run.init_from:
        return _fresh_from(trainer, run, log), None, 0
    return trainer.init_state(run.seed), None, 0


def _fresh_from(trainer: Trainer, run, log) -> TrainState:
    """Step 0 from --init_from's weights: a full run's parameters, or a LoRA run's frozen base (recorded by path
    and hash in every checkpoint) with fresh adapters."""
    if trainer.lora is not None:
        from k2jax.ckpt.lora import base_reference

        trainer.base_ref = base_reference(run.init_from)
        log(f"LoRA rank {trainer.lora.rank} (alpha {trainer.lora.scale * trainer.lora.rank:g}, targets "
            f"{','.join(trainer.lora.targets)}) over the frozen base {run.init_from} (hash "
            f"{trainer.base_ref['hash'][:12]}); fresh adapters, step 0")
    else:
        log(f"initialised from {run.init_from} (fresh optimizer state, step 0)")
    return trainer.init_state(model_state=load_weights(run.init_from, trainer))


def _lora_base_for(trainer: Trainer, step_dir: str, run, log) -> None:
    """Loads the base a LoRA checkpoint was trained on into the trainer (checked by hash; --init_from, when given,
    must be that base), after checking the checkpoint's LoRA settings against this run's."""
    from k2jax.ckpt.lora import check_base, read_lora

    rec = read_lora(step_dir)
    if rec is None:
        raise CheckpointError(f"{step_dir}: a full model's checkpoint, not a LoRA run's; a LoRA run needs its own "
                              "--workdir (start it with --init_from=<that checkpoint> as its base)")
    saved, ref = rec
    if saved != trainer.lora:
        field = next(f.name for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(trainer.lora, f.name))
        raise CheckpointError(f"{step_dir}: trained with LoRA {field}={getattr(saved, field)!r}, this run asks for "
                              f"{getattr(trainer.lora, field)!r} (--lora_{field}); resume with the same settings")
    if getattr(trainer, "base_ref", None) == ref and trainer.base is not None:
        return
    path = check_base(ref, step_dir, run.init_from)
    trainer.set_base(load_weights(path, trainer))
    trainer.base_ref = ref
    log(f"LoRA base {path} (hash {ref['hash'][:12]}, as recorded)")

def _set_aside(workdir: str, step: int, log):
    """Renames a damaged step directory to `<step>.damaged` (process 0; the others wait for it)."""
    if jax.process_index() == 0:
        src = storage.join(workdir, str(step))
        dst = storage.join(workdir, f"{step}.damaged")
        n = 1
        while storage.exists(dst):
            n += 1
            dst = storage.join(workdir, f"{step}.damaged{n}")
        storage.rename(src, dst)
        log(f"  moved {src} to {dst}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"k2jax set aside {step}")


def train_save_args(trainer: Trainer, state, data_state) -> ocp.args.Composite:
    """The Orbax items of a training checkpoint: model, config, optimizer state, step and the data position of
    every process (its rows of the batch and their iterator state; Orbax writes JSON from process 0 only, so they
    are gathered)."""
    train = {"step": int(state.step), "data_by_process": _gather_json(_jsonable(data_state))}
    if trainer.lora is not None:  # the adapters only, with the reference to the base
        from k2jax.ckpt.lora import lora_record

        return ckpt.save_args(state.params, trainer.config, trainer.execution.param_dtype, state.opt_state, train,
                              lora=lora_record(trainer.lora, trainer.base_ref))
    return ckpt.save_args(trainer.model_state(state), trainer.config, trainer.execution.param_dtype,
                          state.opt_state, train)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        return {"__bytes__": x.hex()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_jsonable(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return bytes.fromhex(x["__bytes__"])
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


def restore_train_state(mgr: ocp.CheckpointManager, step: int, trainer: Trainer):
    """(TrainState, every process's saved data position) of a saved step, every array restored into the trainer's
    shardings."""
    abstract = trainer.abstract_state()
    model_abs = abstract.params if trainer.lora is not None else \
        nnx.state(nnx.merge(trainer.graphdef, abstract.params, abstract.bias))
    restored = mgr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.to_pure_dict(model_abs)),
        opt_state=ocp.args.StandardRestore(abstract.opt_state), train=ocp.args.JsonRestore()))
    model_state = jax.tree.map(lambda x: x, model_abs)
    nnx.replace_by_pure_dict(model_state, restored.model)
    if trainer.lora is not None:
        params, bias = model_state, abstract.bias
    else:
        _, params, bias = nnx.split(nnx.merge(trainer.graphdef, model_state), nnx.Param, RouterBias)
    step_arr = jax.device_put(jnp.asarray(restored.train["step"], jnp.int32), trainer.replicated)
    # every process's {"rows", "state"}; checkpoints of earlier versions hold bare states (refused by the loop)
    data = restored.train.get("data_by_process") or [restored.train.get("data")]
    return TrainState(params, bias, restored.opt_state, step_arr), _from_jsonable(data)


def _gather_json(obj) -> list:
    """`obj` (JSON-able) of every process, in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))))
    padded = np.zeros(n, np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(jax.process_count(), n)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]
