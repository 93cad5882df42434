"""The compile report's reading of compiled modules: bytes each chip sends per kind of collective and group, the
TPU kernels' FLOPs."""

import re

import jax
import jax.numpy as jnp
from flax import nnx


def test_collective_bytes_are_read_per_kind_and_group():
    """Each kind's bytes per chip from HLO text, in the three replica-group forms and async starts."""
    from k2jax.report import collective_moves, group_size

    hlo = "\n".join([
        "%a = bf16[1024,128]{1,0} all-gather(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dims={0}",
        "%b = f32[256]{0} reduce-scatter(%y), replica_groups=[2,4]<=[8], dimensions={0}",
        "%c = (f32[64]{0}, f32[32]{0}) all-reduce(%u, %v), replica_groups={{0,1},{2,3},{4,5},{6,7}}",
        "%d = s32[8,16]{1,0} all-to-all(%z), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}",
        "%e = (bf16[16]{0}, bf16[64]{0}) all-gather-start(%w), replica_groups=[2,4]<=[8]",
        "%f = bf16[64]{0} all-gather-done(%e)",
    ])
    moved = collective_moves(hlo)
    assert moved["all-gather"] == 1024 * 128 * 2 * 3 / 4 + 64 * 2 * 3 / 4  # the start's result, not its operand
    assert moved["reduce-scatter"] == 256 * 4 * 3
    assert moved["all-reduce"] == 2 * (64 + 32) * 4 * 1 / 2
    assert moved["all-to-all"] == 8 * 16 * 4 * 7 / 8
    assert group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}") == 2


def test_an_element_type_of_unknown_size_is_refused_not_guessed():
    """A collective over a type whose size the reader does not know raises naming it (a guessed 4 bytes would
    misstate the bytes); the known types of the same line are read (positive control)."""
    import pytest

    from k2jax.report import collective_moves

    line = "%ag = {t}[8,16]{{1,0}} all-gather(%x), replica_groups={{{{0,1}}}}, dimensions={{0}}\n"
    assert collective_moves(line.format(t="bf16"))["all-gather"] > 0
    with pytest.raises(ValueError, match="'f4e2m1fn'"):
        collective_moves(line.format(t="f4e2m1fn"))


def test_a_memory_only_report_prints_no_cost_lines():
    """cost=False (FLOPs and time not measured): the report ends at the memory verdict, with no 'nan' figures;
    with FLOPs measured it goes on to MFU."""
    from k2jax.report import Report

    args = dict(topology="v5p-8", mesh={"fsdp": 4}, mode="train", chips=4, hbm_bytes=95 * 2**30, argument_bytes=2**30,
                output_bytes=2**30, temp_bytes=2**30, alias_bytes=2**30, analytic_flops=1e15, tokens=4096,
                compile_s=1.0, collective_bytes=0)
    bare = Report(**args, flops=float("nan"), seconds=float("nan")).lines(459e12)
    assert len(bare) == 3 and bare[-1].endswith("FITS") and "nan" not in "\n".join(bare)
    full = Report(**args, flops=2e15, seconds=2.0).lines(459e12)
    assert any("MFU" in line for line in full) and "nan" not in "\n".join(full)


def test_moe_layer_compiled_for_tpu_counts_the_kernels_flops(libtpu_env):
    """One MoE layer, forward and backward, 4096 tokens, compiled for v5p: nine kernel calls (gmm forward and input
    gradient, tgmm weight gradient, for gate, up and down) whose own cost estimates bring the compiled FLOPs to
    the ideal count (the routed experts are 79% of it: without the kernels' estimates the ratio would be < 0.25)."""
    from jax.sharding import SingleDeviceSharding

    import k2jax
    from k2jax import aot
    from k2jax.model.layers.grouped import ideal_moe_flops
    from k2jax.model.layers.moe import MoE
    from k2jax.model.sharding import ShardingRules
    from k2jax.report import gmm_tile_allowance, kernel_flops

    _, devices = aot.topology_devices("v5p-8")
    sh = SingleDeviceSharding(devices[0])
    c, run = k2jax.load_preset("tiny", kernels="pallas", dtype="bfloat16", param_dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(c, run, ShardingRules(), rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state)
    x = jax.ShapeDtypeStruct((2, 2048, c.hidden_size), jnp.bfloat16, sharding=sh)
    loss = lambda s, x: nnx.merge(graphdef, s)(x)[0].astype(jnp.float32).sum()  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(state, x).compile()  # the forward is used
    names = re.findall(r"%([\w.]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", compiled.as_text())
    assert len(names) == 9 and sum("tgmm" in n for n in names) == 3, names
    ratio = aot._cost(compiled, aot.CHIPS["v5p"])[0] / (3 * ideal_moe_flops(4096, c))
    assert 0.95 <= ratio <= 1.25, ratio
    # the kernels' own estimates, read by the report: 2·m·k·n with m = tokens × top-k rows (one device: no buffer)
    routed = 6 * 4096 * c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
    assert kernel_flops(compiled.as_text(), "gmm") == routed
    # what they may visit beyond those rows: one 512-row tile per expert (16) per call (9), at 2·k·n a row
    assert gmm_tile_allowance(compiled.as_text()) == 9 * c.n_routed_experts * 512 * routed / 9 / 16384
    # under remat keeping save_moe's names no expert matmul runs twice: the routing weights scale the hidden rows,
    # so their gradient needs no unweighted output (10 calls when it did); saving nothing runs gate and up again
    for kept, calls in ((("moe_in", "moe_hidden"), 9), ((), 11)):
        remat = jax.checkpoint(loss, policy=jax.checkpoint_policies.save_only_these_names(*kept))
        text = jax.jit(jax.value_and_grad(remat, (0, 1))).lower(state, x).compile().as_text()
        assert len(re.findall(r"%[\w.]*gmm[\w.]* = [^\n]*tpu_custom_call", text)) == calls, kept
