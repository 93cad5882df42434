"""The K2 transformer: embedding, dense blocks, scanned MoE blocks, final norm, untied lm_head.

One forward path serves training, prefill and decode: `Transformer.forward(tokens, positions, segment_ids,
cache=None)`. Without a cache it is the training / full forward; with one (`k2jax.model.cache`) every block
writes the new tokens into its layer of the cache and attends over it, and the MoE layers read each chosen
expert of the stacked kernels in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.model.config import Execution, K2Config
from k2jax.model.layers.attention import MLAttention
from k2jax.model.factory import dtype_of, param
from k2jax.model.layers.common import MLP, RMSNorm
from k2jax.model.layers.context import check_length, context_size, from_balanced, to_balanced
from k2jax.model.layers.moe import MoE
from k2jax.model.layers.rope import rope_cos_sin, yarn_inv_freq
from k2jax.model.params import STACKS
from k2jax.model.sharding import ShardingRules, constrain

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # the feed-forward hidden activations (routed experts' rows, shared/dense MLP) and the MoE input are kept:
    # the backward pass recomputes attention and routing but no expert matmul
    "save_moe": jax.checkpoint_policies.save_only_these_names("moe_in", "moe_hidden", "mlp_hidden"),
    # and every attention projection's output (low-rank q and kv, per-head q, k/v, attention output): the
    # backward recomputes norms and routing; each attention chunk's blocks are recomputed by its own backward
    "save_moe_attn": jax.checkpoint_policies.save_only_these_names(
        "moe_in", "moe_hidden", "mlp_hidden", "attn_lora", "attn_q", "attn_kv", "attn_out", "attn_lse"),
}


ACT = ("batch", "act_seq", "act_embed")


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h)) with a dense MLP or the MoE."""

    def __init__(self, config: K2Config, execution: Execution, rules: ShardingRules, moe: bool, *, rngs: nnx.Rngs,
                 lora=None):
        c, run = config, execution
        self.attn_norm = RMSNorm("attn_norm", c.hidden_size, c, run, rngs=rngs)
        self.attn = MLAttention(c, run, rules, rngs=rngs, lora=lora)
        self.mlp_norm = RMSNorm("mlp_norm", c.hidden_size, c, run, rngs=rngs)
        self.mlp = (MoE(c, run, rules, rngs=rngs, lora=lora) if moe
                    else MLP("mlp", c.hidden_size, c.intermediate_size, c, run, rngs=rngs, lora=lora))
        self.is_moe, self.rules = moe, rules

    def __call__(self, x_btd, cos, sin, segment_ids=None, cache=None, *, layer=None, positions_bt=None,
                 experts=None, cache_len=None, key=None, trace: bool = False):
        """(y [b, t, d], cache, stats). `cache` with `layer` and `positions_bt`: see MLAttention; `experts`:
        the stacked routed kernels and this layer's index, read in place (inference); `key`: this layer's
        adapter-dropout key (a LoRA run's training); `trace`: the MoE's expert choices in the stats."""
        h, max_logit, cache = self.attn(self.attn_norm(x_btd), cos, sin, segment_ids, cache=cache, layer=layer,
                                        positions_bt=positions_bt, cache_len=cache_len, key=key)
        h = constrain(x_btd + h, self.rules, ACT)
        stats = {} if max_logit is None else {"max_logit": max_logit}
        if self.is_moe:
            mask = None if segment_ids is None else segment_ids != 0
            y, moe_stats = self.mlp(self.mlp_norm(h), mask, stacked=experts, stats=cache is None, key=key, trace=trace)
            stats.update(moe_stats)
        else:
            y = self.mlp(self.mlp_norm(h), key)
        return constrain(h + y, self.rules, ACT), cache, stats


