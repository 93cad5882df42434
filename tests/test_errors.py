"""Bad input fails early with an error naming the field, axis or tensor at fault."""

import shutil

import numpy as np
import pytest

import k2jax
from k2jax.ckpt.safetensors import CheckpointError, SafetensorsFolder, write_safetensors
from k2jax.model.sharding import ShardingError, ShardingRules, make_mesh, parse_mesh_spec


def test_heads_not_divisible_by_tensor_axis(tiny_config):
    with pytest.raises(ShardingError, match=r"num_attention_heads' = 4 .*tensor=8.*multiple of 8"):
        k2jax.random_model(tiny_config, mesh="tensor=8")


def test_experts_not_divisible_by_expert_axis(tiny_config):
    config = tiny_config.replace(n_routed_experts=12)
    with pytest.raises(ShardingError, match=r"n_routed_experts' = 12 .*expert=8.*multiple of 8"):
        k2jax.random_model(config, mesh="expert=8")


@pytest.mark.parametrize("spec, message", [
    ("data=3", "multiply to 3, but there are 8 devices"),
    ("data=2,expert=2", "multiply to 4, but there are 8 devices"),
    ("data=2,pipeline=4", "unknown axis 'pipeline'"),
    ("data=two", "must be an integer"),
    ("data", "axis=size pairs"),
])
def test_mesh_spec_errors(spec, message):
    with pytest.raises(ShardingError, match=message):
        make_mesh(spec)


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2, expert=2,tensor=2") == {"data": 2, "expert": 2, "tensor": 2}
    assert dict(make_mesh("fsdp=2,expert=4").shape) == {"data": 1, "fsdp": 2, "context": 1, "expert": 4, "tensor": 1}
    assert dict(make_mesh("context=4,data=2").shape)["context"] == 4


def test_rules_refuse_one_mesh_axis_on_two_dims():
    rules = ShardingRules({**ShardingRules().rules, "embed": ("expert",)})
    with pytest.raises(ShardingError, match="mesh axis 'expert' would shard two dims"):
        rules.spec(("experts", "embed", "expert_mlp"))
    with pytest.raises(ShardingError, match="unknown mesh axis"):
        ShardingRules({"batch": ("pod",)}).check()


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    folder = SafetensorsFolder(str(dst))
    tensors = {n: np.array(folder.get(n)) for n in folder.names()}
    edit(tensors)
    (dst / "model.safetensors").unlink()
    write_safetensors(str(dst / "model.safetensors"), tensors)


def test_missing_tensor_is_named(hf_tiny, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(hf_tiny[0], tmp_path / "hf", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is missing \(expected shape \[64, 128\]\)"):
        k2jax.load_hf(str(tmp_path / "hf"))


def test_misshaped_tensor_is_named(hf_tiny, tmp_path):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite(hf_tiny[0], tmp_path / "hf", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[255, 32\], expected \[256, 32\]"):
        k2jax.load_hf(str(tmp_path / "hf"))


def test_unknown_tensors_are_listed(hf_tiny, tmp_path):
    _rewrite(hf_tiny[0], tmp_path / "hf", lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unknown tensor names .*model.layers.9.extra.weight"):
        k2jax.load_hf(str(tmp_path / "hf"))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(k2jax.ConfigError, match="no config.json"):
        k2jax.load_hf(str(tmp_path))


def test_compilation_cache_dir_that_cannot_be_a_directory_is_named(tmp_path):
    """k2jax-train's --compilation_cache_dir: a file, or a path under one, is refused naming the flag (JAX itself
    would only warn on each entry); a fresh directory is created; 'none' turns the cache off."""
    import jax
    from absl import flags

    from k2jax.cli.common import use_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        for bad in (blocker, blocker / "cache"):
            with pytest.raises(flags.ValidationError, match="--compilation_cache_dir"):
                use_compilation_cache(str(bad), "unused")
        fresh = tmp_path / "w" / "compile_cache"
        assert use_compilation_cache(None, str(fresh)) in (str(fresh), before)
        assert use_compilation_cache(str(fresh), "unused") == str(fresh) and fresh.is_dir()
        assert use_compilation_cache("none", "unused") is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
