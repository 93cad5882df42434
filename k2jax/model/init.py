"""Abstract-first initialisation: shapes and shardings from eval_shape, then a jitted init in place."""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import Mesh

from k2jax.model.config import Execution, K2Config
from k2jax.model.sharding import ShardingRules, check_divisible
from k2jax.model.transformer import Transformer


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(config: K2Config, rules: ShardingRules | None = None, seed: int = 0,
                   execution: Execution | None = None, lora=None):
    """(graphdef, abstract state): a Transformer's structure and ShapeDtypeStructs, no weights allocated (with
    `lora`, a LoraConfig, its adapters too)."""
    rules = rules or ShardingRules()
    model = nnx.eval_shape(lambda: Transformer(config, rules, execution, rngs=nnx.Rngs(seed), lora=lora))
    return nnx.split(model)


def state_shardings(abstract_state, mesh: Mesh, rules: ShardingRules):
    """NamedShardings (same tree as the state) from each Variable's logical names and the rules table."""
    return jax.tree.map(lambda v: v.replace(rules.sharding(v.get_metadata()["out_sharding"], mesh)),
                        abstract_state, is_leaf=_is_var)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A model laid out on a mesh before any weight exists: structure, abstract state and each array's sharding."""

    config: K2Config
    execution: Execution
    mesh: Mesh
    rules: ShardingRules
    graphdef: object
    abstract: object
    shardings: object
    lora: object = None  # the LoraConfig of a model with adapters

    def shaped(self):
        """The abstract state as ShapeDtypeStructs carrying their shardings (for restores and AOT lowering)."""
        return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_value())),
                            self.abstract, self.shardings, is_leaf=_is_var)


def place(config: K2Config, mesh: Mesh, rules: ShardingRules | None = None, execution: Execution | None = None,
          seed: int = 0, lora=None) -> Placement:
    """Checks the rules and the mesh against the config (errors name the field), then lays the model out."""
    rules = rules or ShardingRules()
    execution = execution or Execution()
    rules.check()
    check_divisible(config, mesh, rules)
    graphdef, abstract = abstract_model(config, rules, seed, execution, lora)
    return Placement(config, execution, mesh, rules, graphdef, abstract, state_shardings(abstract, mesh, rules), lora)


def init_model(config: K2Config, mesh: Mesh, rules: ShardingRules | None = None, seed: int = 0,
               execution: Execution | None = None, lora=None, only=None):
    """(graphdef, state) with random weights; each shard is created on the device the mesh puts it. `only`: an
    nnx filter of the variables to create (e.g. LoraParam: a LoRA run's fresh adapters over a loaded base)."""
    p = place(config, mesh, rules, execution, seed, lora)
    shardings = p.shardings if only is None else nnx.filter_state(p.shardings, only)

    def make():
        state = nnx.state(Transformer(config, p.rules, p.execution, rngs=nnx.Rngs(seed), lora=lora))
        return state if only is None else nnx.filter_state(state, only)

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return p.graphdef, state


def param_count(config: K2Config) -> tuple[int, int]:
    """(total, active per token) parameter counts from abstract shapes (embedding and lm_head included)."""
    _, abstract = abstract_model(config)
    total = sum(math.prod(v.shape) for v in jax.tree.leaves(abstract))
    c = config
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    inactive = c.num_moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    return total, total - inactive
