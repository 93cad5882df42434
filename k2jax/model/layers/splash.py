"""Training attention through JAX's Pallas splash-attention kernel for TPU (causal, packed-document segments),
MLA's shapes as they are: queries and keys of qk_nope + qk_rope = 192 values per head, values of 128.

The max pre-softmax logit that QK-Clip needs comes from the kernel's per-row log-sum-exp: lse_i is at least the
row's max logit and at most log(keys seen) above it, and within a fraction of it whenever one key dominates the
row (the logits QK-Clip exists to cap). The kernel's own VJP gives the gradients (the forward it runs first is
the same call as the primal one here, the residual-saving one that returns the log-sum-exp, and XLA merges the
two unless a remat policy separates them). Relies on splash's `save_residuals` output, as jax 0.10 defines it.

Under context parallelism the queries arrive in the balanced layout (layers/context.py) and the keys in sequence
order: the causal mask is splash's own, given the queries' sequence positions (its `q_sequence`), and its block
tables are split over the context shards (`q_seq_shards`), so each shard's kernel skips exactly the key blocks
after its own pieces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BLOCKS = (512, 256, 128)  # query and key blocks of every pass, the largest that divides the sequence (or piece)


def splash_fits(t: int) -> bool:
    """Whether a sequence (or, under context parallelism, a piece) of t tokens splits into the kernel's blocks
    (multiples of 128; else the XLA blockwise path runs)."""
    return t % BLOCKS[-1] == 0


def block_size(t: int) -> int:
    """The kernel's query and key block for t tokens."""
    return next(b for b in BLOCKS if t % b == 0)


def _kernels(heads: int, positions: np.ndarray, block: int, shards: int, interpret: bool):
    """(plain kernel, kernel that also returns the log-sum-exp) for `heads` causal heads whose queries sit at
    sequence `positions` (in the order they arrive, split into `shards` equal parts) against keys in sequence
    order; built in the trace that calls them (their block tables become its constants: a cached kernel would
    leak them)."""
    t = len(positions)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    causal = sm.CausalMask((t, t))
    causal.q_sequence = np.asarray(positions, np.int32)  # the mask, its block tables and the kernel's rows follow
    mask = sm.MultiHeadMask([causal] * heads)
    make = functools.partial(sk.make_splash_mha, mask, block_sizes=sizes, head_shards=1, q_seq_shards=shards,
                             interpret=interpret)
    # the forward's output and log-sum-exp carry remat names, so save_moe_attn keeps them for the backward kernels
    return make(save_residuals=False, residual_checkpoint_name="attn_out"), make(save_residuals=True)


@jax.custom_vjp
def _attend(plain, with_lse, q_htk, k_htk, v_htv, seg_q, seg_k):
    """(out [h, tq, v], log-sum-exp [h, tq]) of one sequence's queries against its keys; gradients for q, k, v
    through the plain kernel's VJP (the kernels' block tables are arguments: under context parallelism each shard
    holds its own)."""
    out, (lse,) = with_lse(q_htk, k_htk, v_htv, segment_ids=sk.SegmentIds(seg_q, seg_k))
    return out, lse


def _attend_fwd(plain, with_lse, q_htk, k_htk, v_htv, seg_q, seg_k):
    # one forward kernel call: the plain kernel's own forward rule, whose residuals (q, k, v, output, log-sum-exp)
    # its backward kernels read; the log-sum-exp is taken from them rather than from a second forward
    out, vjp = jax.vjp(lambda q, k, v: plain(q, k, v, segment_ids=sk.SegmentIds(seg_q, seg_k)), q_htk, k_htk, v_htv)
    return (out, _residual_lse(vjp, q_htk.shape[:2])), vjp


def _residual_lse(vjp, shape: tuple[int, int]) -> jax.Array:
    """The log-sum-exp [h, tq] among the splash kernel's VJP residuals: its only float32 array of that shape."""
    found = [x for x in jax.tree.leaves(vjp) if x.shape == shape and x.dtype == jnp.float32]
    if len(found) != 1:  # the kernel's residuals changed with the installed JAX
        raise RuntimeError(f"splash attention: expected one float32 {shape} log-sum-exp among the kernel's residuals, "
                           f"found {len(found)}")
    return found[0]


