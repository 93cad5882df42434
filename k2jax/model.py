"""The K2 transformer: embedding, dense blocks, scanned MoE blocks, final norm, untied lm_head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from k2jax.config import K2Config
from k2jax.layers.attention import MLAttention
from k2jax.layers.common import MLP, RMSNorm, dtype_of, param
from k2jax.layers.moe import MoE
from k2jax.layers.rope import rope_cos_sin, yarn_inv_freq
from k2jax.sharding import ShardingRules, constrain

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # the feed-forward hidden activations (routed experts' rows, shared/dense MLP) and the MoE input are kept:
    # the backward pass recomputes attention and routing but no expert matmul
    "save_moe": jax.checkpoint_policies.save_only_these_names("moe_in", "moe_hidden", "mlp_hidden"),
    # and every attention projection's output (low-rank q and kv, per-head q, k/v, attention output): the
    # backward recomputes norms, routing and, inside each attention chunk's own remat, its scores
    "save_moe_attn": jax.checkpoint_policies.save_only_these_names(
        "moe_in", "moe_hidden", "mlp_hidden", "attn_lora", "attn_q", "attn_kv", "attn_out"),
}


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h)) with a dense MLP or the MoE."""

    def __init__(self, config: K2Config, rules: ShardingRules, moe: bool, *, rngs: nnx.Rngs):
        c, pd = config, dtype_of(config.param_dtype)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, pd, rngs=rngs)
        self.attn = MLAttention(c, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, pd, rngs=rngs)
        if moe:
            self.mlp = MoE(c, rules, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.initializer_range, pd, dtype_of(c.dtype), rngs=rngs)
        self.is_moe, self.rules = moe, rules

    def __call__(self, x_btd, cos, sin, segment_ids):
        h, max_logit = self.attn(self.attn_norm(x_btd), cos, sin, segment_ids)
        h = constrain(x_btd + h, self.rules, ("batch", "act_seq", "act_embed"))
        stats = {"max_logit": max_logit}
        if self.is_moe:
            y, moe_stats = self.mlp(self.mlp_norm(h), None if segment_ids is None else segment_ids != 0)
            stats.update(moe_stats)
        else:
            y = self.mlp(self.mlp_norm(h))
        return constrain(h + y, self.rules, ("batch", "act_seq", "act_embed")), stats


def _stack(config, rules, moe: bool, n: int, rngs: nnx.Rngs) -> Block:
    """n Blocks with parameters stacked on a leading 'layers' axis (for lax.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(config, rules, moe, rngs=r)

    return make(rngs)


class Transformer(nnx.Module):
    """Kimi K2 / DeepSeek-V3 decoder. `__call__(tokens [b, t]) -> logits [b, t, vocab]` in float32."""

    def __init__(self, config: K2Config, rules: ShardingRules | None = None, *, rngs: nnx.Rngs):
        c = config
        rules = rules or ShardingRules()
        pd, std = dtype_of(c.param_dtype), c.initializer_range
        self.embed = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd, std=std)
        self.dense_layers = _stack(c, rules, False, c.num_dense_layers, rngs) if c.num_dense_layers else None
        self.moe_layers = _stack(c, rules, True, c.num_moe_layers, rngs) if c.num_moe_layers else None
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, pd, rngs=rngs)
        self.lm_head = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), pd, std=std)  # HF layout [v, d]
        self.config, self.rules = c, rules

    def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        """Final-normed hidden states [b, t, d] and per-layer stats, stacked over layers, keyed by stack name."""
        c = self.config
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq, attn_factor = yarn_inv_freq(c)
        cos, sin = rope_cos_sin(positions_bt, inv_freq, attn_factor)
        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dtype_of(c.dtype))
        x = constrain(x, self.rules, ("batch", "act_seq", "act_embed"))
        stats = {}
        for name, stack in (("dense_layers", self.dense_layers), ("moe_layers", self.moe_layers)):
            if stack is not None:
                x, stats[name] = self._run_stack(stack, x, cos, sin, segment_ids_bt)
        return self.final_norm(x), stats

    def _run_stack(self, stack: Block, x, cos, sin, segment_ids):
        graphdef, state = nnx.split(stack)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, cos, sin, segment_ids)

        if self.config.remat_policy != "none":
            body = jax.checkpoint(body, policy=_REMAT[self.config.remat_policy])
        if self.config.scan_layers:
            return jax.lax.scan(body, x, state)
        n = jax.tree.leaves(state)[0].shape[0]
        outs = []
        for i in range(n):
            x, s = body(x, jax.tree.map(lambda a: a[i], state))
            outs.append(s)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        """Logits [b, t, vocab] in float32 for int tokens [b, t]."""
        h, _ = self.hidden(tokens_bt, positions_bt, segment_ids_bt)
        return self.logits_from_hidden(h)

    def logits_from_hidden(self, h_btd):
        """lm_head projection of hidden states [..., d] -> float32 logits [..., vocab]."""
        dt = dtype_of(self.config.dtype)
        logits = jnp.einsum("...d,vd->...v", h_btd.astype(dt), self.lm_head[...].astype(dt),
                            preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, self.rules, ("batch", "act_seq", "act_vocab"))
        return logits
