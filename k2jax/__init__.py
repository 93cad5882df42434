"""k2jax: Kimi K2 (DeepSeek-V3 architecture) in JAX and Flax NNX, sharded for TPU pods."""

from k2jax.api import Model, load_hf, random_model
from k2jax.checkpoint import load
from k2jax.config import ConfigError, K2Config, from_hf_config, load_config, to_hf_config
from k2jax.init import abstract_model, init_model, param_count
from k2jax.sharding import ShardingError, ShardingRules, make_mesh

__version__ = "0.1.0"

__all__ = ["ConfigError", "K2Config", "Model", "load", "load_hf", "random_model", "ShardingError", "ShardingRules", "abstract_model", "from_hf_config",
           "init_model", "load_config", "make_mesh", "param_count", "to_hf_config"]
