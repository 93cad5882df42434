"""Multi-head latent attention (MLA) with decoupled YaRN RoPE, causal and segment masking; with a cache, the
same layer writes the new tokens' latent and rope key and attends over the cached ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from k2jax.model import cache as kv_cache
from k2jax.model.layers.blockwise import blockwise_attention
from k2jax.model.layers.common import RMSNorm, dtype_of, param
from k2jax.model.layers.lora import Adapter
from k2jax.model.layers.rope import apply_rope
from k2jax.model.sharding import ShardingRules, constrain

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: DeepseekV3RMSNorm's default, whatever rms_norm_eps


def attention_mask(segment_ids_bt: jax.Array | None, t: int) -> jax.Array:
    """Boolean [b or 1, 1, t, t]: causal, and within one segment (packed documents never attend across)."""
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if segment_ids_bt is None:
        return causal
    same = segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]
    return causal & same


class MLAttention(nnx.Module):
    """MLA: q = W_qb·norm(W_qa·x); [c_kv ‖ k_rope] = W_kva·x; [k_nope ‖ v] = W_kvb·norm(c_kv)."""

    def __init__(self, config, execution, rules: ShardingRules, *, rngs: nnx.Rngs, lora=None):
        c, run = config, execution
        self.q_a = param(rngs, "attn.q_a", (c.hidden_size, c.q_lora_rank), c, run)
        # the latent norms use a fixed epsilon in the official model code (and HF's), not config.rms_norm_eps
        self.q_norm = RMSNorm("attn.q_norm", c.q_lora_rank, c, run, rngs=rngs, eps=LATENT_NORM_EPS)
        self.q_b = param(rngs, "attn.q_b", (c.q_lora_rank, c.num_attention_heads, c.qk_head_dim), c, run)
        self.kv_a = param(rngs, "attn.kv_a", (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim), c, run)
        self.kv_norm = RMSNorm("attn.kv_norm", c.kv_lora_rank, c, run, rngs=rngs, eps=LATENT_NORM_EPS)
        self.kv_b = param(rngs, "attn.kv_b", (c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim),
                          c, run)
        self.o = param(rngs, "attn.o", (c.num_attention_heads, c.v_head_dim, c.hidden_size), c, run)
        h = c.num_attention_heads
        shapes = {"q_a": ((c.hidden_size,), (c.q_lora_rank,)), "q_b": ((c.q_lora_rank,), (h, c.qk_head_dim)),
                  "kv_a": ((c.hidden_size,), (c.kv_lora_rank + c.qk_rope_head_dim,)),
                  "kv_b": ((c.kv_lora_rank,), (h, c.qk_nope_head_dim + c.v_head_dim)),
                  "o": ((h, c.v_head_dim), (c.hidden_size,))}
        for name, (ins, outs) in shapes.items():  # the adapters of a LoRA run (None otherwise)
            adapted = lora is not None and lora.adapts(f"attn.{name}")
            setattr(self, f"{name}_lora", Adapter(f"attn.{name}", ins, outs, lora, c, run, rngs=rngs)
                    if adapted else None)
        self.config, self.rules, self.dtype, self.chunk = c, rules, dtype_of(run.dtype), run.attn_chunk

    def _proj(self, name: str, eq: str, x: jax.Array, key=None) -> jax.Array:
        """x times the kernel `name` (an einsum `eq`), plus its adapter's low-rank update in a LoRA run."""
        y = jnp.einsum(eq, x, getattr(self, name)[...].astype(self.dtype))
        adapter = getattr(self, f"{name}_lora")
        return y if adapter is None else y + adapter(x, key)

    def project(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, key=None):
        """Queries q_nope [b,t,h,n], q_rope [b,t,h,r] and the normalised latent c [b,t,c], rotated k_rope [b,t,r]
        (`key`: the adapters' dropout key)."""
        c, dt = self.config, self.dtype
        x = x_btd.astype(dt)
        q_btq = self.q_norm(checkpoint_name(self._proj("q_a", "btd,dq->btq", x, key), "attn_lora"))
        q_bthk = self._proj("q_b", "btq,qhk->bthk", q_btq, key)
        q_bthk = checkpoint_name(constrain(q_bthk, self.rules, ("batch", "act_seq", "act_heads", None)), "attn_q")
        q_nope, q_rope = q_bthk[..., : c.qk_nope_head_dim], q_bthk[..., c.qk_nope_head_dim:]
        kv_btc = checkpoint_name(self._proj("kv_a", "btd,dc->btc", x, key), "attn_lora")
        latent_btc = self.kv_norm(kv_btc[..., : c.kv_lora_rank])
        k_rope_btr = apply_rope(kv_btc[..., c.kv_lora_rank:], cos, sin)
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None])
        return q_nope, q_rope, latent_btc, k_rope_btr

    def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_bt: jax.Array | None = None,
                 *, cache: dict | None = None, layer=None, positions_bt: jax.Array | None = None,
                 cache_len: int | None = None, key=None):
        """Self-attention over x [b, t, d]; returns (out [b, t, d], max pre-softmax logit per head [h], cache).

        Without a cache: causal attention within each segment (training, a full forward). With one (a stack's
        cache and this layer's index in it): the tokens' latent and rope key are written at `positions_bt`
        [b, t], then the queries attend over every cached position up to their own: a single token in the
        latent space (`attend_absorbed`, decode), several with keys expanded per head (prefill). `cache_len`
        (static) reads only the cache's first slots when no query reaches past them (a prompt from position 0).
        The max logit is only computed without a cache (None otherwise). `key`: the adapters' dropout key.
        """
        q_nope, q_rope, latent_btc, k_rope_btr = self.project(x_btd, cos, sin, key)
        if cache is not None:
            cache = kv_cache.write(cache, layer, positions_bt, latent_btc, k_rope_btr)
            latent_bsc, k_rope_bsr = kv_cache.read(cache, layer, cache_len)
            s = latent_bsc.shape[1]
            mask = (jnp.arange(s)[None, None, :] <= positions_bt[:, :, None])[:, None]  # [b, 1, t, s]
            if x_btd.shape[1] == 1:
                return self.attend_absorbed(q_nope, q_rope, latent_bsc, k_rope_bsr, mask), None, cache
            return self.attend_expanded(q_nope, q_rope, latent_bsc, k_rope_bsr, mask)[0], None, cache
        t, chunk = x_btd.shape[1], self.chunk
        if 0 < chunk < t and t % chunk == 0:
            return (*self.attend_chunked(q_nope, q_rope, latent_btc, k_rope_btr, segment_ids_bt, chunk, key), None)
        mask = attention_mask(segment_ids_bt, t)
        real = mask if segment_ids_bt is None else mask & (segment_ids_bt != 0)[:, None, :, None]
        out, scores = self.attend_expanded(q_nope, q_rope, latent_btc, k_rope_btr, mask, key)
        max_logit_h = jnp.max(jnp.where(real, scores, -jnp.inf), axis=(0, 2, 3))
        return out, jax.lax.stop_gradient(max_logit_h), None

    def attend_expanded(self, q_nope, q_rope, latent_bsc, k_rope_bsr, mask, key=None):
        """Attention with keys/values expanded per head from the latent; returns (out [b,t,d], scores [b,h,t,s])."""
        k_nope, v_bshv = self._expand_kv(latent_bsc, key)
        scores, probs = self._softmax(q_nope, q_rope, k_nope, k_rope_bsr, mask)
        out_bthv = checkpoint_name(jnp.einsum("bhts,bshv->bthv", probs, v_bshv), "attn_out")
        return self._proj("o", "bthv,hvd->btd", out_bthv, key), scores

    def _expand_kv(self, latent_bsc, key=None):
        """Per-head keys k_nope [b,s,h,n] and values v [b,s,h,v] from the normalised latent."""
        c, dt = self.config, self.dtype
        kv_bshk = self._proj("kv_b", "bsc,chk->bshk", latent_bsc.astype(dt), key)
        kv_bshk = checkpoint_name(constrain(kv_bshk, self.rules, ("batch", "act_seq", "act_heads", None)), "attn_kv")
        return kv_bshk[..., : c.qk_nope_head_dim], kv_bshk[..., c.qk_nope_head_dim:]

    def _softmax(self, q_nope, q_rope, k_nope, k_rope_bsr, mask):
        """(scaled float32 scores [b,h,t,s], masked softmax probabilities in the compute dtype)."""
        c, dt = self.config, self.dtype
        scores = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthr,bsr->bhts", q_rope, k_rope_bsr.astype(dt), preferred_element_type=jnp.float32)
        scores *= c.softmax_scale
        return scores, jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(dt)

    def attend_chunked(self, q_nope, q_rope, latent_btc, k_rope_btr, segment_ids_bt, chunk: int, key=None):
        """Causal attention in query chunks and key blocks of `chunk` tokens, an online softmax over the blocks up
        to each chunk's own (k2jax.model.layers.blockwise: flash-style, its backward recomputing each block), so
        no step holds more than [b, h, chunk, chunk] scores. Returns (out [b,t,d], max pre-softmax logit per
        head [h])."""
        k_nope, v_bshv = self._expand_kv(latent_btc, key)
        b, t = q_nope.shape[:2]
        seg = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
        out_bthv, max_logit_h = blockwise_attention(q_nope, q_rope, k_nope, k_rope_btr, v_bshv, seg, chunk,
                                                    self.config.softmax_scale)
        out_bthv = checkpoint_name(out_bthv.astype(self.dtype), "attn_out")
        return self._proj("o", "bthv,hvd->btd", out_bthv, key), jax.lax.stop_gradient(max_logit_h)

    def attend_absorbed(self, q_nope, q_rope, latent_bsc, k_rope_bsr, mask):
        """Attention in the latent space (decode): W_kvb's key half absorbed into q, its value half applied after.

        Keys and values are never expanded per head: each cached token costs kv_lora_rank + rope values. An
        adapter on kv_b (W + s·A·B) is absorbed by its factors, never formed as a dense [c, h, n+v] update.
        """
        c, dt = self.config, self.dtype
        n = c.qk_nope_head_dim
        kv_b = self.kv_b[...].astype(dt)
        q_lat = jnp.einsum("bthn,chn->bthc", q_nope, kv_b[..., :n])
        adapter = self.kv_b_lora
        if adapter is not None:
            a_cr, b_rhk = adapter.a[...].astype(dt), adapter.b[...].astype(dt) * adapter.scale
            q_lat += jnp.einsum("bthr,cr->bthc", jnp.einsum("bthn,rhn->bthr", q_nope, b_rhk[..., :n]), a_cr)
        scores = jnp.einsum("bthc,bsc->bhts", q_lat, latent_bsc.astype(dt), preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthr,bsr->bhts", q_rope, k_rope_bsr.astype(dt), preferred_element_type=jnp.float32)
        scores *= c.softmax_scale
        probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(dt)
        o_lat = jnp.einsum("bhts,bsc->bthc", probs, latent_bsc.astype(dt))
        out_bthv = jnp.einsum("bthc,chv->bthv", o_lat, kv_b[..., n:])
        if adapter is not None:
            out_bthv += jnp.einsum("bthr,rhv->bthv", jnp.einsum("bthc,cr->bthr", o_lat, a_cr), b_rhk[..., n:])
        return self._proj("o", "bthv,hvd->btd", out_bthv)