def _attend_bwd(vjp, cts):
    return (None, None, *vjp(cts[0]), None, None)  # the log-sum-exp feeds only the (stop-gradient) max logit


_attend.defvjp(_attend_fwd, _attend_bwd)


def splash_attention(qn, qr, kn, kr, v, seg, scale: float, rules, *, interpret: bool = False,
                     positions: np.ndarray | None = None, seg_k=None, context_axes: tuple[str, ...] = ()):
    """(out [b, tq, h, v], max pre-softmax logit per head [h], an upper bound as the module docstring says) of
    causal attention within segments (seg [b, tq]; 0 is padding, left out of the max): q_nope [b, tq, h, n] with
    q_rope [b, tq, h, r] against k_nope [b, t, h, n] with the shared k_rope [b, t, r]. On a mesh the kernel runs
    per shard of the batch (the `batch` axes) and of the heads (`act_heads`).

    Context parallelism: the queries (and seg) in the order of `positions` (the balanced layout), split over
    `context_axes`; keys, values and `seg_k` [b, t] whole on every shard, in sequence order."""
    b, tq, h, _ = qn.shape
    positions = np.arange(tq) if positions is None else positions
    seg_k = seg if seg_k is None else seg_k
    q = (jnp.concatenate([qn, qr], -1) * scale).astype(qn.dtype)
    k = jnp.concatenate([kn, jnp.broadcast_to(kr[:, :, None, :].astype(kn.dtype), kr.shape[:2] + (h, kr.shape[-1]))],
                        -1)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, h, t, .]
    mesh = jax.sharding.get_abstract_mesh()
    shards = int(np.prod([mesh.shape[a] for a in context_axes])) if context_axes else 1
    # blocks within one piece of the balanced layout (2 per shard), so that no block mixes an early and a late one
    block = block_size(tq // (2 * shards) if shards > 1 else tq)

    def local(kernels, q, k, v, seg_q, seg_k):
        out, lse = jax.vmap(lambda *a: _attend(*kernels, *a))(q, k, v, seg_q, seg_k)
        real = (seg_q != 0)[:, None, :]
        return out, jnp.max(jnp.where(real, jax.lax.stop_gradient(lse), -jnp.inf), axis=(0, 2))

    if mesh.empty:
        out, max_h = local(_kernels(h, positions, block, 1, interpret), q, k, v, seg, seg_k)
        return jnp.swapaxes(out, 1, 2), max_h
    q_spec = rules.spec(("batch", "act_heads", "act_seq" if context_axes else None, None), mesh)
    kv_spec = rules.spec(("batch", "act_heads", None, None), mesh)
    batch_axes = tuple(a for a in jax.tree.leaves(tuple(q_spec)[:1]) if a is not None)
    head_axes = tuple(a for a in jax.tree.leaves(tuple(q_spec)[1:2]) if a is not None)
    heads = h // int(np.prod([mesh.shape[a] for a in head_axes]))
    kernels = _kernels(heads, positions, block, shards, interpret)
    kernel_spec = [kern.manual_sharding_spec(NamedSharding(mesh, P(None, context_axes or None))) for kern in kernels]

    def sharded(kernels, q, k, v, seg_q, seg_k):
        out, max_h = local(kernels, q, k, v, seg_q, seg_k)
        over = batch_axes + tuple(context_axes)
        return out, jax.lax.pmax(max_h, over) if over else max_h

    seq_spec = P(*tuple(q_spec)[:1], *tuple(q_spec)[2:3])
    out, max_h = jax.shard_map(sharded, mesh=mesh,
                               in_specs=(tuple(kernel_spec), q_spec, kv_spec, kv_spec, seq_spec,
                                         P(*tuple(q_spec)[:1], None)),
                               out_specs=(q_spec, P(*tuple(q_spec)[1:2])), check_vma=False)(
        tuple(kernels), q, k, v, seg, seg_k)
    return jnp.swapaxes(out, 1, 2), max_h
