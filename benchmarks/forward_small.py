"""Forward tokens/s of configs/small.py: k2jax (jit, CPU) vs HF transformers (PyTorch eager, CPU), same weights.

    python benchmarks/forward_small.py [--batch 4 --seq 512 --repeats 3]
"""

import argparse
import os
import tempfile
import time

import numpy as np



def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import torch

    import k2jax
    from k2jax.testing.reference import build_hf_model, hf_logits
    from machine import describe

    config = k2jax.load_config(args.config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_hf_model(config, d)
        model = k2jax.load_hf(d)
    n = args.batch * args.seq

    out = np.asarray(model.logits(tokens))  # compile
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(model.logits(tokens))
    jax_s = (time.perf_counter() - t0) / args.repeats

    ref = hf_logits(torch_model, tokens)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        hf_logits(torch_model, tokens)
    torch_s = (time.perf_counter() - t0) / args.repeats

    total, active = k2jax.param_count(config)
    print(f"config {args.config}: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active), batch {args.batch} x "
          f"{args.seq} tokens, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    print(describe(jax, torch))
    print(f"max |logits diff| = {np.abs(out - ref).max():.2e}")
    print(f"k2jax:        {n / jax_s:10,.0f} tokens/s ({jax_s:.3f} s/forward)")
    print(f"transformers: {n / torch_s:10,.0f} tokens/s ({torch_s:.3f} s/forward)")
    print(f"ratio k2jax / transformers = {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
