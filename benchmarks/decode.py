"""Decode tokens/s of configs/small.py at batch 1 and 8: k2jax vs transformers generate (same weights), and
the bytes of weights + cache read per token over the host's memory bandwidth (a large numpy copy).

    python benchmarks/decode.py [--new 32 --prompt 64 --batches 1,8 --repeat 3 --set moe_impl=gather] [--malloc host]

Both run in this one process, timed over the whole `generate` (prefill + new tokens), the median of `--repeat` calls. `--malloc host` re-executes
with k2jax.runtime.HOST_MALLOC_ENV first (the glibc settings `k2jax-generate` runs with on a CPU host), which then
apply to transformers as well.

Bytes per decode step: every weight a step reads once (shared by the batch): attention, dense and shared MLPs,
router, lm_head, one embedding row per sequence, and per MoE layer the distinct routed experts the batch picks,
E·(1 - (1 - k/E)^b) of them under balanced routing (k at batch 1); plus each sequence's cache. With the machine's
streaming read rate and peak GEMM rate (both measured here) that gives a lower bound on the time of any
implementation, hence the largest ratio to transformers this machine allows.
"""

import argparse
import tempfile

import numpy as np



def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--set", action="append", default=[], help="config override key=value, e.g. moe_impl=gather")
    p.add_argument("--malloc", choices=("default", "host"), default="default")
    p.add_argument("--repeat", type=int, default=3, help="timed generate calls per framework (median)")
    args = p.parse_args()
    if args.malloc == "host":
        from k2jax.runtime import reexec_with_host_malloc

        reexec_with_host_malloc()
    import jax
    import torch

    import k2jax
    from k2jax.model.config import parse_assignments
    from k2jax.runtime import HOST_MALLOC_ENV
    from k2jax.testing.reference import build_hf_model
    from machine import describe, peak_gemm_rate, read_rate, timed

    c = k2jax.load_config(args.config)
    malloc = "host (" + " ".join(f"{k}={v}" for k, v in HOST_MALLOC_ENV.items()) + ")"
    print(f"config {args.config}, prompts of {args.prompt} tokens, {args.new} new, malloc "
          f"{malloc if args.malloc == 'host' else 'default'}, overrides: {' '.join(args.set) or 'none'}")
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_hf_model(c, d)
        model = k2jax.load_hf(d, **parse_assignments(args.set))
    print(describe(jax, torch))

    read_bw, peak = read_rate(), peak_gemm_rate()
    print(f"machine: reads {read_bw / 1e9:.1f} GB/s (matvec), peak GEMM {peak / 1e9:.0f} GFLOP/s (float32)")

    _, active = k2jax.param_count(c)
    vd = c.vocab_size * c.hidden_size
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    fixed = active - vd - n_moe * c.num_experts_per_tok * expert  # every weight but the embedding and the experts
    rng = np.random.default_rng(0)
    for batch in map(int, args.batches.split(",")):
        prompts = [rng.integers(0, c.vocab_size - 300, args.prompt).tolist() for _ in range(batch)]
        model.generate(prompts, max_new_tokens=args.new, stop=[])  # compile
        jax_s = float(np.median(timed(lambda: model.generate(prompts, max_new_tokens=args.new, stop=[]), args.repeat,
                                      warmup=0)))
        ids = torch.tensor(prompts)
        torch_model.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2, pad_token_id=0)
        torch_s = float(np.median(timed(lambda: torch_model.generate(
            ids, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0), args.repeat,
            warmup=0)))
        ctx = args.prompt + args.new // 2
        cache = c.num_hidden_layers * ctx * (c.kv_lora_rank + c.qk_rope_head_dim) * 4 * batch
        distinct = c.n_routed_experts * (1 - (1 - c.num_experts_per_tok / c.n_routed_experts) ** batch)
        step_bytes = 4 * (fixed + batch * c.hidden_size + n_moe * distinct * expert) + cache
        # a lower bound on any implementation's time: the prefill's matmul FLOPs at the peak GEMM rate (attention
        # left out), then new - 1 decode steps each reading step_bytes at the streaming read rate
        prefill_flops = 2 * batch * args.prompt * (active - 2 * vd) + 2 * batch * vd
        bound_s = prefill_flops / peak + (args.new - 1) * step_bytes / read_bw
        print(f"batch {batch}: k2jax {batch * args.new / jax_s:7.1f} tok/s, transformers "
              f"{batch * args.new / torch_s:7.1f} tok/s, ratio {torch_s / jax_s:.2f}x; {step_bytes / 1e6:.0f} MB "
              f"read per decode step; the machine's bound: >= {bound_s:.3f} s for this request, i.e. at most "
              f"{torch_s / bound_s:.1f}x transformers (k2jax: {jax_s:.3f} s, {bound_s / jax_s:.0%} of that limit)")


if __name__ == "__main__":
    main()
