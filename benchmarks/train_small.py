"""Train-step tokens/s of configs/small.py: k2jax (jit, AdamW) vs a plain PyTorch AdamW step of the HF
reference model on the same weights and batch, and the analytic 6·active·tokens + attention rate.

    python benchmarks/train_small.py [--batch 4 --seq 256 --steps 3 --set moe_block_size=128]

The compiled step's FLOPs come from 2- and 3-layer builds with every loop unrolled (XLA's cost analysis
counts a loop body once), extrapolated to the preset's depth, against 6·active·tokens + causal attention.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", action="append", default=["moe_block_size=128"], help="config override key=value")
    p.add_argument("--vocab_chunk", type=int, default=0, help="0: the whole vocabulary in one chunk")
    p.add_argument("--no_flops", action="store_true")
    args = p.parse_args()

    import jax
    import torch

    import k2jax
    from conftest import build_hf_model
    from k2jax.optim import OptimConfig
    from k2jax.train import LossConfig, Trainer, analytic_train_flops

    from k2jax.config import override

    config = override(k2jax.load_config(args.config), dict(kv.split("=", 1) for kv in args.set))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_hf_model(config, d)
        model = k2jax.load_hf(d, **{k: getattr(config, k) for k in dict(kv.split("=", 1) for kv in args.set)})
    optim = OptimConfig(optimizer="adamw", learning_rate=1e-4, warmup_steps=1)
    loss_cfg = LossConfig(aux_loss_alpha=0.0, vocab_chunk=args.vocab_chunk or config.vocab_size)
    trainer = Trainer(config, optim, model.mesh, loss=loss_cfg)
    state = trainer.init_state(model_state=model.state)
    flops = analytic_train_flops(config, tokens.size, args.seq)
    state, m = trainer.step(state, batch)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = trainer.step(state, batch)
    jax.block_until_ready(m)
    jax_s = (time.perf_counter() - t0) / args.steps

    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(tokens.astype(np.int64))
    torch_model.train()

    def torch_step():
        opt.zero_grad()
        torch_model(ids, labels=ids).loss.backward()
        opt.step()

    torch_step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        torch_step()
    torch_s = (time.perf_counter() - t0) / args.steps
    n = tokens.size
    print(f"config {args.config}, batch {args.batch} x {args.seq}")
    print(f"k2jax train step:   {n / jax_s:8,.0f} tokens/s ({jax_s:.2f} s)")
    print(f"PyTorch train step: {n / torch_s:8,.0f} tokens/s ({torch_s:.2f} s)")
    print(f"ratio k2jax / PyTorch = {torch_s / jax_s:.2f}x")
    print(f"analytic FLOPs/step {flops:.4e} -> k2jax {flops / jax_s / 1e9:.1f} GFLOP/s")
    if args.no_flops:
        return
    counted = {}
    for n in (2, 3):
        small = config.replace(num_hidden_layers=n, scan_layers=False, moe_block_unroll=0)
        tr = Trainer(small, optim, model.mesh, loss=loss_cfg)
        cost = tr.lower(tr.abstract_state(), {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
                        ).compile().cost_analysis()
        counted[n] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    compiled = counted[3] + (config.num_hidden_layers - 3) * (counted[3] - counted[2])
    print(f"compiled FLOPs/step {compiled:.4e} (2-/3-layer unrolled builds, extrapolated) = "
          f"{compiled / flops:.3f} x the analytic count")


if __name__ == "__main__":
    main()
