"""The user-facing model handle and its constructors: `k2jax.load_hf(dir)`, `k2jax.load(checkpoint)`,
`k2jax.random_model(config)`; then `.logits(token_ids)` and `.generate(prompts)`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from k2jax.errors import CheckpointError, DecodeError
from k2jax.model.config import Execution, K2Config, configure, from_hf_config
from k2jax.model.init import init_model, place
from k2jax.inference.sampler import PREFILL_CHUNK
from k2jax.model.sharding import ShardingRules, batch_divisor, make_mesh


@dataclasses.dataclass(frozen=True)
class Routing:
    """What the routers did for some tokens: each MoE layer's chosen experts and weights per token, the tokens
    routed to each expert, and each layer's largest attention logit per head (the quantity QK-Clip caps)."""

    moe_layers: list[int]  # the model layer index of each MoE layer
    experts: np.ndarray  # [moe layers, b, t, k] int32, by descending weight
    weights: np.ndarray  # [moe layers, b, t, k] float32 (routed_scaling_factor applied)
    load: np.ndarray  # [moe layers, experts] tokens routed to each expert (padding, segment 0, left out)
    max_logit: np.ndarray  # [layers, heads] largest pre-softmax attention logit

    def __repr__(self):
        n, b, t, k = self.experts.shape
        mean = self.load.mean(1, keepdims=True)
        worst = float((self.load / np.maximum(mean, 1e-9)).max()) if self.load.size else 0.0
        return (f"Routing({n} MoE layers x {self.load.shape[1]} experts, top-{k}, {b}x{t} tokens; the busiest expert "
                f"takes {worst:.2f}x its layer's mean load; max attention logit {float(self.max_logit.max()):.2f})")


LONG_GENERATION = 64  # from this many new tokens on, generate shows a progress bar (on a terminal or in a notebook)


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


