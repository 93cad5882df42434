"""k2jax-train: train K2 (any preset) on this CPU, a TPU slice or a multi-host pod; then sample from it."""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from k2jax.cli.common import config_from_flags, run_main, use_compilation_cache
from k2jax.train.optim import OptimConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset name, preset file (configs/tiny.py) or HF config.json.")
flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints, metrics.jsonl and TensorBoard events; resumes if it has "
                    "checkpoints. A local path or a gs:// URL (on a pod: a bucket every host shares).")
flags.DEFINE_string("mesh", "", "Mesh spec such as data=2,expert=4 (default: all devices on data).")
flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable): an execution setting (remat_policy, "
                          "moe_impl, attn_chunk, param_dtype, ...) or an architecture field, e.g. --set remat_policy=full.")
flags.DEFINE_multi_string("opt", [], "Optimizer override key=value (repeatable), e.g. --opt optimizer=adamw.")
flags.DEFINE_integer("steps", 300, "Train until this step.")
flags.DEFINE_integer("batch", 8, "Global batch size in sequences.")
flags.DEFINE_integer("seq", 256, "Sequence length.")
flags.DEFINE_integer("microbatches", 1, "Gradient accumulation microbatches per step.")
flags.DEFINE_float("lr", OptimConfig.learning_rate, "Peak learning rate (the decay ends at a tenth of it unless "
                   "--opt min_learning_rate=... sets it).")
flags.DEFINE_integer("warmup", 30, "Warm-up steps.")
flags.DEFINE_integer("save_every", 100, "Checkpoint interval in steps.")
flags.DEFINE_integer("keep", 3, "Checkpoints kept.")
flags.DEFINE_integer("log_every", 10, "Logging interval in steps.")
flags.DEFINE_string("data", "", "Training data: .jsonl / .txt / .array_record path or glob (default: embedded corpus).")
flags.DEFINE_string("text_field", "text", "JSONL/ArrayRecord field holding the text.")
flags.DEFINE_enum("on_missing_text", "error", ["error", "skip"], "Records without the text field: error or skip (counted).")
flags.DEFINE_enum("data_format", "text", ["text", "chat"], "text: documents; chat: JSONL conversations "
                  '{"messages": [...], "tools": [...]} in K2\'s chat format, the loss on the assistant\'s tokens only.')
flags.DEFINE_enum("on_long", "drop", ["drop", "truncate"], "chat: a conversation longer than --seq is dropped or "
                  "truncated after its last whole turn that fits (counted either way).")
flags.DEFINE_enum("on_bad", "error", ["error", "skip"], "chat: a malformed record stops with FILE:LINE before "
                  "training, or is skipped and counted.")
flags.DEFINE_string("chat_template", "", "chat: a jinja2 chat template file (default: the one that ships with "
                    "--init_from or the tokenizer's folder, chat_template.jinja or tokenizer_config.json, else k2jax's "
                    "built-in K2 renderer); the run logs which one it uses.")
flags.DEFINE_string("eval_data", "", "Held-out data (same format as --data): loss and token accuracy every --eval_every.")
flags.DEFINE_integer("eval_every", 0, "Evaluate on --eval_data every this many steps (and at the end).")
flags.DEFINE_string("init_from", "", "Start from these weights: a k2jax checkpoint or an HF folder (bf16, fp32 or the "
                    "FP8 release); the architecture comes from it, --set may change execution settings only; the "
                    "optimizer starts fresh at step 0. A workdir with checkpoints resumes from them instead.")
flags.DEFINE_string("tokenizer", "", "tiktoken.model file (default: a BPE trained on the embedded corpus).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.")
flags.DEFINE_integer("data_workers", 0, "grain worker processes for tokenisation.")
flags.DEFINE_float("z_loss", 0.0, "z-loss weight.")
flags.DEFINE_integer("max_bad_steps", 5, "A step whose loss or gradient is not finite is not applied (counted and "
                     "logged); this many in a row stop the run, naming the step and the first non-finite gradient.")
flags.DEFINE_integer("lora_rank", 0, "LoRA: train rank-R adapters over the frozen --init_from base instead of every "
                     "weight (0: full fine-tuning). Checkpoints hold the adapters, their optimizer state and a "
                     "reference (path and hash) to the base. Adapters are trained with AdamW.")
