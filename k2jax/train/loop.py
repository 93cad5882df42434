"""The training loop behind `k2jax-train`: data, resumable Orbax checkpoints, metrics, preemption handling.

`train` is a short loop over the pieces below. Each step's metrics are fetched from the device only after the
next step has been dispatched, so the host never waits for a step it has just launched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import storage
from k2jax.ckpt import orbax as ckpt
from k2jax.data.pipeline import global_batch, make_dataset, open_source, position_for, rows_of_process
from k2jax.errors import ConfigError, TrainingError
from k2jax.hardware import peak_flops_per_device
from k2jax.model.config import Execution, K2Config
from k2jax.model.init import param_count
from k2jax.model.layers.lora import LoraConfig
from k2jax.progress import busy
from k2jax.train.metrics import MetricsWriter
from k2jax.train.optim import OptimConfig
from k2jax.train.resume import start_state, train_save_args
from k2jax.train.step import LossConfig, Trainer, analytic_train_flops


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
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    chat_template: str = ""  # chat: a jinja2 template file; "" = the one shipped with --init_from or the tokenizer
    lora: LoraConfig | None = None  # train low-rank adapters over the frozen --init_from base
    base_quant: str = ""  # LoRA: hold the base as "int8" (per output channel) or "fp8" (128x128 blocks)

    def __post_init__(self):
        """Flag combinations that would otherwise be ignored silently, refused naming the flag."""
        if self.data_format not in ("text", "chat"):
            raise ConfigError(f"--data_format: expected 'text' or 'chat', got {self.data_format!r}")
        if self.data_format == "chat" and not self.data:
            raise ConfigError("--data_format=chat needs --data=FILE.jsonl (the embedded corpus is plain text)")
        if self.lora is not None and not self.init_from:
            raise ConfigError("--lora_rank needs --init_from=BASE (an HF folder or a k2jax checkpoint): the adapters "
                              "are trained over those frozen weights")
        if self.max_bad_steps < 1:
            raise ConfigError(f"--max_bad_steps={self.max_bad_steps}: must be at least 1")
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
        import os

        from k2jax.data.chat import ChatSource
        from k2jax.text.chat import load_chat_template

        template = load_chat_template(run.chat_template, near=(run.init_from, os.path.dirname(tok_path)))
        log(f"chat template: {template.source}")
        source = ChatSource(data_path, tok_path, run.seq, on_long=run.on_long, on_bad=run.on_bad,
                            chat_template=template)
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
    ds = make_dataset(source, tok_path, seq_len=run.seq, batch_size=run.batch, seed=0,
                      rows=rows_of_process(run.batch, trainer.mesh, trainer.rules), num_epochs=1,
                      drop_remainder=False)  # rows that run out first are padded: segment 0, weight 0, no loss
    local = list(ds)
    if jax.process_count() > 1 and local:  # every process takes part in every batch: pad to the longest
        from jax.experimental import multihost_utils

        n = int(np.max(multihost_utils.process_allgather(np.asarray([len(local)], np.int64))))
        local += [{k: np.zeros_like(v) for k, v in local[0].items()}] * (n - len(local))
    out = [global_batch(b, trainer.mesh, trainer.rules) for b in local]
    if not out:
        raise ConfigError(f"--eval_data={run.eval_data}: no batch of held-out data")
    return out


def check_paths(run: RunConfig) -> None:
    """Every bucket the run names answers, before anything is read, compiled or written (errors name the flag)."""
    for flag, path in (("--workdir", run.workdir), ("--init_from", run.init_from), ("--data", run.data),
                       ("--eval_data", run.eval_data), ("--tokenizer", run.tokenizer)):
        if path:
            storage.check_reachable(path, flag)


def compile_step(trainer: Trainer, state, batch, config: K2Config, run: RunConfig, log) -> float:
    """Compiles (or loads from the persistent cache) the train step and logs its size; returns FLOPs per step."""
    t0 = time.perf_counter()
    with _cache_hits() as saved, busy("compiling the train step"):
        compiled = trainer.lower(state, batch).compile()
    cache_dir = jax.config.jax_compilation_cache_dir
    how = (f"loaded from the compilation cache {cache_dir} ({sum(saved):.1f} s of compilation saved)" if saved else
           "compiled" + (f" (compilation cache: {cache_dir})" if cache_dir else ""))
    log(f"train step {how} in {time.perf_counter() - t0:.1f} s")
    total, active = param_count(config)
    log(f"model: {total:,} parameters, {active:,} active per token")
    if trainer.lora is not None:
        n = sum(x.size for x in jax.tree.leaves(trainer.abstract_params))
        log(f"LoRA: {n:,} adapter parameters trained ({100 * n / total:.2f}% of the base, which stays frozen"
            + (f", held as {trainer.base_quant})" if trainer.base_quant else ")"))
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
    device has finished by then, so the host never blocks on the step it just dispatched.

    Every step's `step_ok` flag is fetched the same way: a step the device did not apply (its loss or gradients
    were not finite) is logged with the first parameter whose gradient was not finite, and counted in `bad_run`
    (steps in a row) and `bad_total`; `last_good` is the newest applied step."""

    def __init__(self, run: RunConfig, flops_per_step: float, start: int, writer: MetricsWriter, log,
                 param_names: list[str] | None = None):
        self.run, self.flops, self.writer, self.log = run, flops_per_step, writer, log
        self.param_names = param_names or []
        self.peak, peak_src = peak_flops_per_device()
        log(f"peak {self.peak:.3e} FLOP/s per device ({peak_src})")
        self.pending, self.unchecked, self.last, self.last_eval = None, None, {}, {}
        self.t_last, self.step_last = time.perf_counter(), start
        self.last_good, self.bad_run, self.bad_total = start, [], 0
        self.stop_requested = False

    def push(self, step: int, metrics):
        """Records step `step`'s (device) metrics; checks the previous step and writes it if it was logged."""
        self.check()
        self.flush()
        self.unchecked = (step, metrics["step_ok"], metrics["first_nonfinite_grad"], metrics["stop_requested"])
        if step % self.run.log_every == 0 or step == self.run.steps or self.stop_requested:
            self.pending = (step, metrics)  # the step a stop is seen at is logged too

    def check(self):
        """Fetches the unchecked step's ok flag (blocks until that step is done) and records a bad step."""
        if self.unchecked is None:
            return
        step, ok, first, stop = jax.device_get(self.unchecked)
        self.unchecked = None
        self.stop_requested = self.stop_requested or bool(stop)
        if ok:
            self.last_good, self.bad_run = step, []
            return
        name = self.param_names[int(first)] if 0 <= int(first) < len(self.param_names) else "none (the loss)"
        self.bad_run.append((step, name))
        self.bad_total += 1
        self.log(f"step {step:6d}  loss or gradient not finite (first non-finite gradient: {name}): step not "
                 f"applied, the state stays at step {self.last_good} ({len(self.bad_run)} in a row, "
                 f"{self.bad_total} in all)")

    def settle(self) -> bool:
        """Checks and writes everything dispatched so far; whether the newest step was applied."""
        self.check()
        self.flush()
        return not self.bad_run

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
        flags = ("step_ok", "first_nonfinite_grad", "stop_requested")  # read by `check`, not logged
        m = {k: float(v) for k, v in jax.device_get({k: v for k, v in metrics.items() if k not in flags}).items()}
        now = time.perf_counter()
        dt = (now - self.t_last) / max(step - self.step_last, 1)
        tokens = self.run.batch * self.run.seq
        m.update(step=step, step_time_s=dt, tokens_per_s=tokens / dt, bad_steps=float(self.bad_total),
                 mfu=self.flops / dt / (self.peak * jax.device_count()))
        self.t_last, self.step_last, self.last = now, step, m
        self.writer.write(step, {k: v for k, v in m.items() if k != "step"})
        self.log(f"step {step:6d}  loss {m['loss']:.4f}  grad_norm {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}"
                 f"  tok/s {m['tokens_per_s']:,.0f}  mfu {m['mfu']:.3f}"
                 + (f"  load max/mean {m['expert_load_imbalance']:.2f}" if "expert_load_imbalance" in m else "")
                 + (f"  dropped {m['moe_dropped']:,.0f}" if m.get("moe_dropped") else "")
                 + f"  max_logit {m['max_attention_logit']:.2f}")


