"""Dropless grouped expert matmuls: every (token, expert) assignment is computed, none dropped.

Five formulations with the same result:
- "gmm": rows sorted by expert and JAX's Pallas grouped matmul for TPU (megablox gmm/tgmm, layers/megablox.py);
  training's plain kernels only (stacked, quantised or adapted kernels take "blocks"); on other backends it runs
  in Pallas's interpreter (tests);
- "ragged": rows sorted by expert and `jax.lax.ragged_dot` (near the ideal forward on TPU, but the TPU
  compiler costs its weight gradient densely over every expert, and the CPU backend lowers it to dense work
  over every expert);
- "blocks": rows sorted by expert, each expert's group padded to a multiple of a row block, and a loop over
  the blocks, each multiplying by its expert's weights read in place (near-ideal on CPU: padding < 1 block
  per expert, and blocks past the last used one are skipped at run time);
- "loop": one (token, expert) assignment at a time, in expert order, each reading its expert's kernels in
  place. For decode-sized token counts (assignments <= experts) an iteration's working set (one expert's
  3·d·f values) stays in cache, so the chosen experts go through memory once; "auto" picks it on CPU there;
- "gather": every assignment's kernels gathered into one [t, k, d, f] array and multiplied at once (vectorised,
  but that copy goes through memory twice: README, "Dropless grouped matmul", has the decode rates).

Every path takes the kernels either of one layer ([e, d, f]) or stacked over layers ([layers, e, d, f]) with
`layer`, the index of the layer to use: decoding scans over layers and reads each expert in place that way,
where slicing the layer out first would copy all its experts (3·e·d·f values) every step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.model.layers.megablox import gmm_swiglu
from k2jax.model.layers.permute import inverse, take_rows
from k2jax.model.quant import QArray
from k2jax.model.layers.expert_blocks import (ExpertLora, block_swiglu_lora, blocks_forward, kernel, lora_at,
                                              ragged_lora, scan_blocks, swiglu_one)


CPU_MIN_BLOCK = 64  # "auto" on CPU: fewer, larger blocks (see block_size_for)


def resolve_impl(impl: str, rows: int = 0, n_groups: int = 0) -> tuple[str, int]:
    """(implementation, smallest row block) that `impl` means for this many rows and groups.

    'auto' -> 'loop' for decode-sized row counts (rows <= n_groups) on CPU, else 'blocks' on every backend, on CPU
    with blocks of at least CPU_MIN_BLOCK rows (block_size_for); an explicit 'blocks' keeps the padding rule alone
    (smallest block 8), as `k2jax-compile` passes for TPU targets.

    'ragged' stays available but is not the default for training: the TPU compiler costs the weight gradient of
    ragged_dot as a dense product over every group (README, "Measured here", has the compiled FLOPs of both).
    """
    if impl != "auto":
        return impl, 8
    if jax.default_backend() != "cpu":
        return "blocks", 8
    return ("loop" if rows <= n_groups else "blocks"), CPU_MIN_BLOCK


def _gather_swiglu(x_td, idx_tk, w_tk, wg, wu, wd, layer=None, lora=None, scale=1.0):
    """sum_k w[t,k]·SwiGLU_{idx[t,k]}(x[t]) with each assignment's expert weights gathered: [t,d] -> [t,d]."""
    n_exp, dtype = wg.shape[0 if layer is None else 1], x_td.dtype
    valid = (idx_tk >= 0) & (idx_tk < n_exp)
    e_tk = jnp.clip(idx_tk, 0, n_exp - 1)
    g = jnp.einsum("td,tkdf->tkf", x_td, kernel(wg, layer, e_tk, dtype), preferred_element_type=dtype)
    u = jnp.einsum("td,tkdf->tkf", x_td, kernel(wu, layer, e_tk, dtype), preferred_element_type=dtype)
    if lora is not None:  # inference: no dropout
        ag, bg, au, bu, ad, bd = (kernel(a, layer, e_tk, dtype) for a in lora[:6])
        g += scale * jnp.einsum("tkr,tkrf->tkf", jnp.einsum("td,tkdr->tkr", x_td, ag), bg)
        u += scale * jnp.einsum("tkr,tkrf->tkf", jnp.einsum("td,tkdr->tkr", x_td, au), bu)
    h = jax.nn.silu(g) * u
    y_tkd = jnp.einsum("tkf,tkfd->tkd", h, kernel(wd, layer, e_tk, dtype), preferred_element_type=dtype)
    if lora is not None:
        y_tkd += scale * jnp.einsum("tkr,tkrd->tkd", jnp.einsum("tkf,tkfr->tkr", h, ad), bd)
    w = jnp.where(valid, w_tk, 0.0).astype(dtype)
    return jnp.einsum("tkd,tk->td", y_tkd, w)


