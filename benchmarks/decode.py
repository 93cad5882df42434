"""Decode tokens/s of configs/small.py at batch 1 and 8: k2jax vs transformers generate (same weights), and
the bytes of weights + cache read per token over the host's memory bandwidth (a large numpy copy).

    python benchmarks/decode.py [--new 32 --prompt 64 --batches 1,8 --set moe_impl=blocks]
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
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--set", action="append", default=[], help="config override key=value, e.g. moe_impl=blocks")
    args = p.parse_args()
    import torch

    import k2jax
    from conftest import build_hf_model
    from k2jax.config import override

    config = k2jax.load_config(args.config)
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_hf_model(config, d)
        sets = dict(kv.split("=", 1) for kv in args.set)
        typed = override(config, sets)
        model = k2jax.load_hf(d, **{k: getattr(typed, k) for k in sets})
    a, b = np.ones(256 * 2**20 // 8), np.zeros(256 * 2**20 // 8)
    np.copyto(b, a)  # pages touched before timing
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(b, a)
    bandwidth = 2 * a.nbytes * 5 / (time.perf_counter() - t0)  # bytes read + written per second
    del a, b
    total, active = k2jax.param_count(config)
    rng = np.random.default_rng(0)
    for batch in map(int, args.batches.split(",")):
        prompts = [rng.integers(0, config.vocab_size - 300, args.prompt).tolist() for _ in range(batch)]
        model.generate(prompts, max_new_tokens=args.new, stop=[])  # compile
        t0 = time.perf_counter()
        model.generate(prompts, max_new_tokens=args.new, stop=[])
        jax_s = time.perf_counter() - t0
        ids = torch.tensor(prompts)
        torch_model.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2, pad_token_id=0)
        t0 = time.perf_counter()
        torch_model.generate(ids, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)
        torch_s = time.perf_counter() - t0
        # per decode step: every active weight read once per step (shared by the batch) + the cache of each row
        ctx = args.prompt + args.new // 2
        cache = config.num_hidden_layers * ctx * (config.kv_lora_rank + config.qk_rope_head_dim) * 4 * batch
        step_bytes = active * 4 + cache
        per_tok = jax_s / args.new
        print(f"batch {batch}: k2jax {batch * args.new / jax_s:7.1f} tok/s, transformers "
              f"{batch * args.new / torch_s:7.1f} tok/s, ratio {torch_s / jax_s:.2f}x; "
              f"{step_bytes / per_tok / 1e9:.2f} GB/s of weights+cache = {step_bytes / per_tok / bandwidth:.0%} of "
              f"the measured {bandwidth / 1e9:.1f} GB/s copy bandwidth")


if __name__ == "__main__":
    main()