def train(config: K2Config, optim: OptimConfig, run: RunConfig, mesh, log=print,
          execution: Execution | None = None) -> dict:
    """Trains (or resumes) in run.workdir until run.steps; returns the last logged metrics.

    Checkpoints are written only from applied steps: a save that falls on a step the device did not apply is
    skipped, and a run stopped (SIGTERM, or `max_bad_steps` non-finite steps in a row) saves its last good step."""
    pid = jax.process_index()
    check_paths(run)
    source, tok_path = open_data(run, config, log)
    trainer = Trainer(config, optim, mesh, loss=LossConfig(z_loss=run.z_loss), microbatches=run.microbatches,
                      execution=execution, lora=run.lora, seed=run.seed, base_quant=run.base_quant)
    mgr = ckpt.manager(run.workdir, max_to_keep=run.keep, save_interval_steps=1, async_save=run.async_save)
    rows = rows_of_process(run.batch, mesh, trainer.rules)
    state, saved_data, step = start_state(trainer, mgr, run, log)
    it = iter(make_dataset(source, tok_path, seq_len=run.seq, batch_size=run.batch, rows=rows, seed=run.seed,
                           worker_count=run.data_workers))
    if saved_data is not None:
        it.set_state(position_for(saved_data, rows, log))
    stop = {"sigterm": False}

    def next_batch():
        """The next global batch, carrying this process's SIGTERM flag in every row: the step reduces it over all
        processes, so every process learns of a stop at the same step and they save and exit together."""
        local = next(it)
        local["stop"] = np.full((len(local["tokens"]), 1), stop["sigterm"], np.int32)
        return global_batch(local, mesh, trainer.rules)

    batch = next_batch()
    flops = compile_step(trainer, state, batch, config, run, log)
    wait_for_all_processes("k2jax: train step compiled")
    writer = MetricsWriter(run.workdir, enabled=pid == 0)
    steps = StepLog(run, flops, step, writer, log, trainer.param_names())
    held_out = eval_batches(run, config, trainer, log) if run.eval_data else None
    if held_out is not None and step == 0:  # where the held-out loss starts from
        steps.evaluate(step, lambda: trainer.evaluate(state, held_out))
    saved = {"step": mgr.latest_step() or step}

    def save(at: int, force: bool):
        """Saves step `at` if it was applied; otherwise the last good step (once), labelled as such, with the
        data position after step `at`: a resumed run does not feed again the batches that were not applied."""
        if saved.get("tried") == at:
            return
        saved["tried"] = at
        good = steps.settle()
        label = at if good else steps.last_good
        if label <= saved["step"]:
            if not good:
                log(f"step {at}: not saved (not applied; newest checkpoint: step {saved['step']})")
            return
        out = state if good else dataclasses.replace(state, step=jnp.asarray(label, jnp.int32))
        mgr.save(label, args=train_save_args(trainer, out, {"rows": [rows.start, rows.stop], "state": it.get_state()}),
                 force=force)
        saved["step"] = label
        if not good:
            log(f"saved step {label}, the last good step (step {at} was not applied)")

    previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    try:
        while step < run.steps:
            state, metrics = trainer.step(state, batch)
            step += 1
            steps.push(step, metrics)
            if held_out is not None and (step % run.eval_every == 0 or step == run.steps):
                steps.evaluate(step, lambda: trainer.evaluate(state, held_out))
            if step % run.save_every == 0 or step == run.steps or steps.stop_requested:
                save(step, force=steps.stop_requested or step == run.steps)
            if len(steps.bad_run) >= run.max_bad_steps:
                steps.settle()
                save(step, force=True)
                first_step, first_name = steps.bad_run[0]
                raise TrainingError(
                    f"stopped at step {step}: {len(steps.bad_run)} steps in a row (--max_bad_steps="
                    f"{run.max_bad_steps}) had a non-finite loss or gradient, from step {first_step} on; the "
                    f"first non-finite gradient was {first_name}. The newest checkpoint is step {saved['step']}, "
                    "the last good step; lower the learning rate (or check the data) and resume.")
            if steps.stop_requested:
                log(f"SIGTERM: saved step {saved['step']}, exiting")
                break
            if step < run.steps:
                batch = next_batch()
        steps.settle()
    finally:
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    return {**steps.last, **steps.last_eval, "preempted": steps.stop_requested or stop["sigterm"], "final_step": step,
            "bad_steps": steps.bad_total, "last_good_step": steps.last_good}


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches this point (the coordination service's barrier, no collective).

    The first collective of a CPU run (Gloo) gives its peers 30 s to arrive; processes that finish compiling
    further apart than that, on a loaded host, would fail it. This barrier waits as long as compiling takes."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # not started through jax.distributed (e.g. a single-controller runtime): no barrier needed
        return
    client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


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
