"""The training loop behind `k2jax-train`: data, resumable Orbax checkpoints, metrics, preemption handling."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from k2jax import checkpoint as ckpt
from k2jax.config import K2Config
from k2jax.data import global_batch, make_dataset, open_source
from k2jax.layers.common import RouterBias
from k2jax.metrics import MetricsWriter
from k2jax.optim import OptimConfig
from k2jax.train import LossConfig, Trainer, analytic_train_flops

# Peak dense bf16 FLOP/s per chip, by jax device_kind substring.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything about a run that is not the model or the optimizer."""

    workdir: str
    steps: int = 300
    batch: int = 8  # global batch, in sequences
    seq: int = 256
    microbatches: int = 1
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    data: str = ""  # path/glob of .jsonl/.txt/.array_record; "" = the embedded stdlib corpus
    text_field: str = "text"
    on_missing_text: str = "error"
    tokenizer: str = ""  # tiktoken.model; "" = a BPE trained on the embedded corpus
    seed: int = 0
    data_workers: int = 0
    async_save: bool = True
    z_loss: float = 0.0
    sample_tokens: int = 48
    sample_prompt: str = "def "


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for jax.devices()[0]; on CPU a measured float32 matmul rate."""
    kind = jax.devices()[0].device_kind
    for k, v in PEAK_FLOPS.items():
        if k.lower() in kind.lower():
            return v, f"{kind} peak"
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    rate = 5 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    return rate, f"measured {kind} matmul rate"


def resolve_data(run: RunConfig) -> tuple[str, str]:
    """(data source, tokenizer path), building the embedded corpus and its tokenizer on first use."""
    from k2jax.corpus import default_corpus, default_tokenizer

    data = run.data or default_corpus()
    tok = run.tokenizer or default_tokenizer()
    return data, tok


def train(config: K2Config, optim: OptimConfig, run: RunConfig, mesh, log=print) -> dict:
    """Trains (or resumes) in run.workdir until run.steps; returns the last logged metrics."""
    from k2jax.tokenizer import load_tokenizer

    pid, nproc = jax.process_index(), jax.process_count()
    if run.batch % nproc:
        raise ValueError(f"--batch={run.batch} must be divisible by the {nproc} processes")
    data_path, tok_path = resolve_data(run)
    tokenizer = load_tokenizer(tok_path)
    tokenizer.check_model(config)
    source = open_source(data_path, run.text_field, run.on_missing_text)
    skipped = getattr(source, "skipped", [])
    if skipped:
        log(f"data: skipped {len(skipped)} records without {run.text_field!r} (first at line {skipped[0]})")

    trainer = Trainer(config, optim, mesh, loss=LossConfig(z_loss=run.z_loss), microbatches=run.microbatches)
    mgr = ckpt.manager(run.workdir, max_to_keep=run.keep, save_interval_steps=run.save_every,
                       async_save=run.async_save)
    data_state, start = None, 0
    latest = mgr.latest_step()
    if latest is not None:
        state, data_state = restore_train_state(mgr, latest, trainer)
        start = int(state.step)
        log(f"resumed from {os.path.join(run.workdir, str(latest))} at step {start}")
    else:
        state = trainer.init_state(run.seed)
    ds = make_dataset(source, tok_path, seq_len=run.seq, batch_size=run.batch // nproc, seed=run.seed,
                      process_index=pid, process_count=nproc, worker_count=run.data_workers)
    it = iter(ds)
    if data_state is not None:
        it.set_state(data_state)

    total, active = __import__("k2jax").param_count(config)
    tokens_per_step = run.batch * run.seq
    flops_per_step = analytic_train_flops(config, tokens_per_step, run.seq)
    peak, peak_src = peak_flops_per_device()
    first = next(it)
    batch = global_batch(first, mesh, trainer.rules)
    t0 = time.perf_counter()
    with _cache_hits() as saved:
        compiled = trainer.lower(state, batch).compile()
    cache_dir = jax.config.jax_compilation_cache_dir
    how = (f"loaded from the compilation cache {cache_dir} ({sum(saved):.1f} s of compilation saved)" if saved else
           "compiled" + (f" (compilation cache: {cache_dir})" if cache_dir else ""))
    log(f"train step {how} in {time.perf_counter() - t0:.1f} s")
    mem = compiled.memory_analysis()
    log(f"model: {total:,} parameters, {active:,} active per token")
    log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s), {nproc} process(es)")
    if mem is not None:
        per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)
        log(f"compiled step, per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, temporaries "
            f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, outputs {mem.output_size_in_bytes / 2**20:.1f} MiB, "
            f"total {per_dev / 2**20:.1f} MiB")
    log(f"step: {tokens_per_step:,} tokens, {flops_per_step:.3e} FLOPs (6·active·tokens + attention); "
        f"peak {peak:.3e} FLOP/s per device ({peak_src})")

    writer = MetricsWriter(run.workdir, enabled=pid == 0)
    stop = {"sigterm": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    last, t_last, step = {}, time.perf_counter(), start
    try:
        while step < run.steps:
            state, metrics = trainer.step(state, batch)
            step += 1
            if step % run.log_every == 0 or step == run.steps or stop["sigterm"]:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                n = step - (last.get("step", start))
                dt = (now - t_last) / max(n, 1)
                m.update(step=step, step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                         mfu=flops_per_step / dt / (peak * jax.device_count()))
                t_last, last = now, m
                writer.write(step, {k: v for k, v in m.items() if k != "step"})
                log(f"step {step:6d}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}"
                    f"  tok/s {m['tokens_per_s']:,.0f}  mfu {m['mfu']:.3f}"
                    + (f"  load max/mean {m['expert_load_imbalance']:.2f}" if "expert_load_imbalance" in m else "")
                    + f"  max_logit {m['max_attention_logit']:.2f}")
            if step % run.save_every == 0 or step == run.steps or stop["sigterm"]:
                mgr.save(step, args=train_save_args(trainer, state, config, it.get_state()),
                         force=stop["sigterm"] or step == run.steps)
            if stop["sigterm"]:
                log(f"SIGTERM: saved step {step}, exiting")
                break
            if step < run.steps:
                batch = global_batch(next(it), mesh, trainer.rules)
    finally:
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    last["preempted"] = stop["sigterm"]
    last["final_step"] = step
    return last


@contextlib.contextmanager
def _cache_hits():
    """Yields a list that collects the compile seconds saved by each persistent-cache hit inside the block."""
    saved = []

    def listener(event, duration, **_):
        if event == "/jax/compilation_cache/compile_time_saved_sec":
            saved.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield saved
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def train_save_args(trainer: Trainer, state, config: K2Config, data_state) -> ocp.args.Composite:
    train = {"step": int(state.step), "rng": ckpt.key_to_json(state.rng), "data": _jsonable(data_state)}
    return ckpt.save_args(trainer.model_state(state), config, state.opt_state, train)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        return {"__bytes__": x.hex()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_jsonable(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return bytes.fromhex(x["__bytes__"])
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


def restore_train_state(mgr: ocp.CheckpointManager, step: int, trainer: Trainer):
    """(TrainState, data-iterator state) of a saved step, every array restored into the trainer's shardings."""
    from k2jax.train import TrainState

    abstract = trainer.abstract_state()
    model_abs = nnx.state(nnx.merge(trainer.graphdef, abstract.params, abstract.bias))
    target = nnx.to_pure_dict(model_abs)
    restored = mgr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target), opt_state=ocp.args.StandardRestore(abstract.opt_state),
        train=ocp.args.JsonRestore()))
    model_state = jax.tree.map(lambda x: x, model_abs)
    nnx.replace_by_pure_dict(model_state, restored.model)
    _, params, bias = nnx.split(nnx.merge(trainer.graphdef, nnx.filter_state(model_state, nnx.Param),
                                          nnx.filter_state(model_state, RouterBias)), nnx.Param, RouterBias)
    train = restored.train
    rng = jax.device_put(ckpt.key_from_json(train["rng"]), trainer.replicated)
    state = TrainState(params, bias, restored.opt_state, jax.device_put(jnp.asarray(train["step"], jnp.int32),
                                                                         trainer.replicated), rng)
    return state, _from_jsonable(train.get("data"))