def _stack(config, execution, rules, moe: bool, n: int, rngs: nnx.Rngs, lora=None) -> Block:
    """n Blocks with parameters stacked on a leading 'layers' axis (for lax.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(config, execution, rules, moe, rngs=r, lora=lora)

    return make(rngs)


class Transformer(nnx.Module):
    """Kimi K2 / DeepSeek-V3 decoder. `__call__(tokens [b, t]) -> logits [b, t, vocab]` in float32.

    With `lora` (a LoraConfig), the targeted projections carry low-rank adapters (LoraParam variables)."""

    def __init__(self, config: K2Config, rules: ShardingRules | None = None, execution: Execution | None = None, *,
                 rngs: nnx.Rngs, lora=None):
        c, run = config, execution or Execution()
        rules = rules or ShardingRules()
        self.embed = param(rngs, "embed", (c.vocab_size, c.hidden_size), c, run)
        n = {"dense_layers": c.num_dense_layers, "moe_layers": c.num_moe_layers}
        for name in STACKS:
            setattr(self, name, _stack(c, run, rules, name == "moe_layers", n[name], rngs, lora) if n[name] else None)
        self.final_norm = RMSNorm("final_norm", c.hidden_size, c, run, rngs=rngs)
        self.lm_head = param(rngs, "lm_head", (c.vocab_size, c.hidden_size), c, run)
        self.config, self.execution, self.rules, self.lora = c, run, rules, lora

    def stacks(self):
        """(name, stacked Block) of each non-empty stack, in layer order."""
        return [(name, getattr(self, name)) for name in STACKS if getattr(self, name) is not None]

    def forward(self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, cache: dict | None = None,
                cache_len: int | None = None, select_b=None, head: bool = True, dropout_key=None,
                trace: bool = False):
        """(out, cache, stats): the one forward pass of training, prefill and decode.

        out: float32 logits [b, t, vocab], or hidden states [b, t, d] after the final norm with head=False;
        select_b [b] keeps one position per sequence ([b, vocab] / [b, d]), e.g. each prompt's last token.
        cache: {stack name: that stack's cache} (k2jax.model.cache), written at `positions_bt`; the updated
        cache is returned (None without one). cache_len (static): attend over the cache's first slots only,
        when every position is below it (a prompt written from position 0 needs its own length only). stats: per-layer statistics stacked over layers, keyed by
        stack (max attention logits, expert loads, balance loss), without a cache only. dropout_key: the
        adapters' dropout in a LoRA run's training (none without it). trace (static): the stats also hold each
        MoE layer's chosen experts and weights per token ([layers, b, t, k]).
        """
        c = self.config
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # context parallelism (training, a full forward): the sequence in the balanced layout until the final norm
        n_ctx = context_size(self.rules) if cache is None else 1
        if n_ctx > 1:
            check_length(t, n_ctx, self.execution.attn_chunk)
            tokens_bt, positions_bt = to_balanced(tokens_bt, n_ctx), to_balanced(positions_bt, n_ctx)
            segment_ids_bt = None if segment_ids_bt is None else to_balanced(segment_ids_bt, n_ctx)
        inv_freq, attn_factor = yarn_inv_freq(c)
        cos, sin = rope_cos_sin(positions_bt, inv_freq, attn_factor)
        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dtype_of(self.execution.dtype))
        x = constrain(x, self.rules, ACT)
        stats, new_cache = {}, None if cache is None else {}
        for i, (name, stack) in enumerate(self.stacks()):
            layer_cache = None if cache is None else cache[name]
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x, layer_cache, stats[name] = self._run_stack(stack, x, cos, sin, segment_ids_bt, layer_cache,
                                                          positions_bt, cache_len, key, trace)
            if cache is not None:
                new_cache[name] = layer_cache
        h = self.final_norm(x)
        if n_ctx > 1:
            h = from_balanced(h, n_ctx)
            for name in stats:  # the per-token traces ([layers, b, t, k])
                stats[name].update({k: from_balanced(stats[name][k], n_ctx, axis=2)
                                    for k in ("expert_choice", "expert_weight") if k in stats[name]})
        if select_b is not None:
            h = jnp.take_along_axis(h, select_b[:, None, None], axis=1)[:, 0]
        return (self.logits_from_hidden(h) if head else h), new_cache, stats

    def _run_stack(self, stack: Block, x, cos, sin, segment_ids, cache, positions_bt, cache_len, key=None,
                   trace=False):
        graphdef, state = nnx.split(stack)
        n = jax.tree.leaves(state)[0].shape[0]
        # with a cache (inference) each MoE layer gets the stacked kernels (and adapters) and its index, so only
        # the chosen experts are read, in place; the scan's own slice of them then goes unused and is not computed
        experts = (stack.mlp.wg[...], stack.mlp.wu[...], stack.mlp.wd[...], stack.mlp.expert_adapters()) \
            if cache is not None and stack.is_moe else None

        def body(carry, inp):
            h, cache = carry
            layer_state, layer = inp
            blk = nnx.merge(graphdef, layer_state)
            h, cache, s = blk(h, cos, sin, segment_ids, cache, layer=layer, positions_bt=positions_bt,
                              experts=None if experts is None else (*experts, layer), cache_len=cache_len,
                              key=None if key is None else jax.random.fold_in(key, layer), trace=trace)
            return (h, cache), s

        run = self.execution
        if run.remat_policy != "none" and cache is None:
            body = jax.checkpoint(body, policy=_REMAT[run.remat_policy])
        layers = jnp.arange(n, dtype=jnp.int32)
        if run.scan_layers:
            (x, cache), stats = jax.lax.scan(body, (x, cache), (state, layers))
            return x, cache, stats
        outs = []
        for i in range(n):
            (x, cache), s = body((x, cache), (jax.tree.map(lambda a: a[i], state), layers[i]))
            outs.append(s)
        return x, cache, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        """Logits [b, t, vocab] in float32 for int tokens [b, t] (no cache)."""
        return self.forward(tokens_bt, positions_bt, segment_ids_bt)[0]

    def logits_from_hidden(self, h_btd):
        """lm_head projection of hidden states [..., d] -> float32 logits [..., vocab]."""
        dt = dtype_of(self.execution.dtype)
        logits = jnp.einsum("...d,vd->...v", h_btd.astype(dt), self.lm_head[...].astype(dt),
                            preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, self.rules, ("batch", "act_seq", "act_vocab"))
        return logits
