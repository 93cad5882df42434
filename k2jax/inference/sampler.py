"""The sampler: prefill, then a jitted decode step, both calls of the model's one forward path with a cache that
holds only MLA's normalised KV latent and rotary key per token (k2jax.model.cache); the whole token loop runs
on device unless a stream callback asks for each token."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.errors import DecodeError
from k2jax.model import cache as kv_cache
from k2jax.model.sharding import batch_divisor, constrain

CACHE_ROUND = 64  # cache lengths are rounded up to this, so nearby request lengths share one compilation
# longer prompts are written this many tokens at a time: prefill memory stays that of one chunk (README, "Long
# context"); a shorter prompt goes in whole, as one full forward
PREFILL_CHUNK = 2048


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


class Sampler:
    """Prefill + decode for a k2jax Model (its state and mesh); the cache dtype is float32, bfloat16 or int8."""

    def __init__(self, model, cache_dtype: str = "float32", prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.cache_dtype = model, kv_cache.check_cache_dtype(cache_dtype)
        if prefill_chunk < 0:
            raise DecodeError(f"prefill_chunk must be >= 0 (0: the whole prompt at once), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.config = model.config

    def cache_bytes_per_token(self) -> int:
        """Bytes of cache per token and layer (the latent plus the rope key, and int8 scales)."""
        return kv_cache.bytes_per_token(self.config, self.cache_dtype)

    def _empty_cache(self, module, batch: int, max_len: int) -> dict:
        cache = {}
        for name, stack in module.stacks():
            layers = jax.tree.leaves(nnx.state(stack))[0].shape[0]
            entry = kv_cache.empty_cache(self.config, layers, batch, max_len, self.cache_dtype)
            cache[name] = {k: constrain(v, self.model.rules, ("layers", "batch", "cache_seq", None)) for k, v in entry.items()}
        return cache

    def _prefill_fn(self, state, tokens_bt, lengths_b, max_len: int):
        """Logits [b, v] at each prompt's last token and the cache (sized max_len) of the right-padded prompts."""
        module = nnx.merge(self.model.graphdef, state)
        cache = self._empty_cache(module, tokens_bt.shape[0], max_len)
        # the prompts are written from position 0: their own keys are the whole cache so far
        logits, cache, _ = module.forward(tokens_bt, cache=cache, cache_len=tokens_bt.shape[1], select_b=lengths_b - 1)
        return logits, cache

    def _empty_fn(self, state, batch: int, max_len: int):
        return self._empty_cache(nnx.merge(self.model.graphdef, state), batch, max_len)

    def _prefill_chunk_fn(self, state, cache, logits_bv, tokens_bc, start, lengths_b):
        """The prompts' tokens at positions start..start+c, written to the cache and attending to every earlier
        one; each prompt whose last token lies in this chunk takes its logits [b, v] from here."""
        module = nnx.merge(self.model.graphdef, state)
        b, c = tokens_bc.shape
        positions = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
        last = lengths_b - 1 - start
        out, cache, _ = module.forward(tokens_bc, positions, cache=cache, select_b=jnp.clip(last, 0, c - 1))
        return jnp.where(((last >= 0) & (last < c))[:, None], out, logits_bv), cache

    def _decode_fn(self, state, cache, tokens_b, pos_b):
        """One token per sequence at positions pos [b]; (logits [b, v], cache)."""
        module = nnx.merge(self.model.graphdef, state)
        logits, cache, _ = module.forward(tokens_b[:, None], pos_b[:, None], cache=cache)
        return logits[:, 0], cache

    # ------------------------------------------------------------------ jitted entry points
    @functools.cached_property
    def _jit_prefill(self):
        return jax.jit(self._prefill_fn, static_argnums=(3,))

    @functools.cached_property
    def _jit_empty(self):
        return jax.jit(self._empty_fn, static_argnums=(1, 2))

    @functools.cached_property
    def _jit_prefill_chunk(self):
        return jax.jit(self._prefill_chunk_fn, donate_argnums=(1, 2))

    @functools.cached_property
    def jit_decode_step(self):
        """(state, cache, tokens [b], pos [b]) -> (logits [b, v], cache), the cache donated."""
        return jax.jit(self._decode_fn, donate_argnums=(1,))

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int):
        """Pads prompts (right) to one length; returns (last-token logits [b, v], cache, lengths [b]).

        With `prefill_chunk`, prompts longer than it are written `prefill_chunk` tokens at a time, each chunk
        attending to the cache written so far: the activations are a chunk's and the attention scores a chunk
        against the cache, not the whole prompt against itself (one compilation for the chunks, one for a
        shorter last chunk)."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        t = int(lengths.max())
        tokens = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        c = self.prefill_chunk
        with jax.set_mesh(self.model.mesh):
            if not c or t <= c:
                logits, cache = self._jit_prefill(self.model.state, tokens, lengths, max_len)
                return logits, cache, lengths
            cache = self._jit_empty(self.model.state, len(prompts), max_len)
            logits = jnp.zeros((len(prompts), self.config.vocab_size), jnp.float32)
            for start in range(0, t, c):
                logits, cache = self._jit_prefill_chunk(self.model.state, cache, logits, tokens[:, start:start + c],
                                                        jnp.int32(start), jnp.asarray(lengths))
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
                 stream=None, first_allowed: Sequence[np.ndarray | None] | None = None) -> list[list[int]]:
        """New token ids per prompt (each ends at its first stop token, which is included, or at max_new_tokens).

        `stop`: token ids for every sequence, or one list per sequence. `stream(step, tokens [b], done [b])` is
        called after each token when given (the CLI prints from it). `first_allowed`: per prompt, the ids its first
        token is drawn from (None: any), the others' probabilities set to zero (token healing).
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
        if first_allowed is not None and any(a is not None for a in first_allowed):
            if len(first_allowed) != n:
                raise DecodeError(f"first_allowed: expected one entry per prompt ({n}), got {len(first_allowed)}")
            mask = np.ones(logits.shape, bool)
            for i, allowed in enumerate(first_allowed):
                if allowed is not None:
                    mask[i] = False
                    mask[i, np.asarray(allowed)] = True
            logits = jnp.where(mask, logits, -jnp.inf)  # the allowed set's mass, renormalised by the softmax
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
