"""A LoRA run's checkpoints: the adapters and their optimizer state, and a reference to the frozen base.

The base is never copied into the run. Each checkpoint's `config` item records the base's path and a hash of
its architecture and tensor list (name, shape, dtype of every tensor), so that a resume, `k2jax.load(RUN)` or an
export refuses a base that is missing or has changed, naming it, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from k2jax import storage
from k2jax.ckpt import orbax as ckpt
from k2jax.ckpt.hf import units
from k2jax.errors import CheckpointError
from k2jax.model.config import K2Config
from k2jax.model.layers.lora import LoraConfig


def _tensor_list(path: str) -> tuple[K2Config, list]:
    """(architecture, sorted [name, shape, dtype] of every tensor) of an HF folder or a k2jax checkpoint."""
    if storage.isfile(storage.join(path, "config.json")):
        from k2jax.ckpt.safetensors import SafetensorsFolder
        from k2jax.model.config import from_hf_config

        folder = SafetensorsFolder(path)
        rows = [[n, list(folder.info(n)[1]), str(folder.info(n)[0])] for n in folder.names()]
        return from_hf_config(path), sorted(rows)
    step_dir = ckpt.resolve_step_dir(path)
    config, _ = ckpt.read_config(step_dir)
    root, step = ckpt.split_step_dir(step_dir)
    import jax

    with ckpt.manager(root, read_only=True) as mgr:
        tree = mgr.item_metadata(step)["model"]
    rows = [["/".join(str(getattr(k, "key", k)) for k in kp), list(getattr(m, "shape", ())), str(getattr(m, "dtype", ""))]
            for kp, m in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return config, sorted(rows)


def base_reference(path: str) -> dict:
    """{path, hash} of a base (an HF folder or a k2jax checkpoint): the hash covers its architecture and its
    tensor list."""
    config, rows = _tensor_list(path)
    digest = hashlib.sha256(json.dumps({"architecture": dataclasses.asdict(config), "tensors": rows},
                                       sort_keys=True).encode()).hexdigest()
    return {"path": storage.resolve(path), "hash": digest}


def lora_record(lora: LoraConfig, base: dict) -> dict:
    """The `lora` entry of a LoRA run's config item."""
    return {**lora.to_json(), "base": base}


def read_lora(step_dir: str) -> tuple[LoraConfig, dict] | None:
    """(LoraConfig, base reference) of a LoRA run's step directory; None for a full model's checkpoint."""
    rec = ckpt.read_config_item(step_dir).get("lora")
    if rec is None:
        return None
    return LoraConfig.from_json(rec), rec["base"]


def check_base(ref: dict, step_dir: str, given: str = "", flag: str = "--init_from") -> str:
    """The base path to load for a LoRA checkpoint: `given` (if any) else the recorded one, which must exist and
    hash as recorded; errors name the checkpoint, the base and what differs."""
    path = given or ref["path"]
    where = f"{flag}={given}" if given else f"the base recorded in {step_dir}"
    if not (storage.isfile(storage.join(path, "config.json")) or storage.isdir(path)):
        raise CheckpointError(f"LoRA checkpoint {step_dir}: its base {path} ({where}) is missing; pass the base "
                              f"with {flag}=PATH (it must have the same architecture and tensors)")
    try:
        now = base_reference(path)
    except CheckpointError as e:
        raise CheckpointError(f"LoRA checkpoint {step_dir}: its base {path} ({where}) cannot be read: {e}") from None
    if now["hash"] != ref["hash"]:
        raise CheckpointError(f"LoRA checkpoint {step_dir}: the base {path} ({where}) has changed since the adapters "
                              f"were trained on {ref['path']} (architecture or tensor list hash {now['hash'][:12]} "
                              f"!= recorded {ref['hash'][:12]}); use the base the run was trained on")
    return path


def load_base(path: str, config: K2Config, abstract_base, shardings, flag: str = "--init_from"):
    """The base's model state (HF folder or k2jax checkpoint) read straight into `shardings`."""
    if storage.isfile(storage.join(path, "config.json")):
        from k2jax.ckpt.hf import load_hf_state

        return load_hf_state(path, config, abstract_base, shardings)
    step_dir = ckpt.resolve_step_dir(path)
    ckpt.check_shapes(step_dir, abstract_base)
    return ckpt.restore_model_state(step_dir, abstract_base, shardings, flag=flag)


def _adapter_keys(lora: LoraConfig, path: tuple[str, ...]):
    """(A path, B path, leading axes, input dims) of the adapter of the kernel at `path`, or None."""
    from k2jax.model.params import is_stacked, lora_split, spec_of

    key = ".".join(path[1:]) if is_stacked(path) else ".".join(path)
    if not lora.adapts(key):
        return None
    lead, ins, _ = lora_split(key, spec_of(path))
    stem = path[:-1] + (f"{path[-1]}_lora",)
    return stem + ("a",), stem + ("b",), len(lead), len(ins)