def _loop_swiglu(x_td, idx_tk, w_tk, wg, wu, wd, layer=None, lora=None, scale=1.0):
    """sum_k w[t,k]·SwiGLU_{idx[t,k]}(x[t]), one assignment per iteration in expert order: [t,d] -> [t,d].

    Each iteration reads its expert's kernels in place and multiplies one row; consecutive assignments of one
    expert find its kernels in cache. Ids outside [0, e) (other shards' experts) are skipped.
    """
    t, k = idx_tk.shape
    n_exp, dtype = wg.shape[0 if layer is None else 1], x_td.dtype
    flat = idx_tk.reshape(-1)
    order = jnp.argsort(flat)
    w_flat = w_tk.reshape(-1).astype(dtype)

    def body(i, y_td):
        a = order[i]
        tok, e = a // k, flat[a]

        def add(y):
            x_1d = jax.lax.dynamic_slice_in_dim(x_td, tok, 1)
            base = tuple(kernel(w, layer, e, dtype) for w in (wg, wu, wd))
            out = swiglu_one(x_1d, w_flat[a][None], base, lora_at(lora, layer, e), scale)
            return jax.lax.dynamic_update_slice_in_dim(y, jax.lax.dynamic_slice_in_dim(y, tok, 1) + out, tok, 0)

        return jax.lax.cond((e >= 0) & (e < n_exp), add, lambda y: y, y_td)

    return jax.lax.fori_loop(0, t * k, body, jnp.zeros_like(x_td))


