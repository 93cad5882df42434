"""The training loop behind `k2jax-train`: data, resumable Orbax checkpoints, metrics, preemption handling.

`train` is a short loop over the pieces below. Each step's metrics are fetched from the device only after the
next step has been dispatched, so the host never waits for a step it has just launched.
"""

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

from k2jax.ckpt import orbax as ckpt
from k2jax.data.pipeline import global_batch, make_dataset, open_source
from k2jax.errors import ConfigError
from k2jax.hardware import peak_flops_per_device
from k2jax.model.config import Execution, K2Config
from k2jax.model.init import param_count
from k2jax.model.params import RouterBias
from k2jax.train.metrics import MetricsWriter
from k2jax.train.optim import OptimConfig
from k2jax.train.step import LossConfig, Trainer, TrainState, analytic_train_flops


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
    data_format: str = "text"  # text | chat (JSONL conversations; loss on the assistant's tokens)
    on_long: str = "drop"  # chat: a conversation longer than seq is dropped, or truncated at a turn boundary
    on_bad: str = "error"  # chat: a malformed record stops with FILE:LINE, or is skipped and counted
    eval_data: str = ""  # held-out data of the same format, evaluated every eval_every steps
    eval_every: int = 0
    init_from: str = ""  # a k2jax checkpoint or an HF folder whose weights start the run (not its optimizer)

    def __post_init__(self):
        """Flag combinations that would otherwise be ignored silently, refused naming the flag."""
        if self.data_format not in ("text", "chat"):
            raise ConfigError(f"--data_format: expected 'text' or 'chat', got {self.data_format!r}")
        if self.data_format == "chat" and not self.data:
            raise ConfigError("--data_format=chat needs --data=FILE.jsonl (the embedded corpus is plain text)")
        if bool(self.eval_data) != (self.eval_every > 0):
            raise ConfigError("--eval_data and --eval_every go together: held-out data and how often to evaluate "
                              f"on it (got --eval_data={self.eval_data!r}, --eval_every={self.eval_every})")


def resolve_data(run: RunConfig) -> tuple[str, str]:
    """(data source, tokenizer path), building the embedded corpus and its tokenizer on first use."""
    from k2jax.data.corpus import default_corpus, default_tokenizer

    return run.data or default_corpus(), run.tokenizer or default_tokenizer()


def open_data(run: RunConfig, config: K2Config, log, path: str | None = None):
    """(source, tokenizer path): the data source (`path`, default the training data) opened, every record
    checked, and the tokenizer checked against the model."""
    from k2jax.text.tokenizer import load_tokenizer

    data_path, tok_path = resolve_data(run)
    data_path = path or data_path
    load_tokenizer(tok_path).check_model(config)
    if run.data_format == "chat":
        from k2jax.data.chat import ChatSource

        source = ChatSource(data_path, tok_path, run.seq, on_long=run.on_long, on_bad=run.on_bad)
        log(f"data: {source.counts.summary(data_path)}")
        return source, tok_path
    source = open_source(data_path, run.text_field, run.on_missing_text)
    skipped = getattr(source, "skipped", [])
    if skipped:
        log(f"data: skipped {len(skipped)} records without {run.text_field!r} (first at line {skipped[0]})")
    return source, tok_path


def eval_batches(run: RunConfig, config: K2Config, trainer: Trainer, log) -> list:
    """The held-out set as global batches (one pass; the last batch padded with empty rows)."""
    source, tok_path = open_data(run, config, log, run.eval_data)
    nproc = jax.process_count()
    ds = make_dataset(source, tok_path, seq_len=run.seq, batch_size=run.batch // nproc, seed=0,
                      process_index=jax.process_index(), process_count=nproc, num_epochs=1, drop_remainder=False)
    out = []
    for b in ds:
        short = run.batch // nproc - len(b["tokens"])
        if short:  # padding rows: segment 0, weight 0, so they carry no loss
            b = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        out.append(global_batch(b, trainer.mesh, trainer.rules))
    if not out:
        raise ConfigError(f"--eval_data={run.eval_data}: no batch of held-out data")
    return out


def architecture_of(path: str) -> K2Config:
    """The architecture of an HF folder (config.json) or a k2jax checkpoint, read before any weight."""
    from k2jax.model.config import from_hf_config

    if os.path.isfile(os.path.join(path, "config.json")):
        return from_hf_config(path)
    return ckpt.read_config(ckpt.resolve_step_dir(path))[0]


