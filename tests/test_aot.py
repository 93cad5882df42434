"""k2jax-compile: AOT compilation for TPU topologies on this CPU host (libtpu from the test extras)."""

import os
import re
import resource
import subprocess
import sys

import pytest

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
ENV.pop("XLA_FLAGS", None)


def _compile(*args):
    return subprocess.run([sys.executable, "-m", "k2jax.cli.compile", *args], capture_output=True, text=True,
                          env=ENV, timeout=900)


def _gib(pattern, text):
    return float(re.search(pattern + r"\s+([\d.]+) GiB", text).group(1))


def test_topology_names():
    from k2jax.aot import TopologyError, parse_topology

    assert parse_topology("v5p-512")[1:] == (256, "v5p:4x8x8")
    assert parse_topology("v5p-8")[1:] == (4, "v5p:2x2x1")
    assert parse_topology("v5e-8")[1:] == (8, "v5e:2x4")
    assert parse_topology("v6e-256")[1:] == (256, "v6e:16x16")
    with pytest.raises(TopologyError, match="unknown topology 'v9-8'; known: v4-2"):
        parse_topology("v9-8")


def test_both_forms_of_the_compilers_out_of_hbm_error_are_read():
    from k2jax.aot import GiB, parse_oom

    early = parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                      "(114.49G) exceeds available HBM (95.74G).")
    assert early.temporaries_only and early.required == 114.49 * GiB and early.available == 95.74 * GiB
    late = parse_oom("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
                     "memory in memory space hbm. Used 31.43G of 31.25G hbm. Exceeded hbm capacity by 193.60M.")
    assert not late.temporaries_only and late.what == "in all"
    assert (late.required - late.available) / 2**20 == pytest.approx(193.6) and late.available == 31.25 * GiB
    assert parse_oom("INVALID_ARGUMENT: something else") is None


def test_search_candidates_use_every_chip_and_divide_the_model():
    from k2jax.aot import candidate_meshes
    from k2jax.model.config import load_config
    from k2jax.model.sharding import parse_mesh_spec

    k2 = load_config("kimi_k2")
    meshes = [parse_mesh_spec(m) for m in candidate_meshes(128, k2)]
    assert {"fsdp": 128} in meshes and {"fsdp": 1, "expert": 128} in meshes and len(meshes) == 13
    for m in meshes:
        assert m.get("fsdp", 1) * m.get("expert", 1) * m.get("tensor", 1) == 128, m
        assert k2.n_routed_experts % m.get("expert", 1) == 0 and k2.num_attention_heads % m.get("tensor", 1) == 0
    assert all(parse_mesh_spec(m).get("expert", 1) <= 16 for m in candidate_meshes(16, k2))


def test_tiny_train_and_decode_compile_for_v5p_with_expert_and_tensor_axes(monkeypatch, libtpu_env):
    """The reported memory is the compiled module's own memory_analysis (the FLOPs count, cost=True, is checked
    with the kernels in tests/test_tpu_kernels.py)."""
    import math

    import k2jax
    from k2jax import aot

    built = []  # (config, mesh, compiled) of every build compile_train makes; the first is the full-depth step
    compile_train = aot._compile_train

    def recording(config, run, mesh, *args, **kw):
        out = compile_train(config, run, mesh, *args, **kw)
        built.append((config, mesh, out[0]))
        return out

    monkeypatch.setattr(aot, "_compile_train", recording)
    config, run = k2jax.load_preset("tiny", moe_impl="ragged")  # blocks on TPU: the next test (slower to build)
    report = aot.compile_train(config, "v5p-8", "expert=2,tensor=2", batch=8, seq=128, execution=run, cost=False)
    assert report.fits and report.chips == 4 and report.mesh["expert"] == 2 and report.mesh["tensor"] == 2
    assert len(built) == 1 and math.isnan(report.flops)  # the memory verdict only: no unrolled FLOPs builds
    full_config, mesh, compiled = built[0]
    assert full_config == config and dict(mesh.shape) == report.mesh and len(mesh.devices.flat) == 4
    mem = compiled.memory_analysis()
    assert report.argument_bytes == mem.argument_size_in_bytes > 0
    assert report.temp_bytes == mem.temp_size_in_bytes > 0
    assert report.total_bytes == (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                  - mem.alias_size_in_bytes)
    dec = aot.compile_decode(config, "v5p-8", "expert=2,tensor=2", batch=4, context=256, execution=run)
    assert dec.fits and dec.total_bytes > 0 and dec.flops > 0


def test_moe_layer_compiled_for_tpu_stays_near_the_ideal_flops(libtpu_env):
    """One MoE layer, forward and backward, 4096 tokens, compiled for a v5p chip: <= 1.25x the ideal FLOPs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    import k2jax
    from k2jax import aot
    from k2jax.model.layers.grouped import ideal_moe_flops
    from k2jax.model.layers.moe import MoE
    from k2jax.model.sharding import ShardingRules

    _, devices = aot.topology_devices("v5p-8")
    sh = SingleDeviceSharding(devices[0])
    c, run = k2jax.load_preset("tiny", moe_impl="blocks", moe_block_unroll=0, dtype="bfloat16", param_dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(c, run, ShardingRules(), rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state)
    x = jax.ShapeDtypeStruct((2, 2048, c.hidden_size), jnp.bfloat16, sharding=sh)
    loss = lambda s, x: nnx.merge(graphdef, s)(x)[0].astype(jnp.float32).sum()  # noqa: E731
    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(state, x).compile()
    ratio = aot._cost(compiled, aot.CHIPS["v5p"])[0] / (3 * ideal_moe_flops(4096, c))
    assert 1.0 <= ratio <= 1.25, ratio


def test_full_k2_on_v5e_8_reports_the_shortfall_without_allocating_weights():
    r = _compile("--config=kimi_k2", "--topology=v5e-8", "--mode=train")
    assert r.returncode == 1, r.stdout + r.stderr
    m = re.search(r"DOES NOT FIT: .*short by (?:at least )?([\d.]+) GiB", r.stdout)  # refused, or compiled over
    assert m and float(m.group(1)) > 100
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < 8 * 2**30  # the 1.03T weights (>= 1.9 TiB in bf16) were never allocated


def test_bad_mesh_and_topology_are_named():
    r = _compile("--config=tiny", "--topology=v5p-8", "--mesh=expert=8")
    assert r.returncode == 2 and "has 8 devices but the topology has 4 chips" in r.stderr
    r = _compile("--config=tiny", "--topology=v7x-8")
    assert r.returncode != 0 and "unknown topology" in r.stderr
    r = _compile("--config=tiny", "--topology=v5p-8", "--mesh=expert=2,tensor=2", "--batch=8", "--flops_batch=3")
    assert r.returncode != 0 and "--flops_batch=3 does not divide the microbatch of 8 sequences" in r.stderr
