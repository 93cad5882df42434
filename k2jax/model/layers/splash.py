"""Training attention through JAX's Pallas splash-attention kernel for TPU (causal, packed-document segments),
MLA's shapes as they are: queries and keys of qk_nope + qk_rope = 192 values per head, values of 128.

The max pre-softmax logit that QK-Clip needs comes from the kernel's per-row log-sum-exp: lse_i is at least the
row's max logit and at most log(keys seen) above it, and within a fraction of it whenever one key dominates the
row (the logits QK-Clip exists to cap). The kernel's own VJP gives the gradients (the forward it runs first is
the same call as the primal one here, the residual-saving one that returns the log-sum-exp, and XLA merges the
two unless a remat policy separates them). Relies on splash's `save_residuals` output, as jax 0.10 defines it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

BLOCKS = (512, 256, 128)  # query and key blocks of every pass, the largest that divides the sequence


def splash_fits(t: int) -> bool:
    """Whether a sequence of t tokens splits into the kernel's blocks (multiples of 128; else the XLA blockwise
    path runs)."""
    return t % BLOCKS[-1] == 0


def block_size(t: int) -> int:
    """The kernel's query and key block for t tokens."""
    return next(b for b in BLOCKS if t % b == 0)


def _kernels(t: int, heads: int, interpret: bool):
    """(plain kernel, kernel that also returns the log-sum-exp) for `heads` causal heads of t tokens; built in the
    trace that calls them (their block tables become its constants: a cached kernel would leak them)."""
    b = block_size(t)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * heads)
    make = functools.partial(sk.make_splash_mha, mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                             interpret=interpret)
    return make(save_residuals=False), make(save_residuals=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q_htk, k_htk, v_htv, seg_t, interpret: bool):
    """(out [h, t, v], log-sum-exp [h, t]) of one sequence; gradients for q, k, v through the kernel's VJP."""
    _, with_lse = _kernels(q_htk.shape[1], q_htk.shape[0], interpret)
    out, (lse,) = with_lse(q_htk, k_htk, v_htv, segment_ids=sk.SegmentIds(seg_t, seg_t))
    return out, lse


def _attend_fwd(q_htk, k_htk, v_htv, seg_t, interpret):
    return _attend(q_htk, k_htk, v_htv, seg_t, interpret), (q_htk, k_htk, v_htv, seg_t)


def _attend_bwd(interpret, res, cts):
    q_htk, k_htk, v_htv, seg_t = res
    plain, _ = _kernels(q_htk.shape[1], q_htk.shape[0], interpret)
    _, vjp = jax.vjp(lambda q, k, v: plain(q, k, v, segment_ids=sk.SegmentIds(seg_t, seg_t)), q_htk, k_htk, v_htv)
    return (*vjp(cts[0]), None)  # the log-sum-exp feeds only the (stop-gradient) max logit


_attend.defvjp(_attend_fwd, _attend_bwd)


def splash_attention(qn, qr, kn, kr, v, seg, scale: float, rules, *, interpret: bool = False):
    """(out [b, t, h, v], max pre-softmax logit per head [h], an upper bound as the module docstring says) of
    causal attention within segments (seg [b, t]; 0 is padding, left out of the max): q_nope [b, t, h, n] with
    q_rope [b, t, h, r] against k_nope [b, t, h, n] with the shared k_rope [b, t, r]. On a mesh the kernel runs
    per shard of the batch (the `batch` axes) and of the heads (`act_heads`)."""
    b, t, h, _ = qn.shape
    q = (jnp.concatenate([qn, qr], -1) * scale).astype(qn.dtype)
    k = jnp.concatenate([kn, jnp.broadcast_to(kr[:, :, None, :].astype(kn.dtype), kr.shape[:2] + (h, kr.shape[-1]))],
                        -1)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, h, t, .]

    def local(q, k, v, seg):
        out, lse = jax.vmap(lambda q, k, v, s: _attend(q, k, v, s, interpret))(q, k, v, seg)
        real = (seg != 0)[:, None, :]
        return out, jnp.max(jnp.where(real, jax.lax.stop_gradient(lse), -jnp.inf), axis=(0, 2))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out, max_h = local(q, k, v, seg)
    else:
        spec = rules.spec(("batch", "act_heads", None, None), mesh)
        batch_axes = tuple(a for a in jax.tree.leaves(tuple(spec)[:1]) if a is not None)
        head_spec = P(*tuple(spec)[1:2])

        def sharded(q, k, v, seg):
            out, max_h = local(q, k, v, seg)
            return out, jax.lax.pmax(max_h, batch_axes) if batch_axes else max_h

        out, max_h = jax.shard_map(sharded, mesh=mesh, in_specs=(spec, spec, spec, P(*tuple(spec)[:1], None)),
                                   out_specs=(spec, head_spec), check_vma=False)(q, k, v, seg)
    return jnp.swapaxes(out, 1, 2), max_h
