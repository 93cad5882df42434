"""The one sharding rules table: logical axis names -> mesh axes, the mesh builder, and checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from k2jax.errors import ShardingError

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")


# Logical axis -> mesh axes. Parameters and activations carry only the logical names on the left.
DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "act_seq": ("context",),  # context parallelism: one sequence over several chips (k2jax.model.layers.context)
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_vocab": ("tensor",),
    # the decode cache's positions: a long context's cache split over the chips that split the heads (decode
    # reads it in the latent space, where every head needs every position: partial softmax sums are combined)
    "cache_seq": ("tensor",),
    # parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_lora": (),
    "kv_lora": (),
    "q_lora_in": (),  # the input dim of q_b and kv_b (their other dims are heads)
    "kv_lora_in": (),
    "heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "expert_embed": ("fsdp",),  # the hidden-size dim of expert weights (whose `experts` dim holds `expert`)
    "expert_mlp": ("tensor",),
    "router_experts": (),
    "norm": (),
    "lora_rank": (),  # the rank dim of LoRA adapters (small: never split)
}

# Training's changes to the table: the dense weights (attention, dense/shared MLP, embedding, lm_head) are also
# split over `expert`, whose shards hold different tokens, so the whole batch group shares their parameters and
# optimizer state (ZeRO-3) instead of each `expert` shard keeping a copy. Decoding keeps the table as it is (no
# per-step weight gathers on the serving mesh).
# The `context` axis's shards hold pieces of the same sequences: they split every weight as `fsdp` does
# (gathered per layer), or a context-parallel mesh would hold context-times the weights per chip.
TRAINING_RULES: Mapping[str, tuple[str, ...]] = {"embed": ("fsdp", "context", "expert"),
                                                  "q_lora_in": ("fsdp", "context", "expert"),
                                                  "kv_lora_in": ("fsdp", "context", "expert"),
                                                  "expert_embed": ("fsdp", "context")}

# Logical axes whose size must be divisible by its mesh axes, with the config field that sets it.
_FIELD_OF_AXIS = {"heads": "num_attention_heads", "experts": "n_routed_experts", "mlp": "intermediate_size",
                  "expert_mlp": "moe_intermediate_size", "vocab": "vocab_size", "embed": "hidden_size",
                  "expert_embed": "hidden_size", "q_lora_in": "q_lora_rank", "kv_lora_in": "kv_lora_rank"}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to mesh axes; `spec(names)` gives the PartitionSpec of one array."""

    rules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def __hash__(self):
        return hash(tuple(sorted((k, tuple(v)) for k, v in self.rules.items())))

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        if name not in self.rules:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(self.rules)}")
        return tuple(self.rules[name])

    def spec(self, names: Sequence[str | None], mesh: Mesh | None = None) -> P:
        """PartitionSpec for an array whose dims carry `names`; mesh axes of size 1 (or absent) are dropped."""
        used: dict[str, str] = {}
        out = []
        for name in names:
            axes = []
            for ax in self.mesh_axes(name):
                if mesh is not None and (ax not in mesh.shape or mesh.shape[ax] == 1):
                    continue
                if ax in used:
                    raise ShardingError(
                        f"mesh axis {ax!r} would shard two dims of one array ({used[ax]!r} and {name!r} in "
                        f"{tuple(names)}); fix the rules table")
                used[ax] = name
                axes.append(ax)
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return P(*out)

    def for_training(self) -> "ShardingRules":
        """This table with TRAINING_RULES applied (what the Trainer uses unless given rules)."""
        return ShardingRules({**self.rules, **TRAINING_RULES})

    def sharding(self, names: Sequence[str | None], mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(names, mesh))

    def check(self) -> None:
        """Raises if any rule maps onto an unknown mesh axis or repeats one."""
        for name, axes in self.rules.items():
            for ax in axes:
                if ax not in MESH_AXES:
                    raise ShardingError(f"rule {name!r} -> {ax!r}: unknown mesh axis (known: {MESH_AXES})")
            if len(set(axes)) != len(axes):
                raise ShardingError(f"rule {name!r} repeats a mesh axis: {axes}")


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4} (axes not named have size 1)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ShardingError(f"mesh spec {spec!r}: expected axis=size pairs like 'data=2,expert=4', got {part!r}")
            k, v = part.split("=", 1)
            try:
                items.append((k.strip(), int(v)))
            except ValueError:
                raise ShardingError(f"mesh spec {spec!r}: size of axis {k.strip()!r} must be an integer, got {v!r}") from None
    out: dict[str, int] = {}
    for k, v in items:
        if k not in MESH_AXES:
            raise ShardingError(f"mesh spec {spec!r}: unknown axis {k!r}; axes are {', '.join(MESH_AXES)}")
        if k in out:
            raise ShardingError(f"mesh spec {spec!r}: axis {k!r} given twice")
        if v < 1:
            raise ShardingError(f"mesh spec {spec!r}: axis {k!r} must have size >= 1, got {v}")
        out[k] = v
    return out


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh of MESH_AXES (data, fsdp, context, expert, tensor); sizes must multiply to the device count.

    Unnamed axes get size 1, except that with an empty spec all devices go to `data`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    if not sizes:
        sizes = {"data": len(devices)}
    shape = tuple(sizes.get(ax, 1) for ax in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ShardingError(
            f"mesh spec {spec!r}: axis sizes {dict(zip(MESH_AXES, shape))} multiply to {math.prod(shape)}, "
            f"but there are {len(devices)} devices; expected sizes multiplying to {len(devices)}")
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # topologies the helper does not know: plain order
        dev_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_divisible(config, mesh: Mesh, rules: ShardingRules) -> None:
    """Raises ShardingError naming the config field whose size the mesh axis it is sharded over does not divide."""
    for axis, field in _FIELD_OF_AXIS.items():
        n = math.prod(mesh.shape[a] for a in rules.mesh_axes(axis) if a in mesh.shape)
        size = getattr(config, field)
        if size % n:
            mesh_axes = "x".join(f"{a}={mesh.shape[a]}" for a in rules.mesh_axes(axis) if a in mesh.shape)
            raise ShardingError(
                f"config field '{field}' = {size} is sharded over mesh axis {mesh_axes} (logical axis {axis!r}) "
                f"and must be divisible by {n}; expected a multiple of {n}")


def batch_divisor(mesh: Mesh, rules: ShardingRules) -> int:
    """How many ways the batch dimension is split on this mesh."""
    return math.prod(mesh.shape[a] for a in rules.mesh_axes("batch") if a in mesh.shape)


def constrain(x: jax.Array, rules: ShardingRules, names: Iterable[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names, a no-op when no mesh is set; a dim that its mesh axes do not
    divide (a decode step's one token on a context-parallel mesh) is left whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = rules.spec(tuple(names), mesh)
    dims = []
    for size, axes in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
        group = () if axes is None else (axes,) if isinstance(axes, str) else axes
        dims.append(axes if size % math.prod(mesh.shape[a] for a in group) == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*dims))
