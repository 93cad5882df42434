"""Abstract-first initialisation: shapes and shardings from eval_shape, then a jitted init in place."""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from k2jax.config import K2Config
from k2jax.model import Transformer
from k2jax.sharding import ShardingRules, check_divisible


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(config: K2Config, rules: ShardingRules | None = None, seed: int = 0):
    """(graphdef, abstract state): a Transformer's structure and ShapeDtypeStructs, no weights allocated."""
    rules = rules or ShardingRules()
    model = nnx.eval_shape(lambda: Transformer(config, rules, rngs=nnx.Rngs(seed)))
    return nnx.split(model)


def logical_names(abstract_state):
    """Same tree as the state, each Variable holding its tuple of logical axis names."""
    return jax.tree.map(lambda v: v.replace(tuple(v.get_metadata()["out_sharding"])), abstract_state, is_leaf=_is_var)


def state_shardings(abstract_state, mesh: Mesh, rules: ShardingRules):
    """NamedShardings (same tree as the state) from each Variable's logical names and the rules table."""
    return jax.tree.map(lambda v: v.replace(rules.sharding(v.get_metadata()["out_sharding"], mesh)),
                        abstract_state, is_leaf=_is_var)


def init_model(config: K2Config, mesh: Mesh, rules: ShardingRules | None = None, seed: int = 0):
    """(graphdef, state) with random weights; each shard is created on the device the mesh puts it."""
    rules = rules or ShardingRules()
    rules.check()
    check_divisible(config, mesh, rules)
    graphdef, abstract = abstract_model(config, rules, seed)
    shardings = state_shardings(abstract, mesh, rules)

    @jax.jit
    def make():
        return nnx.state(Transformer(config, rules, rngs=nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return graphdef, state


def param_count(config: K2Config) -> tuple[int, int]:
    """(total, active per token) parameter counts from abstract shapes (embedding and lm_head included)."""
    _, abstract = abstract_model(config)
    total = sum(math.prod(v.shape) for v in jax.tree.leaves(abstract))
    c = config
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    inactive = c.num_moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    return total, total - inactive