class Model:
    """A K2 model placed on a mesh: architecture, execution settings, mesh, rules, graphdef and the sharded state."""

    def __init__(self, config: K2Config, graphdef, state, mesh: Mesh, rules: ShardingRules, tokenizer=None, *,
                 execution: Execution | None = None, lora=None):
        self.config, self.graphdef, self.state, self.mesh, self.rules = config, graphdef, state, mesh, rules
        self.lora = lora  # the LoraConfig of a model carrying unmerged adapters
        self.execution = execution or Execution()
        self.tokenizer = tokenizer
        self._samplers = {}

    def __repr__(self):
        from k2jax.model.init import param_count

        c, run = self.config, self.execution
        total, active = param_count(c)
        axes = ",".join(f"{a}={n}" for a, n in self.mesh.shape.items() if n > 1) or "one device"
        extras = ([f"LoRA rank {self.lora.rank} on {','.join(self.lora.targets)} (unmerged)"] if self.lora else []) + \
            ([f"tokenizer {self.tokenizer.path}"] if self.tokenizer is not None else [])
        return "\n".join([
            f"k2jax.Model: {c.num_hidden_layers} layers ({c.num_dense_layers} dense + {c.num_moe_layers} MoE), hidden "
            f"{c.hidden_size}, {c.num_attention_heads} MLA heads (q latent {c.q_lora_rank}, kv latent {c.kv_lora_rank}), "
            f"{c.n_routed_experts} routed experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared, vocab "
            f"{c.vocab_size}, context {c.max_position_embeddings}",
            f"  {_count(total)} parameters ({_count(active)} active per token), {run.param_dtype} weights computing in "
            f"{run.dtype}; mesh {axes} ({self.mesh.size} devices)", *(f"  {e}" for e in extras)])

    def with_execution(self, execution: Execution | None = None, **changes) -> "Model":
        """The same weights run with other execution settings (a new graph over the same arrays, nothing copied)."""
        from k2jax.model.init import abstract_model

        execution = (execution or self.execution).replace(**changes)
        graphdef, _ = abstract_model(self.config, self.rules, execution=execution, lora=self.lora)
        return Model(self.config, graphdef, self.state, self.mesh, self.rules, self.tokenizer, execution=execution,
                     lora=self.lora)

    def attach_tokenizer(self, tokenizer_or_path) -> "Model":
        """Attaches a k2jax Tokenizer (or the path of a tiktoken.model), checked against the config."""
        from k2jax.text.tokenizer import Tokenizer, load_tokenizer

        tok = tokenizer_or_path if isinstance(tokenizer_or_path, Tokenizer) else load_tokenizer(tokenizer_or_path)
        tok.check_model(self.config)
        self.tokenizer = tok
        return self

    def sampler(self, cache_dtype: str = "float32", prefill_chunk: int = PREFILL_CHUNK):
        """The decode Sampler of this model (one per cache dtype and prefill chunk)."""
        from k2jax.inference.sampler import Sampler

        if (cache_dtype, prefill_chunk) not in self._samplers:
            self._samplers[cache_dtype, prefill_chunk] = Sampler(self, cache_dtype, prefill_chunk)
        return self._samplers[cache_dtype, prefill_chunk]

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop=None, cache_dtype: str = "float32", stream=None,
                 prefill_chunk: int = PREFILL_CHUNK, heal: bool = True, first_allowed=None):
        """Continues each prompt (token-id lists, or strings with a tokenizer attached).

        A prompt longer than `prefill_chunk` is written into the cache that many tokens at a time (bounded prefill
        memory; 0: every prompt whole).
        Returns the new token ids per prompt, or for string prompts the text that continues each. Generation of a
        sequence ends at a stop token (default: EOS, and <|im_end|> with a tokenizer) or after max_new_tokens.
        `heal` (string prompts): token healing, Tokenizer.heal: a prompt's last token is taken back when longer
        tokens start with its text, and the first new token is drawn from those (`heal=False`: off; token-id
        prompts are never healed, nor a prompt that ends on a special token). `first_allowed`: token-id prompts'
        own allowed first tokens (Sampler.generate).
        """
        strings = bool(prompts) and isinstance(prompts[0], str)
        removed = [b""] * len(prompts)
        if strings:
            if self.tokenizer is None:
                raise DecodeError("prompts are strings but no tokenizer is attached (model.attach_tokenizer(path))")
            prompts = [self.tokenizer.encode(p, allow_special="all") for p in prompts]
            if heal:
                healed = [self.tokenizer.heal(p) for p in prompts]
                prompts, first_allowed, removed = (list(x) for x in zip(*healed))
        if stop is None:
            stop = [t for t in (self.config.eos_token_id, self.tokenizer and self.tokenizer.im_end_id) if t is not None]
        from k2jax import progress

        shown = None
        if stream is None and max_new_tokens >= LONG_GENERATION and progress.enabled():  # a bar per token
            shown = progress.bar(max_new_tokens, "generating", unit="tok")
            stream = lambda step, tokens, done: shown.update(1)  # noqa: E731
        try:
            outs = self.sampler(cache_dtype, prefill_chunk).generate(
                prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop=stop, stream=stream, first_allowed=first_allowed)
        finally:
            if shown is not None:
                shown.close()
        if not strings:
            return outs
        # a healed prompt's first new token starts with the bytes taken back: the text continues the prompt after them
        return [self.tokenizer.decode_bytes(o)[len(r):].decode("utf-8", errors="replace") for o, r in zip(outs, removed)]

    @property
    def module(self):
        """The nnx Transformer holding this model's state."""
        return nnx.merge(self.graphdef, self.state)

    @functools.cached_property
    def _forward(self):
        def fwd(state, tokens, positions, segment_ids):
            return nnx.merge(self.graphdef, state)(tokens, positions, segment_ids)

        return jax.jit(fwd)

    def _place(self, token_ids, positions, segment_ids):
        """Checked, batch-padded, sharded (tokens, positions, segment ids); and the real batch size."""
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
            raise DecodeError(f"token_ids: expected an int array [batch, seq], got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise DecodeError(f"token_ids: ids must lie in [0, vocab_size={self.config.vocab_size}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise DecodeError(f"token_ids: sequence length {tokens.shape[1]} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        b = tokens.shape[0]
        pad = -b % batch_divisor(self.mesh, self.rules)

        def prep(a, dtype):
            if a is None:
                return None
            a = np.asarray(a, dtype)
            return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

        batch_sharding = self.rules.sharding(("batch", None), self.mesh)
        args = [prep(tokens, np.int32), prep(positions, np.int32), prep(segment_ids, np.int32)]
        return [None if a is None else jax.device_put(a, batch_sharding) for a in args], b

    def logits(self, token_ids, positions=None, segment_ids=None) -> jax.Array:
        """float32 logits [batch, seq, vocab] for int token ids [batch, seq] (optional positions / segment ids)."""
        args, b = self._place(token_ids, positions, segment_ids)
        with jax.set_mesh(self.mesh):
            out = self._forward(self.state, *args)
        return out[:b] if out.shape[0] != b else out

    @functools.cached_property
    def _routing_forward(self):
        def fwd(state, tokens, positions, segment_ids):
            return nnx.merge(self.graphdef, state).forward(tokens, positions, segment_ids, head=False, trace=True)[2]

        return jax.jit(fwd)

    def routing(self, token_ids, positions=None, segment_ids=None) -> Routing:
        """The routers' choices for int token ids [batch, seq]: experts, weights and loads per MoE layer, and
        each layer's largest attention logit per head (see Routing)."""
        args, b = self._place(token_ids, positions, segment_ids)
        with jax.set_mesh(self.mesh):
            stats = jax.device_get(self._routing_forward(self.state, *args))
        c = self.config
        moe = stats.get("moe_layers", {})
        experts = np.asarray(moe["expert_choice"])[:, :b] if moe else np.zeros((0, b, 0), np.int32)
        weights = np.asarray(moe["expert_weight"], np.float32)[:, :b] if moe else np.zeros((0, b, 0), np.float32)
        real = np.ones(experts.shape[1:3], bool) if segment_ids is None else np.asarray(segment_ids) != 0
        load = np.stack([np.bincount(e[real].ravel(), minlength=c.n_routed_experts) for e in experts]) \
            if moe else np.zeros((0, c.n_routed_experts), np.int64)
        max_logit = np.concatenate([np.asarray(stats[name]["max_logit"], np.float32)
                                    for name in ("dense_layers", "moe_layers") if name in stats])
        return Routing(list(range(c.num_dense_layers, c.num_hidden_layers)), experts, weights, load, max_logit)


def _settings(config: K2Config, execution: Execution | None, dtype, overrides) -> tuple[K2Config, Execution]:
    """(config, execution) with `overrides` routed by field, then `dtype` (when given) as both parameter and
    compute dtype."""
    config, execution = configure(config, execution, overrides)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        execution = execution.replace(param_dtype=name, dtype=name)
    return config, execution


def _mesh(mesh) -> Mesh:
    if mesh is None:
        return make_mesh("", devices=jax.devices()[:1])
    if isinstance(mesh, Mesh):
        return mesh
    return make_mesh(mesh)


def load_hf(hf_dir: str, mesh: Mesh | str | None = None, dtype="float32", *, rules: ShardingRules | None = None,
            execution: Execution | None = None, **overrides) -> Model:
    """Loads an HF-format K2 / DeepSeek-V3 folder (config.json + safetensors) into a Model on `mesh`.

    `mesh`: a Mesh, a spec such as 'data=2,expert=4', or None for one device. `dtype` sets parameter and
    compute dtype; `overrides` are execution settings (attn_chunk=16, moe_impl='ragged', ...) or architecture
    fields. Every tensor is checked against the config before any weight is read.
    """
    from k2jax.ckpt.hf import load_hf_state

    config, execution = _settings(from_hf_config(hf_dir), execution, dtype, overrides)
    p = place(config, _mesh(mesh), rules, execution)
    state = load_hf_state(hf_dir, config, p.abstract, p.shardings)
    return Model(config, p.graphdef, state, p.mesh, p.rules, execution=p.execution)


def load(path: str, mesh: Mesh | str | None = None, dtype=None, *, rules: ShardingRules | None = None,
         execution: Execution | None = None, merge: bool = False, base: str = "", **overrides) -> Model:
    """Loads a k2jax checkpoint (converted or trained) into a Model on `mesh`, each shard restored in place.

    `path`: a step directory, or a directory of steps (the latest complete one is used). The parameters keep
    the dtype they were saved in, and compute in it too, unless `dtype` or `execution` say otherwise.
    A LoRA run's checkpoint loads its recorded base (or `base`, which must hash the same) with the adapters
    applied unmerged, or folded into the base kernels with `merge=True`.
    """
    from k2jax.ckpt.orbax import check_shapes, read_config, resolve_step_dir, restore_model_state

    step_dir = resolve_step_dir(path)
    saved, saved_dtype = read_config(step_dir)
    if execution is None:
        execution = Execution(param_dtype=saved_dtype, dtype=saved_dtype)
    config, execution = _settings(saved, execution, dtype, overrides)
    from k2jax.ckpt.lora import read_lora

    lora = read_lora(step_dir)
    if lora is None and (merge or base):
        raise CheckpointError(f"{'merge' if merge else 'base'}: {step_dir} is a full model's checkpoint, not a LoRA "
                              "run's (nothing to merge, no base to name)")
    if lora is not None:
        return _load_lora(step_dir, lora, config, execution, _mesh(mesh), rules, merge, base)
    p = place(config, _mesh(mesh), rules, execution)
    check_shapes(step_dir, p.abstract)
    state = restore_model_state(step_dir, p.abstract, p.shardings)
    return Model(config, p.graphdef, state, p.mesh, p.rules, execution=p.execution)


def _load_lora(step_dir, lora_rec, config, execution, mesh, rules, merge: bool, base: str) -> Model:
    """A LoRA run's Model: its base (checked by hash) and adapters, unmerged or merged."""
    from k2jax.ckpt.lora import check_base, load_base
    from k2jax.ckpt.orbax import check_shapes, restore_model_state
    from k2jax.model.adapters import merged_jit
    from k2jax.model.params import LoraParam

    lora, ref = lora_rec
    base_path = check_base(ref, step_dir, base, flag="base")
    p = place(config, mesh, rules, execution, lora=lora)
    abstract_base = nnx.filter_state(p.abstract, nnx.Not(LoraParam))
    abstract_ad = nnx.filter_state(p.abstract, LoraParam)
    check_shapes(step_dir, abstract_ad)
    adapters = restore_model_state(step_dir, abstract_ad, nnx.filter_state(p.shardings, LoraParam))
    base_state = load_base(base_path, config, abstract_base, nnx.filter_state(p.shardings, nnx.Not(LoraParam)),
                           flag="base")
    state = nnx.merge_state(base_state, adapters)
    if not merge:
        return Model(config, p.graphdef, state, p.mesh, p.rules, execution=p.execution, lora=lora)
    plain = place(config, mesh, rules, execution)
    with jax.set_mesh(mesh):
        merged = merged_jit(state, lora.scale, plain.shardings)
    return Model(config, plain.graphdef, merged, plain.mesh, plain.rules, execution=plain.execution)


def random_model(config: K2Config, mesh: Mesh | str | None = None, *, rules: ShardingRules | None = None,
                 execution: Execution | None = None, seed: int = 0, **overrides) -> Model:
    """A randomly initialised Model (abstract-first, created in place on `mesh`)."""
    config, execution = _settings(config, execution, None, overrides)
    rules = rules or ShardingRules()
    mesh = _mesh(mesh)
    graphdef, state = init_model(config, mesh, rules, seed, execution)
    return Model(config, graphdef, state, mesh, rules, execution=execution)