def merged_unit_reader(step_dir: str, rec, config: K2Config, maps, base: str = ""):
    """read(path, idx) -> one unit of the merged model: the base's unit (an HF folder or a k2jax checkpoint,
    checked by hash) plus (alpha/r)·A·B of its adapter, in float32. Each adapter unit is read as it is needed."""
    import numpy as np


    lora, ref = rec
    path = check_base(ref, step_dir, base, flag="--base")
    if storage.isfile(storage.join(path, "config.json")):
        from k2jax.ckpt.hf import HFSource
        from k2jax.ckpt.safetensors import SafetensorsFolder
        from k2jax.model.config import mtp_prefixes

        source = HFSource(SafetensorsFolder(path), maps, allow_extra=mtp_prefixes(path))

        def read_base(p, idx):
            return source.read(p, tuple(slice(i, i + 1) for i in idx)).reshape(source.maps[p].unit_shape)
    else:
        read_base = ckpt.leaf_reader(storage.join(ckpt.resolve_step_dir(path), "model"))
    read_adapter = ckpt.leaf_reader(storage.join(step_dir, "model"))

    def read(p: tuple[str, ...], idx: tuple[int, ...]):
        w = np.asarray(read_base(p, idx), np.float32)
        keys = _adapter_keys(lora, p)
        if keys is None:
            return w
        a_path, b_path, _, n_in = keys
        a, b = read_adapter(a_path, idx), read_adapter(b_path, idx)
        a2 = a.reshape(-1, a.shape[-1]).astype(np.float32)
        b2 = b.reshape(b.shape[0], -1).astype(np.float32)
        return w + (lora.scale * (a2 @ b2)).reshape(w.shape)

    return read


# PEFT module names of the targets it can hold on transformers' DeepseekV3 (v5): attention's linear layers, and
# the routed experts under their per-expert names, which PEFT converts onto transformers' fused expert parameters
PEFT_TARGETS = {"attn": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
                "experts": ("gate_proj", "up_proj", "down_proj")}


def export_peft(checkpoint_dir: str, output_dir: str) -> str:
    """Writes a LoRA run's adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors with the
    official module names) that `peft.PeftModel.from_pretrained` loads onto `DeepseekV3ForCausalLM`.

    Attention adapters are written as they are; each routed expert's as `mlp.experts.E.{gate,up,down}_proj`,
    which PEFT fuses onto transformers' stacked expert parameters. The dense MLP and the shared expert are refused:
    PEFT maps every `gate_proj`/`up_proj`/`down_proj` of DeepseekV3 onto the fused experts, so it cannot hold
    them (export those runs merged with --merge_lora)."""
    import os

    import numpy as np

    from k2jax.ckpt.hf import tensor_maps
    from k2jax.ckpt.safetensors import write_safetensors
    from k2jax.model.init import abstract_model

    step_dir = ckpt.resolve_step_dir(checkpoint_dir)
    rec = read_lora(step_dir)
    if rec is None:
        raise CheckpointError(f"--adapter_only: {step_dir} is a full model's checkpoint, not a LoRA run's")
    lora, ref = rec
    bad = [t for t in lora.targets if t not in PEFT_TARGETS]
    if bad:
        raise CheckpointError(f"--adapter_only: {step_dir} adapted {','.join(bad)}, which PEFT cannot hold on "
                              "transformers' DeepseekV3 (it maps every gate_proj/up_proj/down_proj onto the fused "
                              "routed experts): export merged weights with --merge_lora, or train with "
                              "--lora_targets=attn,experts")
    config, _ = ckpt.read_config(step_dir)
    _, abstract = abstract_model(config)
    read = ckpt.leaf_reader(storage.join(step_dir, "model"))
    tensors = {}
    for m in tensor_maps(config, abstract):
        keys = _adapter_keys(lora, m.path)
        if keys is None:
            continue
        a_path, b_path, _, _ = keys
        for idx, name in units(m):
            module = name.removesuffix(".weight")
            a, b = read(a_path, idx), read(b_path, idx)
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
                a.reshape(-1, a.shape[-1]).T.astype(np.float32))
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
                b.reshape(b.shape[0], -1).T.astype(np.float32))
    os.makedirs(output_dir, exist_ok=True)
    write_safetensors(os.path.join(output_dir, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    ckpt.write_json(os.path.join(output_dir, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": [n for t in lora.targets for n in PEFT_TARGETS[t]],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": ref["path"]})
    return output_dir
