"""Sigmoid-routed mixture of experts with a shared expert; experts split over the `expert` mesh axis."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx
from jax.sharding import PartitionSpec as P

from k2jax.model.factory import dtype_of, param
from k2jax.model.layers.common import MLP, pallas_mode
from k2jax.model.layers.dispatch import a2a_experts
from k2jax.model.layers.grouped import ExpertLora, expert_ffn
from k2jax.model.layers.lora import ExpertAdapter, fold
from k2jax.model.quant import QArray
from k2jax.model.layers.routing import route
from k2jax.model.sharding import ShardingRules


class MoE(nnx.Module):
    """Routed experts (kernels [e, d, f], [e, f, d]) plus n_shared_experts folded into one SwiGLU MLP."""

    def __init__(self, config, execution, rules: ShardingRules, *, rngs: nnx.Rngs, lora=None):
        c, run = config, execution
        e, d, f = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        self.router = param(rngs, "mlp.router", (d, e), c, run)
        self.router_bias = param(rngs, "mlp.router_bias", (e,), c, run)
        self.wg = param(rngs, "mlp.wg", (e, d, f), c, run)
        self.wu = param(rngs, "mlp.wu", (e, d, f), c, run)
        self.wd = param(rngs, "mlp.wd", (e, f, d), c, run)
        self.shared = (MLP("mlp.shared", d, f * c.n_shared_experts, c, run, rngs=rngs, lora=lora)
                       if c.n_shared_experts else None)
        adapted = lora is not None and lora.adapts("mlp.wg")
        for name, (d_in, d_out) in (("wg", (d, f)), ("wu", (d, f)), ("wd", (f, d))):
            setattr(self, f"{name}_lora", ExpertAdapter(f"mlp.{name}", e, d_in, d_out, lora, c, run, rngs=rngs)
                    if adapted else None)
        self.lora_scale, self.lora_rate = (lora.scale, lora.dropout) if lora is not None else (1.0, 0.0)
        self.config, self.execution, self.rules, self.dtype = c, run, rules, dtype_of(run.dtype)

    def expert_adapters(self, key=None) -> ExpertLora | None:
        """The routed experts' adapters as one ExpertLora (None without them)."""
        if self.wg_lora is None:
            return None
        g, u, d = self.wg_lora, self.wu_lora, self.wd_lora
        return ExpertLora(g.a[...], g.b[...], u.a[...], u.b[...], d.a[...], d.b[...], fold(key, "mlp.experts"))

    def __call__(self, x_btd: jax.Array, mask_bt: jax.Array | None = None, *, stacked: tuple | None = None,
                 stats: bool = True, key=None, trace: bool = False) -> tuple[jax.Array, dict]:
        """MoE feed-forward of x [b, t, d]; stats: per-expert loads [e] and the sequence-wise balance loss.

        The balance loss (DeepSeek-V3's, before aux_loss_alpha) is summed over the batch's sequences; tokens
        where mask_bt is 0 (padding) are left out of loads and loss. `stacked=(wg, wu, wd, layer)`: the routed
        kernels of every layer ([layers, e, d, f]) and this layer's index, used instead of this module's own
        (inference over a scan of layers: each chosen expert is read in place, no layer's experts copied); with
        adapters, `stacked=(wg, wu, wd, stacked ExpertLora, layer)`. `stats=False` (inference) skips the loads
        and the balance loss. `key`: the adapters' dropout key (training). `trace` adds each token's chosen experts
        and their weights ([b, t, k]) to the stats.
        """
        c, run = self.config, self.execution
        b, t, d = x_btd.shape
        x_td = checkpoint_name(x_btd.astype(self.dtype).reshape(b * t, d), "moe_in")
        idx, weights, scores = route(x_td, self.router[...], self.router_bias[...], top_k=c.num_experts_per_tok,
                                     n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                                     scaling=c.routed_scaling_factor)
        if stacked is None:
            # a quantised base's kernels stay quantised: the grouped matmul dequantises one expert at a time
            wg, wu, wd = (w.get_value() if isinstance(w.get_value(), QArray) else jnp.asarray(w[...], self.dtype)
                          for w in (self.wg, self.wu, self.wd))
            lora, layer = self.expert_adapters(key), None
        else:  # cast per expert as it is read: converting the stacks here would convert every layer's experts
            wg, wu, wd, lora, layer = stacked
        mode = pallas_mode(run)
        impl = "gmm" if run.moe_impl == "auto" and mode is not None else run.moe_impl
        y_td, dropped = routed_experts(x_td, idx, weights, wg, wu, wd, self.rules, impl=impl,
                                       block_size=run.moe_block_size, unroll=run.moe_block_unroll,
                                       capacity_factor=run.moe_capacity_factor, layer=layer, lora=lora,
                                       scale=self.lora_scale, rate=self.lora_rate, dispatch=run.moe_dispatch,
                                       interpret=mode != "compiled")
        if self.shared is not None:
            y_td = y_td + self.shared(x_td, key)
        y_btd = y_td.reshape(b, t, d).astype(x_btd.dtype)
        chosen = {"expert_choice": idx.reshape(b, t, -1), "expert_weight": weights.reshape(b, t, -1)} if trace else {}
        if not stats:
            return y_btd, chosen
        mask = jnp.ones((b, t), jnp.float32) if mask_bt is None else mask_bt.astype(jnp.float32)
        one_hot = lambda ids: jax.nn.one_hot(ids.reshape(b, t, -1), c.n_routed_experts, dtype=jnp.float32).sum(2)  # noqa: E731
        load_e = (one_hot(idx) * mask[..., None]).sum((0, 1))  # the experts chosen (bias included): the bias update's
        # DeepSeek-V3's sequence-wise balance loss counts the top-K of the affinity scores themselves (no
        # correction bias, no group limit): f_i = N_r / (K·T) · #{t : s_i,t in TopK(s_t)}
        hits_bte = one_hot(jax.lax.top_k(scores, c.num_experts_per_tok)[1]) * mask[..., None]
        n_tok = jnp.maximum(mask.sum(1), 1.0)  # [b]
        f_be = hits_bte.sum(1) * c.n_routed_experts / (c.num_experts_per_tok * n_tok[:, None])
        probs = scores.reshape(b, t, -1) / scores.reshape(b, t, -1).sum(-1, keepdims=True)
        p_be = (probs * mask[..., None]).sum(1) / n_tok[:, None]
        stats = {"expert_load": jax.lax.stop_gradient(load_e), "balance_loss": (f_be * p_be).sum(),
                 "moe_dropped": jax.lax.stop_gradient(dropped), **chosen}
        return y_btd, stats


