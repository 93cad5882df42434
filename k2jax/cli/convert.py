"""k2jax-convert: HF safetensors (official FP8 release, bf16, fp32) <-> k2jax Orbax checkpoints."""

from __future__ import annotations

import os
import sys

from absl import flags

from k2jax.cli.common import run_main
from k2jax.model.config import PARAM_DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF folder to import (config.json + safetensors).")
flags.DEFINE_string("output_dir", None, "Where to write: the k2jax checkpoint (import) or the HF folder (--to_hf).")
flags.DEFINE_enum("dtype", "bfloat16", list(PARAM_DTYPES), "Parameter dtype of the imported checkpoint.")
flags.DEFINE_integer("workers", 4, "Tensors converted in parallel.")
flags.DEFINE_bool("verify", False, "Re-read every written tensor and check shape, dtype and checksum against the source.")
flags.DEFINE_bool("to_hf", False, "Export a k2jax checkpoint (--checkpoint_dir) to HF safetensors.")
flags.DEFINE_string("checkpoint_dir", None, "k2jax checkpoint to export with --to_hf.")
flags.DEFINE_bool("fp8", False, "With --to_hf: re-quantise linear weights to e4m3 with 128x128 block scales.")
flags.DEFINE_bool("merge_lora", False, "With --to_hf and a LoRA run's checkpoint: write its base with the adapters "
                  "merged into the weights (read unit by unit; the base is the one recorded, checked by hash).")
flags.DEFINE_bool("adapter_only", False, "With --to_hf and a LoRA run's checkpoint: write the adapters as a PEFT "
                  "folder (adapter_config.json, adapter_model.safetensors) for peft.PeftModel.from_pretrained "
                  "(targets attn and experts; dense_mlp and shared need --merge_lora).")
flags.DEFINE_string("base", "", "With --merge_lora: the LoRA run's base, when it has moved from the recorded path "
                    "(it must hash the same).")
flags.DEFINE_integer("shard_gb", 5, "With --to_hf: approximate size of each safetensors shard, in GB.")
flags.DEFINE_bool("quiet", False, "No progress line.")


def main(argv):
    del argv
    import jax

    if not os.environ.get("JAX_PLATFORMS"):  # conversion is host work: never bring up an accelerator runtime
        jax.config.update("jax_platforms", "cpu")
    from k2jax.ckpt.convert import export_hf, import_hf

    if not FLAGS.output_dir:
        raise flags.ValidationError("--output_dir is required")
    if (FLAGS.merge_lora or FLAGS.adapter_only or FLAGS.base) and not FLAGS.to_hf:
        raise flags.ValidationError("--merge_lora, --adapter_only and --base go with --to_hf --checkpoint_dir=RUN")
    if FLAGS.to_hf:
        if not FLAGS.checkpoint_dir:
            raise flags.ValidationError("--to_hf needs --checkpoint_dir")
        if FLAGS.adapter_only:
            if FLAGS.merge_lora or FLAGS.fp8:
                raise flags.ValidationError("--adapter_only writes the adapters alone: not with --merge_lora or --fp8")
            from k2jax.ckpt.lora import export_peft

            out = export_peft(FLAGS.checkpoint_dir, FLAGS.output_dir)
        else:
            out = export_hf(FLAGS.checkpoint_dir, FLAGS.output_dir, fp8=FLAGS.fp8,
                            shard_bytes=FLAGS.shard_gb * 2**30, quiet=FLAGS.quiet, merge_lora=FLAGS.merge_lora,
                            base=FLAGS.base)
    else:
        if not FLAGS.hf_dir:
            raise flags.ValidationError("--hf_dir is required (or --to_hf --checkpoint_dir=...)")
        out = import_hf(FLAGS.hf_dir, FLAGS.output_dir, dtype=FLAGS.dtype, workers=FLAGS.workers,
                        verify=FLAGS.verify, quiet=FLAGS.quiet)
    print(f"wrote {out}")
    return 0


def run():
    run_main(main)


if __name__ == "__main__":
    sys.exit(run())
