"""What XLA:CPU's own kernels reach on this host for the work the small preset's train step and decode step
are made of, next to the machine's limits (peak float32 GEMM, streaming read) and PyTorch doing the same work.

    python benchmarks/cpu_kernels.py [--skip_torch]

1. One MoE layer of configs/small.py, forward + backward, 1024 tokens (6144 assignments over 64 experts of
   768 x 256): k2jax's expert_ffn with `auto` (64-row blocks on CPU) and with the padding rule's 8-row blocks,
   against a PyTorch loop over experts as in HF's DeepseekV3MoE (rows gathered per expert, autograd).
2. The lm_head + cross-entropy, forward + backward, [1024, 768] x [32768, 768] (three GEMMs).
3. Decoding's reads: a loop reading one expert's kernel [768, 256] at a time from stacked [5, 64, 768, 256]
   kernels (as the `loop` MoE path does; XLA:CPU copies a dynamic slice before a dot), and the lm_head
   [32768, 768] times 1, 2 and 8 rows, as read rates against the streaming read of machine.read_rate().
Each figure is the fastest of several calls.
"""

import argparse

import numpy as np

from machine import peak_gemm_rate, read_rate, timed

T, K, E, D, F, V = 1024, 6, 64, 768, 256, 32768


def best(fn, n=5):
    return min(timed(fn, n))


def moe_inputs():
    r = np.random.default_rng(0)
    x = r.standard_normal((T, D)).astype(np.float32)
    idx = np.stack([r.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    w = r.random((T, K)).astype(np.float32)
    ws = [(r.standard_normal(s) * 0.03).astype(np.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, idx, w, ws


def jax_parts():
    import jax
    import jax.numpy as jnp

    from k2jax.model.layers.grouped import expert_ffn
    from k2jax.train.loss import chunked_cross_entropy

    x, idx, w, ws = (jnp.asarray(a) if not isinstance(a, list) else [jnp.asarray(b) for b in a]
                     for a in moe_inputs())
    out = {}
    for name, impl in (("auto", "auto"), ("blocks (8-row)", "blocks")):
        grad = jax.jit(jax.grad(lambda x, w, wg, wu, wd: jnp.sum(
            expert_ffn(x, idx, w, wg, wu, wd, impl=impl) ** 2), argnums=(0, 1, 2, 3, 4)))
        out[f"moe {name}"] = best(lambda: jax.block_until_ready(grad(x, w, *ws)))
    r = np.random.default_rng(1)
    h = jnp.asarray(r.standard_normal((T, D)), jnp.float32)
    head = jnp.asarray(r.standard_normal((V, D)) * 0.02, jnp.float32)
    tgt, mask = jnp.asarray(r.integers(0, V, T), jnp.int32), jnp.ones((T,), bool)
    lgrad = jax.jit(jax.grad(lambda h, k: chunked_cross_entropy(h, k, tgt, mask, chunk=V)[0], argnums=(0, 1)))
    out["lm_head + loss"] = best(lambda: jax.block_until_ready(lgrad(h, head)))

    stacked = jnp.asarray(r.standard_normal((5, E, D, F)), jnp.float32)
    ids = jnp.asarray(r.integers(0, E, 30), jnp.int32)
    v1 = jnp.asarray(r.standard_normal((1, D)), jnp.float32)

    @jax.jit
    def expert_reads(v, w, ids):
        def body(i, acc):
            return acc + v @ jax.lax.dynamic_index_in_dim(jax.lax.dynamic_index_in_dim(w, i % 5, 0, False), ids[i],
                                                          0, False)
        return jax.lax.fori_loop(0, 30, body, jnp.zeros((1, F), jnp.float32))

    out["expert reads (30)"] = best(lambda: jax.block_until_ready(expert_reads(v1, stacked, ids)), 10)
    mv = jax.jit(lambda x, k: jnp.einsum("nd,vd->nv", x, k))
    for n in (1, 2, 8):
        xs = jnp.asarray(r.standard_normal((n, D)), jnp.float32)
        out[f"lm_head x {n}"] = best(lambda: jax.block_until_ready(mv(xs, head)), 10)
    return out


def torch_parts():
    import torch

    torch.set_num_threads(2)
    x, idx, w, (wg, wu, wd) = moe_inputs()
    x, w = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    # one tensor per expert, as HF's per-expert nn.Linear modules (indexing one [E, d, f] tensor instead would make
    # autograd write a full-size gradient per expert)
    wg, wu, wd = ([torch.from_numpy(a[e].copy()).requires_grad_() for e in range(E)] for a in (wg, wu, wd))
    idx = torch.from_numpy(idx.astype(np.int64))

    def moe():
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                h = x[tok]
                y = (torch.nn.functional.silu(h @ wg[e]) * (h @ wu[e])) @ wd[e] * w[tok, slot, None]
                out = out.index_add(0, tok, y)
        (out ** 2).sum().backward()

    r = np.random.default_rng(1)
    h = torch.from_numpy(r.standard_normal((T, D)).astype(np.float32)).requires_grad_()
    head = torch.from_numpy((r.standard_normal((V, D)) * 0.02).astype(np.float32)).requires_grad_()
    tgt = torch.from_numpy(r.integers(0, V, T))
    return {"moe": best(moe), "lm_head + loss": best(
        lambda: torch.nn.functional.cross_entropy(h @ head.T, tgt, reduction="sum").backward())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip_torch", action="store_true")
    args = p.parse_args()
    peak, bw = peak_gemm_rate(), read_rate()
    j = jax_parts()
    t = {} if args.skip_torch else torch_parts()
    moe_flops, head_flops = 3 * 2 * T * K * 3 * D * F, 3 * 2 * T * D * V
    print(f"machine: peak float32 GEMM {peak / 1e9:.0f} GFLOP/s, streaming read {bw / 1e9:.1f} GB/s")
    print("MoE layer fwd+bwd (1024 tokens, top-6 of 64, ideal FLOPs "
          f"{moe_flops / 1e9:.1f} G): " + ", ".join(
              f"{k[4:]} {s * 1e3:.0f} ms ({moe_flops / s / 1e9:.0f} GFLOP/s)" for k, s in j.items() if k.startswith("moe"))
          + (f", PyTorch per-expert loop {t['moe'] * 1e3:.0f} ms ({moe_flops / t['moe'] / 1e9:.0f})" if t else ""))
    print(f"lm_head + loss fwd+bwd ({head_flops / 1e9:.0f} GFLOP): k2jax {j['lm_head + loss'] * 1e3:.0f} ms "
          f"({head_flops / j['lm_head + loss'] / 1e9:.0f} GFLOP/s)" + (
              f", PyTorch {t['lm_head + loss'] * 1e3:.0f} ms ({head_flops / t['lm_head + loss'] / 1e9:.0f})" if t else ""))
    s = j["expert reads (30)"]
    print(f"expert kernels read one at a time in a loop (XLA:CPU copies each dynamic slice): {30 * D * F * 4 / s / 1e9:.1f}"
          f" GB/s ({s / 30 * 1e3:.3f} ms per 786 KB kernel)")
    print("lm_head [32768, 768] times n rows: " + ", ".join(
        f"n={n} {j[f'lm_head x {n}'] * 1e3:.2f} ms ({V * D * 4 / j[f'lm_head x {n}'] / 1e9:.1f} GB/s)" for n in (1, 2, 8)))


if __name__ == "__main__":
    main()