def block_size_for(rows: int, n_groups: int, requested: int = 0, minimum: int = 8) -> int:
    """Rows per block: the static padding bound (under one block per non-empty group) stays within 1/8 of `rows`,
    and the block has at least `minimum` rows.

    On CPU each block costs a copy of its expert's kernels and GEMMs too small to run near the peak, so "auto"
    there asks for CPU_MIN_BLOCK: fewer, larger blocks are faster there despite the extra padding
    (`python benchmarks/cpu_kernels.py` times both; the README has its figures).
    """
    if requested:
        return requested
    groups = max(1, min(n_groups, rows))
    target = max(1, rows // (8 * groups))
    return int(min(512, max(8, minimum, 2 ** int(math.log2(target)))))


def _inference_block(rows: int, n_groups: int) -> int:
    """Rows per block without a backward pass: about one block per expert (each block reads its expert's
    kernels again, and nothing is kept for a gradient), a power of two in [8, 512]."""
    per_group = max(1.0, rows / max(1, n_groups))
    return int(min(512, max(8, 2 ** math.ceil(math.log2(per_group)))))


def _swiglu_rows_plain(x_md, wg, wu, wd, gs):
    dtype = x_md.dtype
    g = jax.lax.ragged_dot(x_md, wg, gs, preferred_element_type=dtype)
    u = jax.lax.ragged_dot(x_md, wu, gs, preferred_element_type=dtype)
    return jax.lax.ragged_dot((jax.nn.silu(g) * u).astype(dtype), wd, gs, preferred_element_type=dtype)


def _pad_groups(wg, wu, wd, gs):
    """Empty groups up to a power of two: libtpu 0.0.42 miscompiles the backward ragged_dot for group counts
    such as 384 or 48 (empty groups cost no FLOPs, only a transient zero-padded copy of the weights)."""
    pad = (1 << max(wg.shape[0] - 1, 0).bit_length()) - wg.shape[0]
    if not pad:
        return wg, wu, wd, gs
    wg, wu, wd = (jnp.pad(w, ((0, pad), (0, 0), (0, 0))) for w in (wg, wu, wd))
    return wg, wu, wd, jnp.pad(gs, (0, pad))


@jax.custom_vjp
def _swiglu_rows(x_md, wg, wu, wd, gs):
    """Grouped SwiGLU of rows sorted by group; only the backward pass pads the groups (forward and decode
    never copy the weights)."""
    return _swiglu_rows_plain(x_md, wg, wu, wd, gs)


def _swiglu_rows_fwd(x_md, wg, wu, wd, gs):
    return _swiglu_rows_plain(x_md, wg, wu, wd, gs), (x_md, wg, wu, wd, gs)


def _swiglu_rows_bwd(res, dy):
    x_md, wg, wu, wd, gs = res
    n = wg.shape[0]

    def padded(x, wg, wu, wd):
        return _swiglu_rows_plain(x, *_pad_groups(wg, wu, wd, gs))

    _, vjp = jax.vjp(padded, x_md, wg, wu, wd)
    dx, dwg, dwu, dwd = vjp(dy)
    return dx, dwg[:n], dwu[:n], dwd[:n], None


_swiglu_rows.defvjp(_swiglu_rows_fwd, _swiglu_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def block_swiglu(x_nbd, r_nb, wg_edf, wu_edf, wd_efd, block_expert, n_used, unroll=1):
    """y[n] = r[n]·SwiGLU_e(x[n]) with e = block_expert[n], for blocks n < n_used (zero after): [n, b, d] -> [n, b, d].

    A loop over blocks reads each expert's weights in place (no [n, d, f] gather); the backward pass
    accumulates the weight gradients block by block into [e, d, f]. The routing weights r [n, b] are applied
    inside, so their gradient comes from the backward's dh·h and the unweighted rows [n, b, d] are never kept.
    """
    return blocks_forward(x_nbd, r_nb, wg_edf, wu_edf, wd_efd, block_expert, n_used, unroll)


def _block_swiglu_fwd(x_nbd, r_nb, wg_edf, wu_edf, wd_efd, block_expert, n_used, unroll):
    # Two loops: the hidden rows g, u (named, so remat_policy="save_moe" keeps them), then the down projection,
    # whose output the backward pass does not need: holding g, u it recomputes no expert matmul.
    def hidden(carry, i, x, e):
        g = checkpoint_name(jnp.dot(x, wg_edf[e], preferred_element_type=x.dtype), "moe_hidden")
        u = checkpoint_name(jnp.dot(x, wu_edf[e], preferred_element_type=x.dtype), "moe_hidden")
        return carry, (g, u)

    def down(carry, i, g, u, r, e):
        return carry, jnp.dot(jax.nn.silu(g) * u * r[:, None], wd_efd[e], preferred_element_type=g.dtype)

    _, (g, u) = scan_blocks(hidden, n_used, (x_nbd, block_expert), unroll=unroll)
    _, y = scan_blocks(down, n_used, (g, u, r_nb, block_expert), unroll=unroll)
    return y, (x_nbd, r_nb, g, u, wg_edf, wu_edf, wd_efd, block_expert, n_used)


def _block_swiglu_bwd(unroll, res, dy_nbd):
    x_nbd, r_nb, g_nbf, u_nbf, wg_edf, wu_edf, wd_efd, block_expert, n_used = res

    def fn(dws, i, x, r, g, u, dy, e):
        dwg, dwu, dwd = dws
        sig = jax.nn.sigmoid(g)
        silu = g * sig
        h = silu * u
        dhr = jnp.dot(dy, wd_efd[e].T, preferred_element_type=x.dtype)  # d/d(r·h)
        dr = jnp.sum(dhr * h, axis=-1)
        dh = dhr * r[:, None]
        dg = dh * u * sig * (1 + g * (1 - sig))
        du = dh * silu
        dx = (jnp.dot(dg, wg_edf[e].T, preferred_element_type=x.dtype)
              + jnp.dot(du, wu_edf[e].T, preferred_element_type=x.dtype))
        dwg = dwg.at[e].add(jnp.dot(x.T, dg, preferred_element_type=dwg.dtype))
        dwu = dwu.at[e].add(jnp.dot(x.T, du, preferred_element_type=dwu.dtype))
        dwd = dwd.at[e].add(jnp.dot((h * r[:, None]).T, dy, preferred_element_type=dwd.dtype))
        return (dwg, dwu, dwd), (dx, dr)

    zeros = (jnp.zeros_like(wg_edf), jnp.zeros_like(wu_edf), jnp.zeros_like(wd_efd))
    (dwg, dwu, dwd), (dx, dr) = scan_blocks(fn, n_used, (x_nbd, r_nb, g_nbf, u_nbf, dy_nbd, block_expert), zeros,
                                             unroll=unroll)
    return dx, dr.astype(r_nb.dtype), dwg, dwu, dwd, None, None


block_swiglu.defvjp(_block_swiglu_fwd, _block_swiglu_bwd)


def expert_ffn(x_td: jax.Array, idx_tk: jax.Array, w_tk: jax.Array, wg_edf: jax.Array, wu_edf: jax.Array,
               wd_efd: jax.Array, *, impl: str, block_size: int = 0, unroll: int = 1, capacity: int = 0,
               layer: jax.Array | None = None, lora: ExpertLora | None = None, scale: float = 1.0,
               rate: float = 0.0, interpret: bool = False) -> jax.Array:
    """sum_k w[t,k] * SwiGLU_{idx[t,k]}(x[t]) -> [t, d]; ids outside [0, e) contribute nothing (other shards).

    capacity > 0 bounds the rows computed (assignments past it, in expert order, are dropped); 0 = dropless.
    With `layer`, the kernels are stacked over layers ([layers, e, d, f]) and read at that layer in place
    (inference only: no gradient for stacked kernels through 'blocks' or 'ragged'). With `lora` (a LoRA run),
    each expert's adapters add scale·(x·A)·B to its gate, up and down products on the same rows (dropout at
    `rate` with lora.key); the base kernels then get no gradient. `interpret`: "gmm"'s kernels in Pallas's
    interpreter (any backend) instead of compiled for TPU.
    """
    t, k = idx_tk.shape
    n_exp = wg_edf.shape[0 if layer is None else 1]
    dtype = x_td.dtype
    impl, min_block = resolve_impl(impl, t * k, n_exp)
    if impl == "gmm" and (layer is not None or lora is not None or isinstance(wg_edf, QArray)):
        impl, min_block = "blocks", 8  # the Pallas kernels take one layer's plain [e, d, f] kernels
    if impl == "gather":
        return _gather_swiglu(x_td, idx_tk, w_tk, wg_edf, wu_edf, wd_efd, layer, lora, scale)
    if impl == "loop":
        return _loop_swiglu(x_td, idx_tk, w_tk, wg_edf, wu_edf, wd_efd, layer, lora, scale)
    if impl == "ragged" and layer is not None:  # ragged_dot takes one layer's [e, d, f]: sliced out (a copy)
        wg_edf, wu_edf, wd_efd = (w[layer].astype(dtype) for w in (wg_edf, wu_edf, wd_efd))
        lora = None if lora is None else ExpertLora(*(a[layer] for a in lora[:6]), lora.key)
        layer = None
    flat = idx_tk.reshape(-1)
    valid = (flat >= 0) & (flat < n_exp)
    key = jnp.where(valid, flat, n_exp)
    order = jnp.argsort(key, stable=True)
    if capacity and capacity < t * k:
        order = order[:capacity]
    sorted_key = key[order]
    token = order // k
    weight = jnp.where(valid, w_tk.reshape(-1), 0.0)[order]
    group_sizes = jnp.zeros((n_exp + 1,), jnp.int32).at[sorted_key].add(1)[:n_exp]
    m = order.shape[0]
    # rows by gathers both ways (layers/permute.py) where this shard computes most assignments (one device, the
    # a2a receive side); under gather dispatch it computes 1/expert of them, and the gathers' [t·k, d]
    # cotangents would outgrow the scatter's [t, d]
    by_gather = 2 * m >= t * k
    inv = inverse(order, t * k) if by_gather else None  # each assignment's sorted row (-1: past the capacity)
    x_md = take_rows(x_td, token, inv.reshape(t, k)) if by_gather else x_td[token]
    if impl == "gmm":  # one more group: the rows for no expert here, never computed
        gs = jnp.zeros((n_exp + 1,), jnp.int32).at[sorted_key].add(1)
        y_md = gmm_swiglu(x_md.astype(dtype), wg_edf, wu_edf, wd_efd, gs, weight, interpret=interpret)
    elif impl == "ragged" and lora is not None:
        y_md = ragged_lora(x_md.astype(dtype), wg_edf, wu_edf, wd_efd, group_sizes, lora, scale, rate)
    elif impl == "ragged":
        y_md = _swiglu_rows(x_md.astype(dtype), wg_edf, wu_edf, wd_efd, group_sizes)
    else:
        b = block_size_for(m, n_exp, block_size, min_block) if layer is None else (block_size or _inference_block(m, n_exp))
        n_blocks = -(-m // b) + min(n_exp, m)
        padded = -(-group_sizes // b) * b
        padded_end = jnp.cumsum(padded)
        start = jnp.cumsum(group_sizes) - group_sizes
        sk = jnp.minimum(sorted_key, n_exp - 1)
        dest = padded_end[sk] - padded[sk] + jnp.arange(m) - start[sk]
        dest = jnp.where(sorted_key < n_exp, dest, n_blocks * b)  # rows for other shards: dropped
        x_nbd = jnp.zeros((n_blocks * b, x_md.shape[-1]), dtype).at[dest].set(x_md, mode="drop")
        x_nbd = x_nbd.reshape(n_blocks, b, -1)
        block_expert = jnp.searchsorted(padded_end, jnp.arange(n_blocks) * b, side="right")
        block_expert = jnp.minimum(block_expert, n_exp - 1).astype(jnp.int32)
        n_used = padded_end[-1] // b
        r_nb = jnp.zeros((n_blocks * b,), dtype).at[dest].set(weight.astype(dtype), mode="drop")
        r_nb = r_nb.reshape(n_blocks, b)
        if layer is None and lora is not None:
            y_nbd = block_swiglu_lora(x_nbd, r_nb, (wg_edf, wu_edf, wd_efd), lora, block_expert, n_used, scale, rate,
                                      unroll)
        elif layer is None:
            y_nbd = block_swiglu(x_nbd, r_nb, wg_edf, wu_edf, wd_efd, block_expert, n_used, unroll)
        else:
            y_nbd = blocks_forward(x_nbd, r_nb, wg_edf, wu_edf, wd_efd, block_expert, n_used, unroll, layer, lora,
                                    scale)
        y_md = y_nbd.reshape(n_blocks * b, -1).at[dest].get(mode="fill", fill_value=0)  # weighted inside
    if impl == "ragged":
        y_md = y_md * weight[:, None].astype(dtype)
    if by_gather:
        return take_rows(y_md, inv, order[:, None]).reshape(t, k, -1).sum(1)  # each token's k rows, summed
    return jnp.zeros_like(x_td).at[token].add(y_md)


def ideal_moe_flops(tokens: int, config) -> int:
    """2·tokens·hidden·(n_experts + 3·(k + n_shared)·moe_intermediate): router plus the experts actually used."""
    c = config
    return 2 * tokens * c.hidden_size * (c.n_routed_experts
                                         + 3 * (c.num_experts_per_tok + c.n_shared_experts) * c.moe_intermediate_size)
