"""Multi-head latent attention (MLA) with decoupled YaRN RoPE, causal and segment masking; with a cache, the
same layer writes the new tokens' latent and rope key and attends over the cached ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from k2jax.model import cache as kv_cache
from k2jax.model.layers.blockwise import blockwise_attention, online_softmax_step
from k2jax.model.layers.context import context_attention, context_size
from k2jax.model.factory import dtype_of, param
from k2jax.model.layers.common import RMSNorm, pallas_mode
from k2jax.model.layers.lora import Adapter
from k2jax.model.layers.rope import apply_rope
from k2jax.model.layers.splash import splash_attention, splash_fits
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
        self.pallas = pallas_mode(run)  # training attention by the splash kernel ('compiled' or 'interpret')

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
            mesh = jax.sharding.get_abstract_mesh()
            seq_axes = () if mesh.empty else tuple(a for a in self.rules.mesh_axes("cache_seq")
                                                   if mesh.shape.get(a, 1) > 1)
            cache = kv_cache.write(cache, layer, positions_bt, latent_btc, k_rope_btr, seq_axes)
            latent_bsc, k_rope_bsr = kv_cache.read(cache, layer, cache_len)
            s = latent_bsc.shape[1]
            mask = (jnp.arange(s)[None, None, :] <= positions_bt[:, :, None])[:, None]  # [b, 1, t, s]
            if x_btd.shape[1] == 1:
                return self.attend_absorbed(q_nope, q_rope, latent_bsc, k_rope_bsr, mask), None, cache
            if cache_len is None:  # a chunk of a longer prompt: against the cache written so far, block by block
                return self.attend_latent_blocks(q_nope, q_rope, latent_bsc, k_rope_bsr, positions_bt), None, cache
            block = next((k for k in (256, 128, 512) if s == x_btd.shape[1] and s % k == 0 and s > k), 0)
            if block:  # a whole prompt from position 0: causal blocks only, never [t, t] scores
                k_nope, v_bshv = self._expand_kv(latent_bsc)
                seg = jnp.ones(x_btd.shape[:2], jnp.int32)
                out_bthv, _ = blockwise_attention(q_nope, q_rope, k_nope, k_rope_bsr.astype(self.dtype), v_bshv, seg,
                                                  block, self.config.softmax_scale)
                return self._proj("o", "bthv,hvd->btd", out_bthv.astype(self.dtype)), None, cache
            return self.attend_expanded(q_nope, q_rope, latent_bsc, k_rope_bsr, mask)[0], None, cache
        t, chunk = x_btd.shape[1], self.chunk
        if context_size(self.rules) > 1:  # the sequence split over chips, in the balanced layout (Transformer)
            seg = jnp.ones(x_btd.shape[:2], jnp.int32) if segment_ids_bt is None else segment_ids_bt
            out_bthv, max_logit_h = context_attention(q_nope, q_rope, latent_btc, k_rope_btr, seg,
                                                      lambda lat: self._expand_kv(lat, key), self.rules, chunk,
                                                      self.config.softmax_scale, self.pallas)
            out_bthv = checkpoint_name(out_bthv.astype(self.dtype), "attn_out")
            return self._proj("o", "bthv,hvd->btd", out_bthv, key), jax.lax.stop_gradient(max_logit_h), None
        if self.pallas is not None and splash_fits(t):
            return (*self.attend_splash(q_nope, q_rope, latent_btc, k_rope_btr, segment_ids_bt, key), None)
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
        # every key position on every shard: a context-parallel shard's queries attend over the whole sequence
        kv_bshk = checkpoint_name(constrain(kv_bshk, self.rules, ("batch", None, "act_heads", None)), "attn_kv")
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

    def attend_splash(self, q_nope, q_rope, latent_btc, k_rope_btr, segment_ids_bt, key=None):
        """Causal attention by the Pallas splash kernel (layers/splash.py); returns (out [b,t,d], max pre-softmax
        logit per head [h], from the rows' log-sum-exp: an upper bound within log(keys) of it)."""
        k_nope, v_bshv = self._expand_kv(latent_btc, key)
        seg = jnp.ones(q_nope.shape[:2], jnp.int32) if segment_ids_bt is None else segment_ids_bt
        out_bthv, max_logit_h = splash_attention(q_nope, q_rope, k_nope, k_rope_btr, v_bshv, seg,
                                                 self.config.softmax_scale, self.rules,
                                                 interpret=self.pallas == "interpret")
        out_bthv = checkpoint_name(out_bthv.astype(self.dtype), "attn_out")
        return self._proj("o", "bthv,hvd->btd", out_bthv, key), jax.lax.stop_gradient(max_logit_h)

    def _absorb(self, q_nope):
        """q_nope [b,t,h,n] times W_kvb's key half: queries in the latent space [b,t,h,c] (with a kv_b adapter
        W + s·A·B, by its factors: the dense [c, h, n+v] update is never formed)."""
        n, dt = self.config.qk_nope_head_dim, self.dtype
        q_lat = jnp.einsum("bthn,chn->bthc", q_nope, self.kv_b[...].astype(dt)[..., :n])
        adapter = self.kv_b_lora
        if adapter is not None:
            a_cr, b_rhk = adapter.a[...].astype(dt), adapter.b[...].astype(dt) * adapter.scale
            q_lat += jnp.einsum("bthr,cr->bthc", jnp.einsum("bthn,rhn->bthr", q_nope, b_rhk[..., :n]), a_cr)
        return q_lat

    def _unabsorb(self, o_lat):
        """Attention outputs in the latent space [b,t,h,c] -> the block's output [b,t,d] (W_kvb's value half,
        then W_o)."""
        n, dt = self.config.qk_nope_head_dim, self.dtype
        out_bthv = jnp.einsum("bthc,chv->bthv", o_lat.astype(dt), self.kv_b[...].astype(dt)[..., n:])
        adapter = self.kv_b_lora
        if adapter is not None:
            a_cr, b_rhk = adapter.a[...].astype(dt), adapter.b[...].astype(dt) * adapter.scale
            out_bthv += jnp.einsum("bthr,rhv->bthv", jnp.einsum("bthc,cr->bthr", o_lat.astype(dt), a_cr),
                                   b_rhk[..., n:])
        return self._proj("o", "bthv,hvd->btd", out_bthv)

    def attend_absorbed(self, q_nope, q_rope, latent_bsc, k_rope_bsr, mask):
        """Attention in the latent space (decode): W_kvb's key half absorbed into q, its value half applied after.

        Keys and values are never expanded per head: each cached token costs kv_lora_rank + rope values.
        """
        dt = self.dtype
        q_lat = self._absorb(q_nope)
        scores = jnp.einsum("bthc,bsc->bhts", q_lat, latent_bsc.astype(dt), preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthr,bsr->bhts", q_rope, k_rope_bsr.astype(dt), preferred_element_type=jnp.float32)
        scores *= self.config.softmax_scale
        probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(dt)
        return self._unabsorb(jnp.einsum("bhts,bsc->bthc", probs, latent_bsc.astype(dt)))

    def attend_latent_blocks(self, q_nope, q_rope, latent_bsc, k_rope_bsr, positions_bt):
        """Attention of a prompt chunk over the latent cache in key blocks with an online softmax (chunked
        prefill): only the blocks up to the chunk's last position are read, each block's keys and values are
        expanded from its latent as it is read, and no step holds more than [b, h, t, block] scores or a
        block's keys, whatever the cache's length. (Expanding a block costs once for all the chunk's queries;
        the absorbed form of decode would pay kv_lora_rank per head for every query-key pair instead.)"""
        dt, scale = self.dtype, self.config.softmax_scale
        b, t, h, _ = q_nope.shape
        s = latent_bsc.shape[1]
        kb = next((k for k in (512, 256, 128, 64) if s % k == 0), s)  # cache lengths are multiples of 64
        vd = self.config.v_head_dim

        def block(i, st):
            m, l, acc = st
            k0 = i * kb
            k_nope, v = self._expand_kv(jax.lax.dynamic_slice_in_dim(latent_bsc, k0, kb, 1))
            kr = jax.lax.dynamic_slice_in_dim(k_rope_bsr, k0, kb, 1).astype(dt)
            sc = jnp.einsum("bthn,bshn->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
            sc += jnp.einsum("bthr,bsr->bhts", q_rope, kr, preferred_element_type=jnp.float32)
            visible = (k0 + jnp.arange(kb))[None, None, :] <= positions_bt[:, :, None]  # [b, t, kb]
            return online_softmax_step(m, l, acc, jnp.where(visible[:, None], sc * scale, -jnp.inf), v)

        init = (jnp.full((b, h, t), -jnp.inf, jnp.float32), jnp.zeros((b, h, t), jnp.float32),
                jnp.zeros((b, t, h, vd), jnp.float32))
        n_blocks = jnp.minimum(jnp.max(positions_bt) // kb + 1, s // kb)
        _, l, acc = jax.lax.fori_loop(0, n_blocks, block, init)
        return self._proj("o", "bthv,hvd->btd", (acc / jnp.swapaxes(l, 1, 2)[..., None]).astype(dt))
