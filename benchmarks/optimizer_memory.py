"""Per-chip HBM of the MuonClip update alone (gradients in, new params and state out) for full K2, compiled
for a TPU topology from this host: with the per-layer loop (the default for scanned models) or all layers at
once (`--batched`).

    python benchmarks/optimizer_memory.py --topology v5p-256 --mesh fsdp=2,expert=64 [--batched]

Exit status 1 when the update alone does not fit.
"""

import argparse
import os
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="kimi_k2")
    p.add_argument("--topology", default="v5p-256")
    p.add_argument("--mesh", default="fsdp=2,expert=64")
    p.add_argument("--batched", action="store_true", help="all stacked layers in one batched Newton-Schulz")
    args = p.parse_args()
    from k2jax.aot import GiB, DoesNotFit, compile_optimizer, topology_devices
    from k2jax.model.config import load_preset
    from k2jax.train.optim import OptimConfig, make_optimizer
    from k2jax.model.sharding import make_mesh
    from k2jax.train.step import Trainer

    config, run = load_preset(args.config, param_dtype="bfloat16")
    chip, devices = topology_devices(args.topology)
    mesh = make_mesh(args.mesh, devices=devices)
    trainer = Trainer(config, OptimConfig(), mesh, execution=run)
    tx = make_optimizer(OptimConfig(), trainer.abstract_params, config.kv_lora_rank, layer_loop=not args.batched)
    t0 = time.perf_counter()
    how = "all layers at once" if args.batched else "one layer at a time"
    try:
        compiled = compile_optimizer(trainer, tx)
    except DoesNotFit as e:
        print(f"MuonClip update of {args.config} on {args.topology} ({args.mesh}), {how}: DOES NOT FIT: "
              f"{e.required / GiB:.2f} GiB of temporaries per chip, {e.available / GiB:.2f} GiB available")
        return 1
    m = compiled.memory_analysis()
    print(f"MuonClip update of {args.config} on {args.topology} ({args.mesh}), {how}: compiled in "
          f"{time.perf_counter() - t0:.0f}s; per chip: arguments {m.argument_size_in_bytes / GiB:.2f} GiB "
          f"(params, momentum/moments, gradients), temporaries {m.temp_size_in_bytes / GiB:.2f} GiB, outputs "
          f"{m.output_size_in_bytes / GiB:.2f} GiB (aliased {m.alias_size_in_bytes / GiB:.2f}); peak host RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