def load_weights(path: str, trainer: Trainer):
    """The model state of an HF folder (bf16, fp32 or the FP8 release) or a k2jax checkpoint, each array read
    shard by shard straight into the trainer's shardings and dtypes."""
    p = trainer.placement
    if os.path.isfile(os.path.join(path, "config.json")):
        from k2jax.ckpt.hf import load_hf_state

        return load_hf_state(path, trainer.config, p.abstract, p.shardings)
    step_dir = ckpt.resolve_step_dir(path)
    ckpt.check_shapes(step_dir, p.abstract)
    return ckpt.restore_model_state(step_dir, p.abstract, p.shardings)


def start_state(trainer: Trainer, mgr: ocp.CheckpointManager, run: RunConfig, log):
    """(train state, data-iterator state or None, first step): the latest checkpoint's, or a fresh start."""
    latest = mgr.latest_step()
    if latest is None and run.init_from:
        log(f"initialised from {run.init_from} (fresh optimizer state, step 0)")
        return trainer.init_state(model_state=load_weights(run.init_from, trainer)), None, 0
    if latest is None:
        return trainer.init_state(run.seed), None, 0
    state, data_state = restore_train_state(mgr, latest, trainer)
    log(f"resumed from {os.path.join(run.workdir, str(latest))} at step {int(state.step)}")
    return state, data_state, int(state.step)


def compile_step(trainer: Trainer, state, batch, config: K2Config, run: RunConfig, log) -> float:
    """Compiles (or loads from the persistent cache) the train step and logs its size; returns FLOPs per step."""
    t0 = time.perf_counter()
    with _cache_hits() as saved:
        compiled = trainer.lower(state, batch).compile()
    cache_dir = jax.config.jax_compilation_cache_dir
    how = (f"loaded from the compilation cache {cache_dir} ({sum(saved):.1f} s of compilation saved)" if saved else
           "compiled" + (f" (compilation cache: {cache_dir})" if cache_dir else ""))
    log(f"train step {how} in {time.perf_counter() - t0:.1f} s")
    total, active = param_count(config)
    log(f"model: {total:,} parameters, {active:,} active per token")
    log(f"mesh: {dict(trainer.mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s), "
        f"{jax.process_count()} process(es)")
    mem = compiled.memory_analysis()
    if mem is not None:
        per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)
        log(f"compiled step, per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, temporaries "
            f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, outputs {mem.output_size_in_bytes / 2**20:.1f} MiB, "
            f"total {per_dev / 2**20:.1f} MiB")
    tokens = run.batch * run.seq
    flops = analytic_train_flops(config, tokens, run.seq)
    log(f"step: {tokens:,} tokens, {flops:.3e} FLOPs (6·active·tokens + attention)")
    return flops


