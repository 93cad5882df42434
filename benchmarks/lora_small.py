"""LoRA vs full fine-tuning of configs/small.py on this CPU: step time, peak RSS and the compiled step's
memory_analysis, side by side in one run.

    python benchmarks/lora_small.py [--rank 16 --targets attn,dense_mlp,shared,experts --base_dtype bfloat16]
                                    [--batch 4 --seq 256 --steps 6] [--set moe_block_size=128]

Both start from the same random weights (the preset's own, float32 unless --set says otherwise); each runs in a
process of its own (peak RSS is the process's), `--warmup` untimed steps then `--steps` timed ones, compared by
their medians. Full fine-tuning uses AdamW, as LoRA does, so the difference is what freezing the base and
training adapters changes: no base-weight gradients, no optimizer state for the base. The machine's peak float32
GEMM rate and read bandwidth are measured first.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np


def run_one(args, mode: str) -> dict:
    import jax

    import k2jax
    from k2jax.model.config import load_preset, parse_assignments
    from k2jax.model.init import init_model
    from k2jax.model.layers.lora import LoraConfig
    from k2jax.train.optim import OptimConfig
    from k2jax.train.step import LossConfig, Trainer, analytic_train_flops
    from machine import timed

    config, run = load_preset(args.config, **parse_assignments(args.set))
    mesh = k2jax.make_mesh("", devices=jax.devices()[:1])
    lora = LoraConfig(rank=args.rank, targets=tuple(args.targets.split(","))) if mode == "lora" else None
    quant = args.base_dtype if mode == "lora" and args.base_dtype in ("int8", "fp8") else ""
    if mode == "lora" and args.base_dtype == "bfloat16":
        run = run.replace(param_dtype="bfloat16")
    _, base = init_model(config, mesh, execution=run, seed=0)
    trainer = Trainer(config, OptimConfig(optimizer="adamw", learning_rate=1e-4, warmup_steps=1), mesh,
                      loss=LossConfig(aux_loss_alpha=0.0), execution=run, lora=lora, base_quant=quant)
    state = trainer.init_state(model_state=base)
    del base
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = {"tokens": jax.device_put(tokens, trainer.batch_sharding)}
    mem = trainer.lower(state, batch).compile().memory_analysis()
    box = [state]

    def step():
        box[0], m = trainer.step(box[0], batch)
        jax.block_until_ready(m)

    times = timed(step, args.steps, warmup=args.warmup)
    trained = sum(x.size for x in jax.tree.leaves(box[0].params))
    return {"times": times, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "args_mib": mem.argument_size_in_bytes / 2**20, "temp_mib": mem.temp_size_in_bytes / 2**20,
            "out_mib": mem.output_size_in_bytes / 2**20, "alias_mib": mem.alias_size_in_bytes / 2**20,
            "trained": trained, "flops": analytic_train_flops(config, args.batch * args.seq, args.seq, lora=lora),
            "opt_mib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(box[0].opt_state)) / 2**20}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="attn,dense_mlp,shared,experts")
    p.add_argument("--base_dtype", default="float32", choices=("float32", "bfloat16", "int8", "fp8"),
                   help="LoRA's frozen base (full fine-tuning keeps the preset's float32)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--only", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = p.parse_args()
    from k2jax.runtime import quiet_platforms

    quiet_platforms()  # a CPU host with libtpu installed: no TPU initialisation noise
    if args.only:
        print("RESULT " + json.dumps(run_one(args, args.only)))
        return

    import jax

    from machine import describe, peak_gemm_rate, read_rate

    peak, bandwidth = peak_gemm_rate(), read_rate()
    results = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, os.path.abspath(__file__), "--only", mode] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{mode} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1][len("RESULT "):])
    print(f"config {args.config}, batch {args.batch} x {args.seq}, LoRA rank {args.rank} on {args.targets}, "
          f"LoRA base {args.base_dtype}, overrides: {' '.join(args.set) or 'none'}")
    print(describe(jax))
    print(f"this machine: peak float32 GEMM {peak / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'':22s} {'step s':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'trained':>12s} {'opt state':>10s} "
          f"{'args':>9s} {'temps':>9s} {'outputs':>9s} {'peak RSS':>9s}")
    n = args.batch * args.seq
    for mode, label in (("full", "full fine-tuning"), ("lora", "LoRA")):
        r = results[mode]
        t = float(np.median(r["times"]))
        print(f"{label:22s} {t:8.2f} {n / t:9,.0f} {r['flops'] / t / 1e9:8.1f} {r['trained']:12,d} "
              f"{r['opt_mib']:8.1f}Mi {r['args_mib']:7.1f}Mi {r['temp_mib']:7.1f}Mi {r['out_mib']:7.1f}Mi "
              f"{r['rss_gib']:7.2f}Gi")
    f, lo = results["full"], results["lora"]
    print(f"LoRA / full: step time {np.median(lo['times']) / np.median(f['times']):.2f}x, compiled arguments+temps "
          f"{(lo['args_mib'] + lo['temp_mib']) / (f['args_mib'] + f['temp_mib']):.2f}x, peak RSS "
          f"{lo['rss_gib'] / f['rss_gib']:.2f}x (analytic FLOPs: full 6·active·tokens, LoRA 4·active·tokens + "
          "6·active adapters·tokens)")


if __name__ == "__main__":
    main()