flags.DEFINE_float("lora_alpha", 0.0, "LoRA: the update is scaled by alpha/rank (default 0: alpha = rank, scale 1).")
flags.DEFINE_float("lora_dropout", 0.0, "LoRA: dropout on the adapters' inputs while training (default 0).")
flags.DEFINE_list("lora_targets", ["attn", "dense_mlp", "shared", "experts"], "LoRA: projections that get adapters "
                  "(default all): attn (q_a, q_b, kv_a, kv_b, o), dense_mlp (the dense layers' MLP), shared (the "
                  "shared expert), experts (the routed experts, one adapter per expert).")
flags.DEFINE_enum("base_dtype", "", ["", "bfloat16", "float32", "int8", "fp8"], "LoRA: how the frozen base is held "
                  "(default: the preset's param_dtype): bfloat16, float32, or quantised: int8 (one scale per output "
                  "channel) or fp8 (e4m3, one scale per 128x128 block, the release's format), dequantised as each "
                  "kernel is read (embedding, lm_head, router and norms stay bfloat16). The adapters are float32.")
flags.DEFINE_integer("sample_tokens", 48, "After training, generate this many tokens from the last checkpoint (0: none).")
flags.DEFINE_string("sample_prompt", "def main():\n", "Prompt of that sample (healed: see k2jax-generate --heal).")
flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache: a resumed or restarted run "
                    "loads its compiled step from it instead of compiling again (default: $JAX_COMPILATION_CACHE_DIR "
                    "if set, else WORKDIR/compile_cache; 'none': off).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected on TPU pods and SLURM).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process runs (implies --distributed).")
