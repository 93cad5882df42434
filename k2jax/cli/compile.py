"""k2jax-compile: AOT-compile the K2 train or decode step for a TPU topology from this host, with a verdict."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; run nothing
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402

from k2jax.cli.common import config_from_flags, run_main  # noqa: E402
from k2jax.model.cache import CACHE_DTYPES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "kimi_k2", "Preset name, preset file or HF config.json.")
flags.DEFINE_string("topology", "v5p-512", "Cloud TPU name: v4-N, v5e-N, v5p-N, v6e-N.")
flags.DEFINE_string("mesh", "", "Mesh spec, e.g. fsdp=64,expert=8 (default: all chips on fsdp).")
flags.DEFINE_enum("mode", "train", ["train", "finetune", "decode", "prefill"], "Which step to compile: train (every weight, "
                  "MuonClip), finetune (LoRA adapters over a frozen base: --lora_rank, --base_dtype), decode, prefill (one "
                  "--prefill_chunk of a --context-token prompt).")
flags.DEFINE_integer("lora_rank", 16, "finetune: adapter rank.")
flags.DEFINE_list("lora_targets", ["attn", "dense_mlp", "shared", "experts"], "finetune: adapted projections.")
flags.DEFINE_enum("base_dtype", "bfloat16", ["bfloat16", "int8", "fp8"], "finetune: how the frozen base is held.")
flags.DEFINE_integer("batch", 0, "Global batch in sequences (train; default 1 per chip) or decode batch (default 1).")
flags.DEFINE_integer("seq", 4096, "Train sequence length.")
flags.DEFINE_integer("context", 32768, "Decode cache length (prefill: the prompt's length).")
flags.DEFINE_integer("prefill_chunk", 2048, "prefill: tokens per chunk (the step compiled is one chunk against the "
                     "cache).")
flags.DEFINE_integer("microbatches", 1, "Gradient accumulation microbatches (train).")
flags.DEFINE_enum("cache_dtype", "bfloat16", list(CACHE_DTYPES), "Decode cache dtype.")
flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable): execution (e.g. param_dtype=bfloat16) "
                          "or architecture fields.")
flags.DEFINE_enum("grad_accum_dtype", "param", ["param", "float32"],
                  "Gradient sums over --microbatches: in the parameters' dtype or float32.")
flags.DEFINE_integer("flops_batch", 0, "Sequences in the 2- and 3-layer builds that count FLOPs (train; default one "
                     "per batch shard), scaled to the batch.")
flags.DEFINE_bool("cost", True, "train/finetune: also count FLOPs and estimate the step time (2- and 3-layer "
                  "unrolled builds, slow for large batches); --nocost gives the memory verdict alone.")
flags.DEFINE_bool("search", False, "Try a short list of meshes and remat policies; print a ranked table.")


def main(argv):
    del argv
    from k2jax import aot

    config, execution = config_from_flags(FLAGS.config, FLAGS.set)
    lora, quant = None, ""
    if FLAGS.mode == "finetune":
        from k2jax.model.layers.lora import LoraConfig

        lora = LoraConfig(rank=FLAGS.lora_rank, targets=tuple(FLAGS.lora_targets))
        quant = FLAGS.base_dtype if FLAGS.base_dtype in ("int8", "fp8") else ""
        execution = execution.replace(param_dtype="bfloat16")  # the base's non-quantised parts (adapters: float32)
        print(f"finetune: LoRA rank {lora.rank} on {','.join(lora.targets)}, base held as {FLAGS.base_dtype}")
    chip, chips, topo = aot.parse_topology(FLAGS.topology)
    print(f"{FLAGS.topology}: {chips} x {chip.family} chips ({topo}), {chip.hbm_bytes / aot.GiB:.2f} GiB HBM each")

    def one(mesh, run):
        aot.check_mesh(mesh, chips)
        if FLAGS.mode in ("train", "finetune"):
            return aot.compile_train(config, FLAGS.topology, mesh, batch=FLAGS.batch or chips, seq=FLAGS.seq,
                                     microbatches=FLAGS.microbatches, flops_batch=FLAGS.flops_batch or None,
                                     grad_accum_dtype=FLAGS.grad_accum_dtype, execution=run, lora=lora,
                                     base_quant=quant, cost=FLAGS.cost,
                                     progress=lambda line: print(f"  ({line})", file=sys.stderr, flush=True))
        return aot.compile_decode(config, FLAGS.topology, mesh, batch=FLAGS.batch or 1, context=FLAGS.context,
                                  cache_dtype=FLAGS.cache_dtype, execution=run,
                                  prefill_chunk=FLAGS.prefill_chunk if FLAGS.mode == "prefill" else 0)

    if not FLAGS.search:
        mesh = FLAGS.mesh or f"fsdp={chips}"
        try:
            report = one(mesh, execution)
        except aot.DoesNotFit as e:
            print(f"{FLAGS.mode} step on {FLAGS.topology}, mesh {mesh}: DOES NOT FIT: the compiler needs "
                  f"{e.required / aot.GiB:.2f} GiB per chip {e.what}, {e.available / aot.GiB:.2f} GiB "
                  f"available: short by at least {(e.required - e.available) / aot.GiB:.2f} GiB")
            return 1
        print("\n".join(report.lines(chip.peak_flops)))
        return 0 if report.fits else 1
    rows = []
    remats = ("full", "save_moe", "dots_no_batch") if FLAGS.mode != "decode" else (execution.remat_policy,)
    for mesh in aot.candidate_meshes(chips, config):
        for remat in remats:
            try:
                r = one(mesh, execution.replace(remat_policy=remat))
                rows.append((mesh, remat, r.fits, r.total_bytes / aot.GiB, r.seconds, r.mfu(chip.peak_flops), ""))
            except aot.DoesNotFit as e:
                rows.append((mesh, remat, False, e.required / aot.GiB, float("inf"), 0.0, e.what.replace("of ", "")))
            except Exception as e:  # a layout the compiler rejects is a row of the table, not the end of the search
                rows.append((mesh, remat, False, float("nan"), float("inf"), 0.0, str(e).splitlines()[0][:60]))
            print(f"  tried {mesh} remat={remat}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (not r[2], r[4]))
    print(f"{'mesh':32s} {'remat':14s} {'fits':5s} {'GiB/chip':>9s} {'step s':>8s} {'MFU':>6s}")
    for mesh, remat, fits, gib, secs, mfu, err in rows:
        print(f"{mesh:32s} {remat:14s} {'yes' if fits else 'no':5s} {gib:9.2f} {secs:8.3f} {mfu:6.1%} {err}")
    return 0 if rows and rows[0][2] else 1


def run():
    run_main(main)


if __name__ == "__main__":
    sys.exit(run())