def routed_experts(x_td, idx_tk, w_tk, wg, wu, wd, rules: ShardingRules, *, impl: str, block_size: int = 0,
                   unroll: int = 1, capacity_factor: float = 0.0, layer: jax.Array | None = None,
                   lora: ExpertLora | None = None, scale: float = 1.0, rate: float = 0.0, dispatch: str = "gather",
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(routed-expert output [t, d], assignments dropped over the whole batch); on a mesh with expert/tensor
    axes the tokens travel, not weights.

    dispatch="gather": each `expert` shard all-gathers the tokens (and their routing) of its expert group,
    computes the assignments of its local experts, and a reduce-scatter returns every token's sum to the shard
    that owns the token; its row buffer is the dropless worst case (every gathered token on its experts) unless
    capacity_factor > 0 bounds it to that multiple of the balanced load. dispatch="a2a": each assignment goes
    only to the shard of its expert and back (layers/dispatch.py), slots of capacity_factor x the balanced load
    (0: dropless). Assignments past a capacity are dropped and counted, never silently. The `tensor` axis
    splits each expert's hidden dim (partial sums are added with a psum). With `layer`, the kernels are stacked
    over layers ([layers, e, d, f]) and read at that index. `lora`: the experts' adapters, split over `expert`
    like their kernels (B's hidden dim, and A's of the down kernel, over `tensor`).
    """
    opts = dict(impl=impl, block_size=block_size, unroll=unroll, lora=lora, scale=scale, rate=rate,
                interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    ep = mesh.shape.get("expert", 1) if not mesh.empty else 1
    tp = mesh.shape.get("tensor", 1) if not mesh.empty else 1
    # the flattened tokens [b*t] are split as the batch's rows, then (context parallelism) each row's sequence
    tok_axes = () if mesh.empty else tuple(a for a in rules.mesh_axes("batch") + rules.mesh_axes("act_seq")
                                           if mesh.shape.get(a, 1) > 1)
    cp = any(a in rules.mesh_axes("act_seq") for a in tok_axes)
    if ep == 1 and tp == 1 and not cp and (impl != "gmm" or not tok_axes):  # a Pallas kernel needs the shard_map
        return expert_ffn(x_td, idx_tk, w_tk, wg, wu, wd, layer=layer, **opts), jnp.zeros((), jnp.float32)
    if x_td.shape[0] % math.prod(mesh.shape[a] for a in tok_axes):  # decode: fewer tokens than token shards
        tok_axes = tuple(a for a in tok_axes if a not in rules.mesh_axes("act_seq"))
    lead = () if layer is None else ("layers",)
    tok = P(tok_axes or None, None)
    w_in = rules.spec(lead + ("experts", None, "expert_mlp"), mesh)
    w_out = rules.spec(lead + ("experts", "expert_mlp", None), mesh)
    k_in, k_out = w_in, w_out
    if isinstance(wg, QArray):  # quantised kernels: their scales split as their values are
        k_in, k_out = _quant_specs(wg, w_in, lead, rules, mesh, "in"), _quant_specs(wd, w_out, lead, rules, mesh, "out")
    lo_specs = None
    if lora is not None:
        rank_in = rules.spec(lead + ("experts", None, None), mesh)  # A of gate/up, B of down: [e, d, r], [e, r, d]
        lo_specs = ExpertLora(rank_in, w_in, rank_in, w_in, w_out, rank_in, None if lora.key is None else P())
    n_local = wg.shape[len(lead)] // ep
    split = "expert" in tok_axes  # are tokens split over the expert axis, or replicated?
    a2a = dispatch == "a2a" and ep > 1 and split
    # the drop counts are summed over the shards that hold distinct assignments
    count_axes = tok_axes + (("expert",) if ep > 1 and not split else ())

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(tok, tok, tok, k_in, k_in, k_out, lo_specs, P()),
                       out_specs=(tok, P()), check_vma=False)
    def local(x, idx, w, g, u, dn, lo, layer):
        if lo is not None and lo.key is not None:  # each shard its own dropout masks
            shard = jax.lax.axis_index("expert") * tp + jax.lax.axis_index("tensor") if tp > 1 else \
                jax.lax.axis_index("expert")
            lo = lo._replace(key=jax.random.fold_in(lo.key, shard))
        if a2a:
            def ffn(rows, ids, ones):
                return expert_ffn(rows, ids, ones, g, u, dn, layer=layer, **{**opts, "lora": lo})

            y, dropped = a2a_experts(x, idx, w, ffn, shards=ep, n_local=n_local, capacity_factor=capacity_factor,
                                     tensor=tp > 1)
            return y, jax.lax.psum(dropped, count_axes) if count_axes else dropped
        if ep > 1 and split:
            x = jax.lax.all_gather(x, "expert", axis=0, tiled=True)
            idx = jax.lax.all_gather(idx, "expert", axis=0, tiled=True)
            w = jax.lax.all_gather(w, "expert", axis=0, tiled=True)
        if ep > 1:
            idx = idx - jax.lax.axis_index("expert") * n_local
        cap = int(capacity_factor * idx.size / ep) if capacity_factor > 0 else 0
        valid = jnp.sum((idx >= 0) & (idx < n_local)).astype(jnp.float32)
        dropped = jnp.maximum(valid - cap, 0.0) if cap else jnp.zeros((), jnp.float32)
        y = expert_ffn(x, idx, w, g, u, dn, capacity=cap, layer=layer, **{**opts, "lora": lo})
        if tp > 1:
            y = jax.lax.psum(y, "tensor")
        if ep > 1:
            y = (jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True) if split
                 else jax.lax.psum(y, "expert"))
        return y, jax.lax.psum(dropped, count_axes) if count_axes else dropped

    return local(x_td, idx_tk, w_tk, wg, wu, wd, lora, layer)


def _quant_specs(w: QArray, spec, lead: tuple, rules: ShardingRules, mesh, which: str) -> QArray:
    """shard_map specs of a quantised expert kernel: values as `spec`; scales split over the same expert (and,
    for fp8 blocks, hidden) shards, so each shard dequantises its own part."""
    from k2jax.errors import ConfigError

    tp = mesh.shape.get("tensor", 1)
    f = w.shape[-1] if which == "in" else w.shape[-2]
    if w.kind == "fp8" and tp > 1 and f % (128 * tp):
        raise ConfigError(f"moe_intermediate_size={f}: an fp8 base split over tensor={tp} needs it to be a multiple "
                          f"of {128 * tp} (128-column scale blocks per shard)")
    if w.kind == "int8":  # scale [.., e, 1, f] (gate, up) or [.., e, 1, d] (down)
        names = lead + (("experts", None, "expert_mlp") if which == "in" else ("experts", None, None))
    else:  # scale [.., e, in blocks, out blocks]
        names = lead + (("experts", None, "expert_mlp") if which == "in" else ("experts", "expert_mlp", None))
    return QArray(spec, rules.spec(names, mesh), w.n_in, w.n_out, w.kind)
