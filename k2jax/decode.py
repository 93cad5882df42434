"""Autoregressive decoding apart from the training code: prefill, then a jitted decode step over a cache that
holds only MLA's normalised KV latent and rotary key per token (kv_lora_rank + qk_rope_head_dim values)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.layers.attention import attention_mask
from k2jax.layers.common import dtype_of
from k2jax.layers.rope import rope_cos_sin, yarn_inv_freq
from k2jax.sharding import batch_divisor, constrain

CACHE_DTYPES = ("float32", "bfloat16", "int8")
CACHE_ROUND = 64  # cache lengths are rounded up to this, so nearby request lengths share one compilation


class DecodeError(ValueError):
    """A request that cannot be decoded (prompt too long, bad ids, ...); the message names the argument."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The sampler's state: per-stack cache {latent [L,b,s,c], k_rope [L,b,s,r] (+ int8 scales)}, next write
    position [b], last sampled token [b], done flags [b], tokens generated so far [b, max_new], rng."""

    cache: dict
    pos: jax.Array
    last: jax.Array
    done: jax.Array
    out: jax.Array
    n_new: jax.Array
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sample_logits(logits_bv: jax.Array, key: jax.Array, p: SamplingParams) -> jax.Array:
    """Token ids [b]: greedy at temperature 0, else temperature / top-k / top-p sampling."""
    if p.temperature <= 0 or p.top_k == 1:
        return jnp.argmax(logits_bv, -1).astype(jnp.int32)
    logits = logits_bv / p.temperature
    if p.top_k > 0:
        kth = jax.lax.top_k(logits, p.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if p.top_p < 1.0:
        sorted_desc = jnp.sort(logits, -1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, -1)
        keep = jnp.cumsum(probs, -1) - probs < p.top_p  # smallest prefix whose mass reaches top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _depth(layers) -> int:
    """Number of layers in a stacked layer state."""
    return jax.tree.leaves(layers)[0].shape[0]


def _quantize(x):
    scale = jnp.maximum(jnp.abs(x).max(-1, keepdims=True), 1e-8) / 127.0
    return jnp.round(x / scale).astype(jnp.int8), scale.astype(jnp.float32)


class Sampler:
    """Prefill + decode for a k2jax Model (its state and mesh); the cache dtype is float32, bfloat16 or int8."""

    def __init__(self, model, cache_dtype: str = "float32"):
        if cache_dtype not in CACHE_DTYPES:
            raise DecodeError(f"cache_dtype: expected one of {CACHE_DTYPES}, got {cache_dtype!r}")
        self.model, self.cache_dtype = model, cache_dtype
        self.config = model.config
        self.inv_freq, self.attn_factor = yarn_inv_freq(self.config)

    # ------------------------------------------------------------------ cache
    def cache_bytes_per_token(self) -> int:
        """Bytes of cache per token and layer (the latent plus the rope key, and int8 scales)."""
        c = self.config
        n = c.kv_lora_rank + c.qk_rope_head_dim
        if self.cache_dtype == "int8":
            return n + 2 * 4
        return n * jnp.dtype(self.cache_dtype).itemsize

    def _store(self, x):
        if self.cache_dtype == "int8":
            return _quantize(x)
        return x.astype(self.cache_dtype), None

    def _load(self, entry, name):
        if self.cache_dtype == "int8":
            return entry[name].astype(jnp.float32) * entry[name + "_scale"]
        return entry[name]

    # ------------------------------------------------------------------ layers
    @staticmethod
    def _stacks(module):
        """(name, graphdef, stacked layer state, the routed kernels of every layer or None) of each stack.

        The scans below hand each MoE layer the stacked kernels and its index, so that only the chosen experts
        are read (in place); the scan's own slice of them goes unused and is not computed.
        """
        for name in ("dense_layers", "moe_layers"):
            stack = getattr(module, name)
            if stack is not None:
                kernels = (stack.mlp.wg[...], stack.mlp.wu[...], stack.mlp.wd[...]) if name == "moe_layers" else None
                yield (name, *nnx.split(stack), kernels)

    def _embed(self, module, tokens):
        return jnp.take(module.embed[...], tokens, axis=0).astype(dtype_of(self.config.dtype))

    def _ffn(self, blk, h, kernels, layer):
        if blk.is_moe:
            return blk.mlp(blk.mlp_norm(h), stacked=(*kernels, layer))[0]
        return blk.mlp(blk.mlp_norm(h))

    def _prefill_fn(self, state, tokens_bt, max_len: int):
        """Expanded-form forward over padded prompts; returns (hidden [b,t,d], cache sized max_len)."""
        module = nnx.merge(self.model.graphdef, state)
        b, t = tokens_bt.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(pos, self.inv_freq, self.attn_factor)
        x = self._embed(module, tokens_bt)
        mask = attention_mask(None, t)
        cache = {}
        for name, graphdef, layers, kernels in self._stacks(module):

            def body(h, inp, graphdef=graphdef, kernels=kernels):
                layer_state, layer = inp
                blk = nnx.merge(graphdef, layer_state)
                q_nope, q_rope, lat, kr = blk.attn.project(blk.attn_norm(h), cos, sin)
                out, _ = blk.attn.attend_expanded(q_nope, q_rope, lat, kr, mask)
                h = h + out
                h = h + self._ffn(blk, h, kernels, layer)
                pad = ((0, 0), (0, max_len - t), (0, 0))
                return h, (jnp.pad(lat, pad), jnp.pad(kr, pad))

            x, (lat, kr) = jax.lax.scan(body, x, (layers, jnp.arange(_depth(layers))))
            cache[name] = self._cache_entry(lat, kr)
        return module.final_norm(x), cache

    def _cache_entry(self, lat, kr):
        lat_q, lat_s = self._store(lat)
        kr_q, kr_s = self._store(kr)
        entry = {"latent": lat_q, "k_rope": kr_q}
        if lat_s is not None:
            entry.update(latent_scale=lat_s, k_rope_scale=kr_s)
        names = {"latent": ("layers", "batch", None, None), "k_rope": ("layers", "batch", None, None),
                 "latent_scale": ("layers", "batch", None, None), "k_rope_scale": ("layers", "batch", None, None)}
        return {k: constrain(v, self.model.rules, names[k]) for k, v in entry.items()}

    def _decode_fn(self, state, cache, tokens_b, pos_b):
        """One token per sequence at positions pos [b] with the absorbed latent cache; (logits [b,v], cache)."""
        module = nnx.merge(self.model.graphdef, state)
        b = tokens_b.shape[0]
        cos, sin = rope_cos_sin(pos_b[:, None], self.inv_freq, self.attn_factor)
        x = self._embed(module, tokens_b[:, None])
        new_cache = {}
        rows = jnp.arange(b)
        for name, graphdef, layers, kernels in self._stacks(module):

            def body(carry, inp, graphdef=graphdef, kernels=kernels):
                # the stacked cache is carried and written in place (one token per row); scanning over it and
                # returning each layer's entry would rewrite the whole cache every step
                h, stack = carry
                layer_state, layer = inp
                blk = nnx.merge(graphdef, layer_state)
                q_nope, q_rope, lat, kr = blk.attn.project(blk.attn_norm(h), cos, sin)
                lat_q, lat_s = self._store(lat[:, 0])
                kr_q, kr_s = self._store(kr[:, 0])
                new = {"latent": lat_q, "k_rope": kr_q}
                if lat_s is not None:
                    new.update(latent_scale=lat_s, k_rope_scale=kr_s)
                stack = {k: v.at[layer, rows, pos_b].set(new[k]) for k, v in stack.items()}
                entry = {k: v[layer] for k, v in stack.items()}
                s = entry["latent"].shape[1]
                mask = (jnp.arange(s)[None, :] <= pos_b[:, None])[:, None, None, :]
                out = blk.attn.attend_absorbed(q_nope, q_rope, self._load(entry, "latent"),
                                               self._load(entry, "k_rope"), mask)
                h = h + out
                return (h + self._ffn(blk, h, kernels, layer), stack), None

            (x, new_cache[name]), _ = jax.lax.scan(body, (x, cache[name]), (layers, jnp.arange(_depth(layers))))
        logits = module.logits_from_hidden(module.final_norm(x))[:, 0]
        return logits, new_cache

    # ------------------------------------------------------------------ jitted entry points
    @functools.cached_property
    def _jit_prefill(self):
        def f(state, tokens, lengths, max_len):
            h, cache = self._prefill_fn(state, tokens, max_len)
            module = nnx.merge(self.model.graphdef, state)
            last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
            return module.logits_from_hidden(last)[:, 0], cache

        return jax.jit(f, static_argnums=(3,))

    @functools.cached_property
    def jit_decode_step(self):
        """(state, cache, tokens [b], pos [b]) -> (logits [b, v], cache), the cache donated."""
        return jax.jit(self._decode_fn, donate_argnums=(1,))

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int):
        """Pads prompts (right) to one length; returns (last-token logits [b, v], cache, lengths [b])."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        t = int(lengths.max())
        tokens = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        with jax.set_mesh(self.model.mesh):
            logits, cache = self._jit_prefill(self.model.state, tokens, lengths, max_len)
        return logits, cache, lengths

    def check_request(self, prompts, max_new_tokens: int) -> int:
        """Validates a request before any compilation; returns the cache length it needs."""
        c = self.config
        if not prompts:
            raise DecodeError("prompts: expected at least one prompt")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise DecodeError(f"prompts[{i}] is empty")
            bad = [t for t in p if not 0 <= int(t) < c.vocab_size]
            if bad:
                raise DecodeError(f"prompts[{i}] has token ids outside [0, vocab_size={c.vocab_size}): {bad[:5]}")
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        need = max(len(p) for p in prompts) + max_new_tokens
        if need > c.max_position_embeddings:
            raise DecodeError(f"prompt length {max(len(p) for p in prompts)} + max_new_tokens {max_new_tokens} = "
                              f"{need} exceeds the model's context (max_position_embeddings="
                              f"{c.max_position_embeddings})")
        return min(-(-need // CACHE_ROUND) * CACHE_ROUND, c.max_position_embeddings)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[int] | Sequence[Sequence[int]] = (),
                 stream=None) -> list[list[int]]:
        """New token ids per prompt (each ends at its first stop token, which is included, or at max_new_tokens).

        `stop`: token ids for every sequence, or one list per sequence. `stream(step, tokens [b], done [b])` is
        called after each token when given (the CLI prints from it).
        """
        prompts = [list(map(int, p)) for p in prompts]
        max_len = self.check_request(prompts, max_new_tokens)
        n = len(prompts)
        pad = -n % batch_divisor(self.model.mesh, self.model.rules)
        prompts_padded = prompts + [prompts[-1]] * pad
        stops = [list(stop)] * n if not stop or isinstance(stop[0], int) else [list(s) for s in stop]
        if len(stops) != n:
            raise DecodeError(f"stop: expected one list per prompt ({n}), got {len(stops)}")
        width = max(1, max(len(s) for s in stops))
        stop_arr = np.full((n + pad, width), -1, np.int32)
        for i, s in enumerate(stops):
            stop_arr[i, : len(s)] = s
        params = SamplingParams(float(temperature), int(top_k), float(top_p))
        logits, cache, lengths = self.prefill(prompts_padded, max_len)
        key = jax.random.key(seed)
        if stream is None:  # the whole loop on device: no host round trip per token
            with jax.set_mesh(self.model.mesh):
                out, n_new, _ = self._jit_loop(self.model.state, cache, logits, jnp.asarray(lengths),
                                            jnp.asarray(stop_arr), key, max_new_tokens, params)
            out, n_new = np.asarray(out), np.asarray(n_new)
            return [out[i, : n_new[i]].tolist() for i in range(n)]
        pos = jnp.asarray(lengths)
        done = np.zeros(n + pad, bool)
        outs = [[] for _ in range(n)]
        with jax.set_mesh(self.model.mesh):
            for step in range(max_new_tokens):
                key, sub = jax.random.split(key)
                tok = np.asarray(self._sample(logits, sub, params))
                for i in range(n):
                    if not done[i]:
                        outs[i].append(int(tok[i]))
                done = done | (stop_arr == tok[:, None]).any(-1)
                stream(step, tok[:n], done[:n])
                if done[:n].all() or step == max_new_tokens - 1:
                    break
                logits, cache = self.jit_decode_step(self.model.state, cache, jnp.asarray(tok), pos)
                pos = pos + 1
        return outs

    def _loop_fn(self, state, cache, logits, pos, stop_arr, key, max_new: int, params: SamplingParams):
        """Samples up to max_new tokens per row in a lax.while_loop; (tokens [b, max_new], counts [b])."""
        b = logits.shape[0]

        def emit(st: DecodeState, logits, step):
            rng, sub = jax.random.split(st.rng)
            tok = sample_logits(logits, sub, params)
            live = ~st.done
            out = st.out.at[:, step].set(jnp.where(live, tok, -1))
            done = st.done | (stop_arr == tok[:, None]).any(-1)
            return dataclasses.replace(st, last=tok, done=done, out=out, n_new=st.n_new + live, rng=rng)

        st = DecodeState(cache=cache, pos=pos, last=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                         out=jnp.full((b, max_new), -1, jnp.int32), n_new=jnp.zeros((b,), jnp.int32), rng=key)
        st = emit(st, logits, 0)

        def cond(carry):
            step, st = carry
            return (step < max_new) & ~st.done.all()

        def body(carry):
            step, st = carry
            logits, cache = self._decode_fn(state, st.cache, st.last, st.pos)
            st = dataclasses.replace(st, cache=cache, pos=st.pos + 1)
            return step + 1, emit(st, logits, step)

        _, st = jax.lax.while_loop(cond, body, (jnp.int32(1), st))
        return st.out, st.n_new, st.cache  # the cache is returned so that its donated buffers are reused

    @functools.cached_property
    def _jit_loop(self):
        return jax.jit(self._loop_fn, static_argnums=(6, 7), donate_argnums=(1,))

    @functools.cached_property
    def _sample(self):
        return jax.jit(sample_logits, static_argnums=(2,))
