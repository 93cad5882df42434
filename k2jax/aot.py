"""Ahead-of-time compilation for real TPU topologies from a CPU host (libtpu): memory, FLOPs, time, verdict."""

from __future__ import annotations

import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from k2jax.errors import ConfigError, ShardingError, TopologyError
from k2jax.hardware import CHIPS, GiB, Chip
from k2jax.model.config import Execution, K2Config
from k2jax.model.sharding import make_mesh
from k2jax.report import (KINDS, Report, collective_bytes, collective_moves, gmm_tile_allowance, kernel_flops,
                          splash_flops)

class DoesNotFit(RuntimeError):
    """The TPU compiler refused the step for lack of HBM; carries the bytes it needed and had, and whether
    `required` counts the temporaries alone (the compiler stopped early) or everything it had allocated when
    it stopped. Both are lower bounds of the step's need."""

    def __init__(self, required: float, available: float, message: str, temporaries_only: bool = True):
        super().__init__(message)
        self.required, self.available, self.temporaries_only = required, available, temporaries_only

    @property
    def what(self) -> str:
        return "of temporaries alone" if self.temporaries_only else "in all"


_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)([KMGT])"
# two forms: an early check of the temporaries, and the allocator's final verdict on everything
_OOM_TEMPS = re.compile(r"required for [^(]*\(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE + r"\)")
_OOM_ALL = re.compile(r"Used " + _SIZE + " of " + _SIZE + " hbm")


def parse_oom(text: str) -> DoesNotFit | None:
    """The DoesNotFit that a compiler error's text describes, or None when it is not an out-of-HBM error."""
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    size = lambda num, unit: float(num) * _UNIT[unit]  # noqa: E731
    line = next((ln for ln in text.splitlines() if "hbm" in ln.lower()), text.splitlines()[0] if text else "")
    if m := _OOM_TEMPS.search(text):
        return DoesNotFit(size(*m.group(1, 2)), size(*m.group(3, 4)), line.strip())
    if m := _OOM_ALL.search(text):
        available = size(*m.group(3, 4))
        over = re.search(r"Exceeded hbm capacity by " + _SIZE, text)  # more digits than 'Used'
        required = available + size(*over.group(1, 2)) if over else size(*m.group(1, 2))
        return DoesNotFit(required, available, line.strip(), temporaries_only=False)
    return None


def _compile_or_oom(lowered):
    """lowered.compile(), turning the compiler's out-of-HBM error into DoesNotFit with the sizes."""
    from k2jax.progress import busy

    try:
        with busy("compiling"):
            return lowered.compile()
    except Exception as e:  # jax raises JaxRuntimeError(RESOURCE_EXHAUSTED ...)
        oom = parse_oom(str(e))
        if oom is None:
            raise
        raise oom from None


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most cube-like torus shape of `chips` chips (powers of two), smallest dims first."""
    if chips & (chips - 1):
        raise TopologyError(f"{chips} chips is not a power of two")
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    if dims == 3 and chips < 8:  # one host's bounds (2x2x1) must divide the layout
        return tuple(sorted(shape, reverse=True))
    return tuple(sorted(shape))


def known_topologies() -> list[str]:
    out = []
    for name, chip in CHIPS.items():
        for k in range(0, 13):
            n = 2 ** k * chip.cores_per_chip
            out.append(f"{name}-{n}")
    return out


def parse_topology(name: str) -> tuple[Chip, int, str]:
    """'v5p-512' -> (chip, number of chips, libtpu topology string such as 'v5p:4x8x8')."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise TopologyError(f"unknown topology {name!r}; known: {', '.join(known_topologies()[:8])} ... "
                            f"(v4-N, v5e-N, v5p-N, v6e-N with N a power of two; N counts TensorCores for v4/v5p)")
    chip = CHIPS[m.group(1)]
    n = int(m.group(2))
    if n % chip.cores_per_chip:
        raise TopologyError(f"{name}: {m.group(1)} counts {chip.cores_per_chip} TensorCores per chip; N must be even")
    chips = n // chip.cores_per_chip
    try:
        shape = _grid(chips, chip.dims)
    except TopologyError as e:
        raise TopologyError(f"{name}: {e}") from None
    return chip, chips, f"{chip.family}:{'x'.join(map(str, shape))}"


def topology_devices(name: str):
    """(chip, TPU devices of the named topology) compiled for from this host."""
    from k2jax.runtime import accelerator_present

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if not accelerator_present():  # say there is no TPU pod here, or libtpu prints its failed probes of the host
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    chip, chips, topo = parse_topology(name)
    kw = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, **kw)
    if len(desc.devices) != chips:
        raise TopologyError(f"{name}: libtpu gave {len(desc.devices)} devices for {topo}, expected {chips}")
    return chip, desc.devices