class StepLog:
    """Logs a step's metrics one step late: `push(step, device metrics)` fetches the previous step's, which the
    device has finished by then, so the host never blocks on the step it just dispatched."""

    def __init__(self, run: RunConfig, flops_per_step: float, start: int, writer: MetricsWriter, log):
        self.run, self.flops, self.writer, self.log = run, flops_per_step, writer, log
        self.peak, peak_src = peak_flops_per_device()
        log(f"peak {self.peak:.3e} FLOP/s per device ({peak_src})")
        self.pending, self.last, self.last_eval = None, {}, {}
        self.t_last, self.step_last = time.perf_counter(), start

    def push(self, step: int, metrics, force: bool = False):
        """Records step `step`'s (device) metrics; writes the previous logged step's."""
        self.flush()
        if step % self.run.log_every == 0 or step == self.run.steps or force:
            self.pending = (step, metrics)

    def evaluate(self, step: int, run_eval):
        """Runs `run_eval()` (held-out metrics as host floats) after the pending step is logged, writes and prints
        them, and restarts the step clock so that the evaluation's time is not counted as training's."""
        self.flush()
        metrics = run_eval()
        self.t_last, self.step_last = time.perf_counter(), step
        self.writer.write(step, metrics)
        self.last_eval = metrics
        self.log(f"step {step:6d}  eval loss {metrics['eval_loss']:.4f}  eval accuracy {metrics['eval_accuracy']:.4f}"
                 f"  ({metrics['eval_tokens']:,.0f} tokens)")

    def flush(self):
        """Fetches and writes the pending step's metrics (blocks until that step is done)."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - self.t_last) / max(step - self.step_last, 1)
        tokens = self.run.batch * self.run.seq
        m.update(step=step, step_time_s=dt, tokens_per_s=tokens / dt,
                 mfu=self.flops / dt / (self.peak * jax.device_count()))
        self.t_last, self.step_last, self.last = now, step, m
        self.writer.write(step, {k: v for k, v in m.items() if k != "step"})
        self.log(f"step {step:6d}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}"
                 f"  tok/s {m['tokens_per_s']:,.0f}  mfu {m['mfu']:.3f}"
                 + (f"  load max/mean {m['expert_load_imbalance']:.2f}" if "expert_load_imbalance" in m else "")
                 + f"  max_logit {m['max_attention_logit']:.2f}")


def train(config: K2Config, optim: OptimConfig, run: RunConfig, mesh, log=print,
          execution: Execution | None = None) -> dict:
    """Trains (or resumes) in run.workdir until run.steps; returns the last logged metrics."""
    pid, nproc = jax.process_index(), jax.process_count()
    if run.batch % nproc:
        raise ConfigError(f"--batch={run.batch} must be divisible by the {nproc} processes")
    source, tok_path = open_data(run, config, log)
    trainer = Trainer(config, optim, mesh, loss=LossConfig(z_loss=run.z_loss), microbatches=run.microbatches,
                      execution=execution)
    mgr = ckpt.manager(run.workdir, max_to_keep=run.keep, save_interval_steps=run.save_every,
                       async_save=run.async_save)
    state, data_state, step = start_state(trainer, mgr, run, log)
    it = iter(make_dataset(source, tok_path, seq_len=run.seq, batch_size=run.batch // nproc, seed=run.seed,
                           process_index=pid, process_count=nproc, worker_count=run.data_workers))
    if data_state is not None:
        it.set_state(data_state)
    batch = global_batch(next(it), mesh, trainer.rules)
    flops = compile_step(trainer, state, batch, config, run, log)
    writer = MetricsWriter(run.workdir, enabled=pid == 0)
    steps = StepLog(run, flops, step, writer, log)
    held_out = eval_batches(run, config, trainer, log) if run.eval_data else None
    if held_out is not None and step == 0:  # where the held-out loss starts from
        steps.evaluate(step, lambda: trainer.evaluate(state, held_out))
    stop = {"sigterm": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    try:
        while step < run.steps:
            state, metrics = trainer.step(state, batch)
            step += 1
            steps.push(step, metrics, force=stop["sigterm"])
            if held_out is not None and (step % run.eval_every == 0 or step == run.steps):
                steps.evaluate(step, lambda: trainer.evaluate(state, held_out))
            if step % run.save_every == 0 or step == run.steps or stop["sigterm"]:
                steps.flush()  # a save waits for the step anyway; its time is not the step's
                mgr.save(step, args=train_save_args(trainer, state, it.get_state()),
                         force=stop["sigterm"] or step == run.steps)
            if stop["sigterm"]:
                steps.flush()
                log(f"SIGTERM: saved step {step}, exiting")
                break
            if step < run.steps:
                batch = global_batch(next(it), mesh, trainer.rules)
        steps.flush()
    finally:
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    return {**steps.last, **steps.last_eval, "preempted": stop["sigterm"], "final_step": step}


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


def train_save_args(trainer: Trainer, state, data_state) -> ocp.args.Composite:
    """The Orbax items of a training checkpoint: model, config, optimizer state, step and data-iterator state."""
    train = {"step": int(state.step), "data": _jsonable(data_state)}
    return ckpt.save_args(trainer.model_state(state), trainer.config, trainer.execution.param_dtype,
                          state.opt_state, train)


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
    abstract = trainer.abstract_state()
    model_abs = nnx.state(nnx.merge(trainer.graphdef, abstract.params, abstract.bias))
    restored = mgr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.to_pure_dict(model_abs)),
        opt_state=ocp.args.StandardRestore(abstract.opt_state), train=ocp.args.JsonRestore()))
    model_state = jax.tree.map(lambda x: x, model_abs)
    nnx.replace_by_pure_dict(model_state, restored.model)
    _, params, bias = nnx.split(nnx.merge(trainer.graphdef, model_state), nnx.Param, RouterBias)
    step = jax.device_put(jnp.asarray(restored.train["step"], jnp.int32), trainer.replicated)
    return TrainState(params, bias, restored.opt_state, step), _from_jsonable(restored.train.get("data"))
