"""k2jax: Kimi K2 (DeepSeek-V3 architecture) in JAX and Flax NNX, sharded for TPU pods.

The public names below are imported on first use, so `import k2jax` loads neither JAX's checkpointing stack
(Orbax, TensorStore) nor anything a given program does not touch.
"""

import importlib

from k2jax.runtime import quiet_library_import

__version__ = "0.1.0"

# on a host with no accelerator, JAX on the CPU alone: an installed libtpu (the test extras bring it) would otherwise
# print its probe errors at the first JAX call, as the command-line tools already avoid; a user's choice stands
quiet_library_import()

# public name -> the module that defines it
_PUBLIC = {
    "K2Error": "k2jax.errors", "ConfigError": "k2jax.errors", "ShardingError": "k2jax.errors",
    "CheckpointError": "k2jax.errors", "DecodeError": "k2jax.errors",
    "K2Config": "k2jax.model.config", "Execution": "k2jax.model.config", "from_hf_config": "k2jax.model.config",
    "load_config": "k2jax.model.config", "load_preset": "k2jax.model.config", "to_hf_config": "k2jax.model.config",
    "ShardingRules": "k2jax.model.sharding", "make_mesh": "k2jax.model.sharding",
    "abstract_model": "k2jax.model.init", "init_model": "k2jax.model.init", "param_count": "k2jax.model.init",
    "Model": "k2jax.inference.model", "Routing": "k2jax.inference.model", "load": "k2jax.inference.model",
    "load_hf": "k2jax.inference.model",
    "random_model": "k2jax.inference.model",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'k2jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
