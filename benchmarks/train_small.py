"""Train-step tokens/s of configs/small.py: k2jax (jit, AdamW) vs a plain PyTorch AdamW step of the HF
reference model on the same weights and batch, and the analytic 6·active·tokens + attention rate.

    python benchmarks/train_small.py [--batch 4 --seq 256 --steps 8 --set moe_block_size=128] [--malloc host]

The HF checkpoint is written once; each framework then runs in a process of its own (the other one neither
imported nor holding memory), `--warmup` untimed steps and then `--steps` timed steps, compared by their medians.
Three warm-up steps by default: a process's first steps fault its working set in (k2jax's first two timed steps
after a single warm-up took ~9 s against ~5 s, with 536k minor page faults each, ~7 µs per fault on this VM),
which a training run pays once; the page faults of every timed step are printed.
`--malloc host` runs both processes with k2jax.runtime.HOST_MALLOC_ENV (the glibc settings `k2jax-train` uses on
CPU); `default` keeps the environment's own.

The machine's peak float32 GEMM rate (an lm_head-sized matmul) is measured first: the analytic count over it
is a lower bound on any implementation's step time.

The compiled step's FLOPs come from 2- and 3-layer builds with every loop unrolled (XLA's cost analysis
counts a loop body once), extrapolated to the preset's depth, against 6·active·tokens + causal attention.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np



def _batch(config, args):
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}


def _time(step, n, warmup):
    """{"times", "faults"}: wall seconds and minor page faults of n timed steps after `warmup` untimed ones (the
    first compiles k2jax)."""
    import resource

    from machine import timed

    faults = []

    def counted():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    for _ in range(warmup):
        step()
    return {"times": timed(counted, n, warmup=0), "faults": faults}


def run_k2jax(config, sets, args):
    import jax

    import k2jax
    from k2jax.aot import by_depth, extrapolate
    from k2jax.train.optim import OptimConfig
    from k2jax.train.step import LossConfig, Trainer

    batch = _batch(config, args)
    model = k2jax.load_hf(args.hf_dir, **sets)
    optim = OptimConfig(optimizer="adamw", learning_rate=1e-4, warmup_steps=1)
    loss_cfg = LossConfig(aux_loss_alpha=0.0, vocab_chunk=args.vocab_chunk or config.vocab_size)
    trainer = Trainer(config, optim, model.mesh, loss=loss_cfg, execution=model.execution)
    box = [trainer.init_state(model_state=model.state)]
    del model

    def step():
        box[0], m = trainer.step(box[0], batch)
        jax.block_until_ready(m)

    out = _time(step, args.steps, args.warmup)
    if not args.no_flops:
        def flops(small, run):
            tr = Trainer(small, optim, trainer.mesh, loss=loss_cfg, execution=run)
            cost = tr.lower(tr.abstract_state(), {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
                            ).compile().cost_analysis()
            return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

        out["compiled_flops"] = extrapolate(by_depth(config, trainer.execution, flops), config.num_hidden_layers)
    return out


def run_torch(config, args):
    import torch
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32)
    ids = torch.from_numpy(_batch(config, args)["tokens"].astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def step():
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()

    return _time(step, args.steps, args.warmup)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, first-touch faults)")
    p.add_argument("--malloc", choices=("default", "host"), default="default")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--vocab_chunk", type=int, default=0, help="0: the whole vocabulary in one chunk")
    p.add_argument("--no_flops", action="store_true")
    p.add_argument("--only", choices=("k2jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    args = p.parse_args()

    from k2jax.model.config import load_preset, parse_assignments
    from k2jax.runtime import HOST_MALLOC_ENV

    sets = parse_assignments(args.set)
    config, _ = load_preset(args.config, **sets)
    if args.only:
        result = run_k2jax(config, sets, args) if args.only == "k2jax" else run_torch(config, args)
        print("RESULT " + json.dumps(result))
        return

    import jax
    import torch

    from k2jax.testing.reference import build_hf_model
    from k2jax.train.step import analytic_train_flops
    from machine import describe, peak_gemm_rate

    peak = peak_gemm_rate()  # measured before either framework's process starts
    env = {**os.environ, **HOST_MALLOC_ENV} if args.malloc == "host" else dict(os.environ)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        build_hf_model(config, d)
        for fw in ("k2jax", "torch"):
            cmd = [sys.executable, os.path.abspath(__file__), "--only", fw, "--hf_dir", d, "--config", args.config,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup),
                   "--vocab_chunk", str(args.vocab_chunk)] + [f"--set={kv}" for kv in args.set] + (
                      ["--no_flops"] if args.no_flops else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{fw} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
            results[fw] = json.loads(lines[-1][len("RESULT "):])
    jax_s, torch_s = (float(np.median(results[f]["times"])) for f in ("k2jax", "torch"))
    n = args.batch * args.seq
    flops = analytic_train_flops(config, n, args.seq)
    fmt = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    malloc = "host (" + " ".join(f"{k}={v}" for k, v in HOST_MALLOC_ENV.items()) + ")" if args.malloc == "host" else "default"
    print(f"config {args.config}, batch {args.batch} x {args.seq}, overrides: {' '.join(args.set) or 'none'}, "
          f"malloc {malloc}")
    print(describe(jax, torch))
    for fw, label, t in (("k2jax", "k2jax train step:  ", jax_s), ("torch", "PyTorch train step:", torch_s)):
        r = results[fw]
        print(f"{label} {n / t:8,.0f} tokens/s (median {t:.2f} s of {fmt(r['times'])}; minor page faults per step "
              f"{' '.join(str(f) for f in r['faults'])})")
    print(f"ratio k2jax / PyTorch = {torch_s / jax_s:.2f}x")
    print(f"analytic FLOPs/step {flops:.4e} -> k2jax {flops / jax_s / 1e9:.1f} GFLOP/s, PyTorch "
          f"{flops / torch_s / 1e9:.1f}; 2x PyTorch needs {2 * flops / torch_s / 1e9:.0f} GFLOP/s, this machine's "
          f"peak float32 GEMM (lm_head-sized, [1024, 768] x [768, 32768]) is {peak / 1e9:.0f} GFLOP/s")
    if "compiled_flops" in results["k2jax"]:
        compiled = results["k2jax"]["compiled_flops"]
        print(f"compiled FLOPs/step {compiled:.4e} (2-/3-layer unrolled builds, extrapolated) = "
              f"{compiled / flops:.3f} x the analytic count")


if __name__ == "__main__":
    main()