def _compile_train(config: K2Config, execution: Execution, mesh, batch: int, seq: int, microbatches: int,
                   grad_accum_dtype: str = "param", lora=None, base_quant: str = ""):
    from k2jax.train.optim import OptimConfig
    from k2jax.train.step import LossConfig, Trainer

    optim = OptimConfig(grad_accum_dtype=grad_accum_dtype, optimizer="adamw" if lora is not None else "muonclip")
    trainer = Trainer(config, optim, mesh, loss=LossConfig(vocab_chunk=8192), microbatches=microbatches,
                      execution=execution, lora=lora, base_quant=base_quant)
    state = trainer.abstract_state()
    spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=trainer.batch_sharding)
    t0 = time.perf_counter()
    compiled = _compile_or_oom(trainer.lower(state, {"tokens": spec, "segment_ids": spec, "positions": spec}))
    return compiled, time.perf_counter() - t0, trainer


def compile_optimizer(trainer, tx=None):
    """A Trainer's optimizer update alone (gradients in, new params and state out; params and state donated),
    compiled for its mesh; `tx` replaces the Trainer's transform (same state structure)."""
    import optax

    tx = tx or trainer.tx
    state = trainer.abstract_state()

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    shardings = (trainer.param_shardings, trainer.opt_shardings)
    with jax.set_mesh(trainer.mesh):
        return _compile_or_oom(jax.jit(update, in_shardings=shardings + (trainer.param_shardings,),
                                       out_shardings=shardings, donate_argnums=(0, 1))
                               .lower(state.params, state.opt_state, state.params))