flags.DEFINE_integer("num_processes", 1, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", 0, "This process's index (with --coordinator_address).")


def init_distributed():
    """jax.distributed from flags (explicit coordinator) or the environment; no-op otherwise.

    --distributed on a Cloud TPU VM or GKE lets JAX find its peers from the TPU metadata. On CPU hosts
    (JAX_PLATFORMS=cpu: a simulated pod, or a CPU cluster) it reads the same facts from TPU_WORKER_HOSTNAMES
    and TPU_WORKER_ID, with the coordinator on the first host at K2JAX_COORDINATOR_PORT (default 8476)."""
    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        hosts, worker = os.environ.get("TPU_WORKER_HOSTNAMES"), os.environ.get("TPU_WORKER_ID")
        if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu" and hosts and worker is not None:
            names = hosts.split(",")
            port = os.environ.get("K2JAX_COORDINATOR_PORT", "8476")
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(f"{names[0]}:{port}", num_processes=len(names), process_id=int(worker))
        else:
            jax.distributed.initialize()


def init_settings():
    """(architecture of --init_from, execution): --set may only change execution settings, and a --config given
    explicitly must describe the same architecture (the first disagreeing field is named)."""
    import dataclasses

    from k2jax.errors import ConfigError
    from k2jax.model.config import K2Config, configure, load_preset, parse_assignments
    from k2jax.train.resume import architecture_of

    from k2jax.errors import CheckpointError

    try:
        arch = architecture_of(FLAGS.init_from)
    except CheckpointError as e:
        raise CheckpointError(f"--init_from={FLAGS.init_from}: {e}") from None
    sets = parse_assignments(FLAGS.set)
    fields = [f.name for f in dataclasses.fields(K2Config)]
    for key in sets:
        if key in fields:
            raise ConfigError(f"--set {key}=...: an architecture field; with --init_from the architecture comes "
                              f"from {FLAGS.init_from} (--set may change execution settings only)")
    if not FLAGS["config"].present:
        return configure(arch, None, sets)
    given, execution = load_preset(FLAGS.config, **sets)
    for name in fields:
        if getattr(given, name) != getattr(arch, name):
            raise ConfigError(f"--config={FLAGS.config} disagrees with --init_from={FLAGS.init_from} on config field "
                              f"'{name}': {getattr(given, name)!r} vs {getattr(arch, name)!r}")
    return arch, execution


def lora_from_flags():
    """The LoraConfig of --lora_* (None without --lora_rank); LoRA flags without --lora_rank are refused."""
    from k2jax.errors import ConfigError
    from k2jax.model.layers.lora import LoraConfig

    if FLAGS.lora_rank == 0:
        given = [f"--{n}" for n in ("lora_alpha", "lora_dropout", "lora_targets", "base_dtype") if FLAGS[n].present]
        if given:
            raise ConfigError(f"{given[0]} applies to LoRA runs only: add --lora_rank=R")
        return None
    return LoraConfig(rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha, dropout=FLAGS.lora_dropout,
                      targets=tuple(t.strip() for t in FLAGS.lora_targets))


def main(argv):
    del argv
    init_distributed()
    import k2jax
    from k2jax import storage
    from k2jax.model.config import override, parse_assignments
    from k2jax.train.loop import RunConfig, train

    config, execution = config_from_flags(FLAGS.config, FLAGS.set) if not FLAGS.init_from else init_settings()
    opt_sets = parse_assignments(FLAGS.opt, "--opt")
    lora = lora_from_flags()
    if lora is not None:
        opt_sets.setdefault("optimizer", "adamw")
        if FLAGS.base_dtype:
            quantised = FLAGS.base_dtype in ("int8", "fp8")
            execution = execution.replace(param_dtype="bfloat16" if quantised else FLAGS.base_dtype)
    # --opt learning_rate=... wins over --lr; min_learning_rate follows whichever was given unless set itself
    optim = override(OptimConfig(learning_rate=FLAGS.lr, warmup_steps=FLAGS.warmup, total_steps=FLAGS.steps), opt_sets)
    mesh = k2jax.make_mesh(FLAGS.mesh)
    run = RunConfig(workdir=FLAGS.workdir, steps=FLAGS.steps, batch=FLAGS.batch, seq=FLAGS.seq,
                    microbatches=FLAGS.microbatches, save_every=FLAGS.save_every, keep=FLAGS.keep,
                    log_every=FLAGS.log_every, data=FLAGS.data, text_field=FLAGS.text_field,
                    on_missing_text=FLAGS.on_missing_text, tokenizer=FLAGS.tokenizer, seed=FLAGS.seed,
                    data_workers=FLAGS.data_workers, z_loss=FLAGS.z_loss, data_format=FLAGS.data_format,
                    on_long=FLAGS.on_long, on_bad=FLAGS.on_bad, eval_data=FLAGS.eval_data,
                    eval_every=FLAGS.eval_every, init_from=FLAGS.init_from, max_bad_steps=FLAGS.max_bad_steps,
                    chat_template=FLAGS.chat_template, lora=lora, base_quant=FLAGS.base_dtype if FLAGS.base_dtype in ("int8", "fp8") else "")
    # after the flags above are checked, so a bad one leaves no directory behind; before anything compiles
    use_compilation_cache(FLAGS.compilation_cache_dir, storage.join(FLAGS.workdir, "compile_cache"))
    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    result = train(config, optim, run, mesh, log=log, execution=execution)
    if result.get("preempted"):
        return 0
    if FLAGS.sample_tokens > 0 and jax.process_index() == 0 and jax.process_count() == 1:
        from k2jax.train.loop import resolve_data

        from k2jax.cli.stream import stream_one

        model = k2jax.load(FLAGS.workdir, mesh=mesh).attach_tokenizer(resolve_data(run)[1])
        print(f"sample from {FLAGS.workdir} (step {result['final_step']}), prompt {FLAGS.sample_prompt!r}:")
        print(FLAGS.sample_prompt, end="", flush=True)
        stream_one(model, model.tokenizer.encode(FLAGS.sample_prompt),
                   dict(max_new_tokens=FLAGS.sample_tokens, temperature=0.6, top_p=0.95, seed=FLAGS.seed), heal=True)
        print()
        if not FLAGS.data and FLAGS.data_format == "text":  # the embedded corpus: score the text that follows it
            from k2jax.data.corpus import heldout_text
            from k2jax.inference.bits import model_bits_per_byte, unigram_bits_per_byte

            text = heldout_text()
            ours = model_bits_per_byte(model, text, seq=min(FLAGS.seq, model.config.max_position_embeddings))
            base = unigram_bits_per_byte(model.tokenizer, resolve_data(run)[0], text)
            print(f"held-out: {ours:.3f} bits per byte on {len(text.encode()):,} bytes of stdlib text the run never saw")
            print(f"baseline: {base:.3f} bits per byte for a unigram model of the same tokenizer (token frequencies)")
    return 0


def run():
    run_main(main, host_malloc=True)


if __name__ == "__main__":
    sys.exit(run())