def _cost(compiled, chip: Chip) -> tuple[float, float]:
    """(per-chip FLOPs, seconds) of a compiled step: XLA's optimal_seconds when it gives one, else the
    roofline max(FLOPs / peak, bytes accessed / HBM bandwidth)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    seconds = float(cost.get("optimal_seconds", -1.0))
    if seconds <= 0:
        seconds = max(flops / chip.peak_flops, float(cost.get("bytes accessed", 0.0)) / chip.hbm_bandwidth)
    return flops, seconds


def by_depth(config: K2Config, execution: Execution, build) -> dict[int, object]:
    """{2: build(config, execution), 3: ...} for 2- and 3-layer copies of the model with every loop unrolled
    (XLA's cost analysis counts a loop body once), for `extrapolate`."""
    run = execution.replace(scan_layers=False, moe_block_unroll=0)
    return {n: build(config.replace(num_hidden_layers=n, first_k_dense_replace=min(config.first_k_dense_replace, 1)),
                     run) for n in (2, 3)}


def extrapolate(per_depth: dict[int, float], layers: int) -> float:
    """A per-step figure of the full depth from its 2- and 3-layer values (each further layer adds one MoE layer)."""
    return per_depth[3] + (layers - 3) * (per_depth[3] - per_depth[2])


def compile_train(config: K2Config, topology: str, mesh_spec: str, *, batch: int, seq: int,
                  microbatches: int = 1, progress=None, flops_batch: int | None = None,
                  grad_accum_dtype: str = "param", execution: Execution | None = None, lora=None,
                  base_quant: str = "", cost: bool = True) -> Report:
    """AOT-compiles the real train step; FLOPs and time come from 2- and 3-layer unrolled builds, extrapolated
    to the full depth (XLA counts a scanned loop body once).

    The unrolled builds hold `flops_batch` sequences (default: one per batch shard, at most a microbatch) and
    their model part is scaled by microbatch / flops_batch: FLOPs are linear in the sequences, and a full K2
    build with two sequences per chip outgrows a small build host. The time scales the same way, an upper bound
    (the weights' gathers do not grow with the batch). The optimizer update is counted once per step. With `lora`
    (a LoraConfig) it is a LoRA fine-tuning step: adapters trained, the base frozen (held as `base_quant`).
    `cost=False`: the memory verdict only (FLOPs and time NaN), without the unrolled builds.
    """
    from k2jax.train.step import analytic_train_flops

    analytic = functools.partial(analytic_train_flops, lora=lora)

    chip, devices = topology_devices(topology)
    mesh = make_mesh(mesh_spec, devices=devices)
    execution = execution or Execution()
    if execution.kernels == "auto":  # what 'auto' means on a TPU host (this host's backend is the CPU)
        execution = execution.replace(kernels="pallas")
    micro = batch // microbatches
    if flops_batch is None:
        from k2jax.model.sharding import ShardingRules

        shards = math.prod(mesh.shape.get(a, 1) for a in ShardingRules().for_training().mesh_axes("batch"))
        flops_batch = shards if micro % shards == 0 else micro
    if flops_batch <= 0 or micro % flops_batch:
        raise ConfigError(f"--flops_batch={flops_batch} does not divide the microbatch of {micro} sequences")
    compiled, secs, _ = _compile_train(config, execution, mesh, batch, seq, microbatches, grad_accum_dtype, lora,
                                       base_quant)
    mem = compiled.memory_analysis()
    over = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    if progress is not None:
        progress(f"full-depth step compiled in {secs:.1f}s: {over / GiB:.2f} GiB per chip of {chip.hbm_bytes / GiB:.2f}"
                 + ("" if over > chip.hbm_bytes or not cost else f"; counting FLOPs with 2- and 3-layer unrolled "
                    f"builds of {flops_batch} sequences"))
    if over > chip.hbm_bytes or not cost:  # the verdict is known (or only it was asked for): no FLOPs builds
        mode = "finetune" if lora is not None else "train"
        return Report(**_memory_fields(topology, mesh, mode, chip, len(devices), mem),
                      flops=float("nan"), analytic_flops=analytic(config, batch * seq, seq), seconds=float("nan"),
                      tokens=batch * seq, compile_s=secs, collective_bytes=0)

    def costs(small, run):  # (step FLOPs, seconds, update FLOPs, seconds, step's and update's bytes by kind)
        c, _, small_trainer = _compile_train(small, run, mesh, flops_batch, seq, 1, lora=lora, base_quant=base_quant)
        update = compile_optimizer(small_trainer)
        text = c.as_text()
        moves = collective_moves(text), collective_moves(update.as_text())
        flops, secs = _cost(c, chip)
        kernel = splash_flops(text, small.qk_head_dim, small.v_head_dim)  # counted by the report, at the peak rate
        return ((flops + kernel, secs + kernel / chip.peak_flops) + _cost(update, chip) + tuple(moves[0][k] for k in KINDS)
                + tuple(moves[1][k] for k in KINDS) + (kernel_flops(text, "gmm"), gmm_tile_allowance(text), kernel))

    built = by_depth(config, execution, costs)
    per_step = [extrapolate({n: v[i] for n, v in built.items()}, config.num_hidden_layers)
                for i in range(7 + 2 * len(KINDS))]
    f, s, opt, opt_s = per_step[:4]
    # each unrolled build holds one update; the step runs the model on `microbatches` x `micro` sequences and
    # the update once (the weights' gathers scale with the microbatches, not with the sequences: an upper bound)
    scale = microbatches * micro / flops_batch
    flops = scale * (f - opt) + opt
    seconds = scale * (s - opt_s) + opt_s
    n = len(KINDS)
    moved = {k: scale * (step - upd) + upd for k, step, upd in zip(KINDS, per_step[4:4 + n], per_step[4 + n:4 + 2 * n])}
    grouped, allowance, splash = (len(devices) * scale * x for x in per_step[-3:])
    parts = {} if lora is not None else _flops_parts(config, batch * seq, seq, len(devices) * scale * (f - opt),
                                                     grouped, splash)
    # what the grouped-matmul kernels visit: the routed rows (at most the analytic count) plus partial tiles
    visits = min(grouped, next(iter(parts.values()))[1] + allowance) if grouped and parts else 0.0
    mode = "finetune" if lora is not None else "train"
    return Report(**_memory_fields(topology, mesh, mode, chip, len(devices), mem),
                  flops=flops * len(devices), analytic_flops=analytic(config, batch * seq, seq), seconds=seconds,
                  tokens=batch * seq, compile_s=secs, collective_bytes=collective_bytes(compiled.as_text()),
                  optimizer_flops=opt * len(devices), collectives=moved,
                  optimizer_collectives=dict(zip(KINDS, per_step[4 + n:4 + 2 * n])), ici_bandwidth=chip.ici_bandwidth,
                  parts=parts, grouped_visits=visits)


def _memory_fields(topology: str, mesh, mode: str, chip, chips: int, mem) -> dict:
    """The Report fields every compile fills the same way: where it ran and the compiled module's memory."""
    return dict(topology=topology, mesh=dict(mesh.shape), mode=mode, chips=chips, hbm_bytes=chip.hbm_bytes,
                argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)


def _flops_parts(config: K2Config, tokens: int, seq: int, model: float, grouped: float, splash: float) -> dict:
    """{part: (compiled, analytic)} of a train step's model FLOPs (the update's left out): the grouped-matmul
    kernels' cost estimates against the routed experts' count, splash's counted blocks against attention's, the
    rest (XLA's own count) against the rest. A part whose kernels are absent goes into the rest."""
    from k2jax.train.step import analytic_train_flops_parts

    want = analytic_train_flops_parts(config, tokens, seq)
    parts = {}
    if grouped:
        parts["routed experts (gmm kernels: row buffers)"] = (grouped, want["routed experts"])
    if splash:
        parts["attention (splash kernels: causal blocks)"] = (splash, want["attention"])
    if not parts:
        return {}
    rest = sum(want.values()) - sum(w for _, w in parts.values())
    parts["the rest (XLA's count)"] = (
        model - grouped - splash, rest)
    return parts


def compile_decode(config: K2Config, topology: str, mesh_spec: str, *, batch: int, context: int,
                   cache_dtype: str = "bfloat16", execution: Execution | None = None, prefill_chunk: int = 0) -> Report:
    """AOT-compiles one decode step (absorbed latent cache of `context` tokens) for `batch` sequences; with
    `prefill_chunk`, one chunk of a long prompt's prefill instead (that many tokens against the cache), its
    analytic FLOPs those of the last chunk (every earlier key read)."""
    from k2jax.inference.model import Model
    from k2jax.inference.sampler import Sampler
    from k2jax.model import cache as kv_cache
    from k2jax.model.init import place
    from k2jax.model.params import stack_layers

    chip, devices = topology_devices(topology)
    execution = execution or Execution()
    if execution.moe_impl == "auto":  # forward only: ragged_dot is exact and near the ideal FLOPs on TPU
        execution = execution.replace(moe_impl="ragged")
    p = place(config, make_mesh(mesh_spec, devices=devices), execution=execution)
    mesh, rules, state = p.mesh, p.rules, p.shaped()
    sampler = Sampler(Model(config, p.graphdef, state, mesh, rules, execution=execution), cache_dtype)
    cache_sh = rules.sharding(("layers", "batch", "cache_seq", None), mesh)
    cache = {name: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_sh),
                                jax.eval_shape(lambda n=len(layers): kv_cache.empty_cache(config, n, batch, context,
                                                                                          cache_dtype)))
             for name, layers in stack_layers(config).items() if len(layers)}
    vec = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rules.sharding(("batch",), mesh))
    if prefill_chunk:
        rows = rules.sharding(("batch", None), mesh)
        args = (jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32, sharding=rows),
                jax.ShapeDtypeStruct((batch, prefill_chunk), jnp.int32, sharding=rows),
                jax.ShapeDtypeStruct((), jnp.int32), vec)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = _compile_or_oom(sampler._jit_prefill_chunk.lower(state, cache, *args) if prefill_chunk
                                   else sampler.jit_decode_step.lower(state, cache, vec, vec))
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    flops, seconds = _cost(compiled, chip)
    scale = config.num_moe_layers  # the MoE scan body is counted once
    from k2jax.model.init import param_count

    _, active = param_count(config)
    c = config
    analytic = 2.0 * active * batch + 4.0 * c.num_hidden_layers * c.num_attention_heads * (
        c.kv_lora_rank + c.qk_rope_head_dim) * context * batch
    mode = f"decode (batch {batch}, context {context}, {cache_dtype} cache)"
    if prefill_chunk:  # the chunk's tokens, scores and values against every key, the keys expanded from the latent
        t = prefill_chunk * batch
        analytic = 2.0 * active * t + c.num_hidden_layers * c.num_attention_heads * context * batch * 2.0 * (
            prefill_chunk * (c.qk_head_dim + c.v_head_dim) + c.kv_lora_rank * (c.qk_nope_head_dim + c.v_head_dim))
        mode = f"prefill chunk ({prefill_chunk} tokens x batch {batch}, the last of a {context}-token cache, {cache_dtype})"
    return Report(**_memory_fields(topology, mesh, mode, chip, len(devices), mem), flops=flops * len(devices) * scale,
                  analytic_flops=analytic, seconds=seconds * scale, tokens=batch * (prefill_chunk or 1), compile_s=secs,
                  collective_bytes=collective_bytes(compiled.as_text()))


def candidate_meshes(chips: int, config: K2Config) -> list[str]:
    """A short list of layouts worth trying on `chips` chips (expert and tensor axes that divide the model)."""
    out = [f"fsdp={chips}"]
    for ep in (8, 16, 32, 64, 128):
        for tp in (1, 2, 4):
            if ep * tp <= chips and chips % (ep * tp) == 0 and config.n_routed_experts % ep == 0 \
                    and config.num_attention_heads % tp == 0:
                rest = chips // (ep * tp)
                spec = f"fsdp={rest},expert={ep}" + (f",tensor={tp}" if tp > 1 else "")
                out.append(spec)
    return out


def check_mesh(spec: str, chips: int) -> None:
    from k2jax.model.sharding import parse_mesh_spec

    sizes = parse_mesh_spec(spec)
    if math.prod(sizes.values() or [1]) != chips:
        raise ShardingError(f"--mesh={spec!r} has {math.prod(sizes.values() or [1])} devices but the topology has "
                            f"{chips} chips")
