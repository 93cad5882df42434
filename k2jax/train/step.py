"""The jit-compiled, sharded train step: microbatch accumulation, MuonClip/AdamW, QK-Clip, bias balancing."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from k2jax.model.config import Execution, K2Config
from k2jax.model.init import init_model, param_count, place, state_shardings
from k2jax.errors import CheckpointError, ConfigError, TrainingError
from k2jax.model.layers.lora import LoraConfig
from k2jax.model.params import LoraParam, RouterBias, state_path
from k2jax.model.sharding import ShardingRules
from k2jax.train.loss import chunked_cross_entropy, next_token_targets
from k2jax.train.optim import OptimConfig, make_optimizer, make_schedule, qk_clip


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes: trained params, router biases (state), optimizer state, step. In a LoRA run the
    params are the adapters and `bias` is empty: the base (router biases included) is frozen, held by the Trainer
    and passed to the step apart from this state."""

    params: Any
    bias: Any
    opt_state: Any
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    z_loss: float = 0.0
    aux_loss_alpha: float | None = None  # None: the model config's aux_loss_alpha
    vocab_chunk: int = 8192


class Trainer:
    """Builds the train state and the jitted train step for one model/optimizer/mesh."""

    def __init__(self, config: K2Config, optim: OptimConfig, mesh: Mesh, rules: ShardingRules | None = None,
                 loss: LossConfig = LossConfig(), microbatches: int = 1, execution: Execution | None = None,
                 lora: LoraConfig | None = None, seed: int = 0, base_quant: str = ""):
        if lora is not None and optim.optimizer != "adamw":
            raise ConfigError(f"--lora_rank: adapters are trained with AdamW (MuonClip orthogonalises full weight "
                              f"matrices); got optimizer={optim.optimizer!r}: drop it or set --opt optimizer=adamw")
        p = self.placement = place(config, mesh, rules or ShardingRules().for_training(), execution, lora=lora)
        self.config, self.execution, self.optim, self.mesh, self.rules = config, p.execution, optim, mesh, p.rules
        self.loss_cfg, self.microbatches, self.lora, self.seed = loss, microbatches, lora, seed
        # trained / moved by load balancing / frozen: a LoRA run trains its adapters only, the rest is its base
        filters = (nnx.Param, RouterBias, ...) if lora is None else (LoraParam, nnx.Nothing, ...)
        self.graphdef, abs_params, abs_bias, abs_base = nnx.split(nnx.merge(p.graphdef, p.abstract), *filters)
        self.abstract_params, self.abstract_bias, self.abstract_base = abs_params, abs_bias, abs_base
        self.tx = make_optimizer(optim, abs_params, config.kv_lora_rank, layer_loop=p.execution.scan_layers)
        shard = lambda t: state_shardings(t, mesh, self.rules)  # noqa: E731
        self.param_shardings, self.bias_shardings = shard(abs_params), shard(abs_bias)
        self.base_shardings = shard(abs_base)
        # what a base is read as (before any quantisation): load_weights reads into these
        self.abstract_base_source, self.base_source_shardings = abs_base, self.base_shardings
        self.base = abs_base if lora is None else None  # a LoRA run's frozen weights, once loaded (init_state)
        self.base_quant = base_quant  # "int8" | "fp8": a LoRA run's base held quantised (k2jax.model.quant)
        if base_quant:
            from k2jax.model.quant import quantize_base, quantized_shardings

            if lora is None:
                raise ConfigError(f"--base_dtype={base_quant}: a quantised base is frozen, for LoRA runs only "
                                  "(add --lora_rank=R)")
            self.base_shardings = quantized_shardings(self.base_shardings, base_quant, mesh)
            self.abstract_base = jax.eval_shape(lambda b: quantize_base(b, base_quant), abs_base)
        self.replicated = NamedSharding(mesh, P())
        opt_abs = jax.eval_shape(self.tx.init, abs_params)
        self.opt_shardings = _opt_shardings(self.tx, opt_abs, self.param_shardings, self.replicated)
        self.state_shardings = TrainState(self.param_shardings, self.bias_shardings, self.opt_shardings,
                                          self.replicated)
        self.batch_sharding = self.rules.sharding(("batch", None), mesh)

    # ------------------------------------------------------------------ state
    def init_state(self, seed: int = 0, model_state=None) -> TrainState:
        """A fresh TrainState (random init unless `model_state` is given), every shard created in place.

        In a LoRA run `model_state` is the base (without adapters; random if None): it becomes `self.base`, and
        the adapters start fresh (B = 0: the model starts exactly at its base)."""
        if self.lora is not None:
            if model_state is None:
                _, model_state = init_model(self.config, self.mesh, self.rules, seed, self.execution)
            self.set_base(model_state)
            _, params = init_model(self.config, self.mesh, self.rules, seed, self.execution, self.lora,
                                   only=LoraParam)
            bias = nnx.State({})
        else:
            if model_state is None:
                _, model_state = init_model(self.config, self.mesh, self.rules, seed, self.execution)
            _, params, bias = nnx.split(nnx.merge(self.graphdef, nnx.filter_state(model_state, nnx.Param),
                                                  nnx.filter_state(model_state, RouterBias)), nnx.Param, RouterBias)

        def make(params, bias):
            return TrainState(params, bias, self.tx.init(params), jnp.zeros((), jnp.int32))

        with jax.set_mesh(self.mesh):
            return jax.jit(make, out_shardings=self.state_shardings)(params, bias)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs (with shardings) of the train state: for restoring and AOT compilation."""
        shapes = jax.eval_shape(lambda p, b: TrainState(p, b, self.tx.init(p), jnp.zeros((), jnp.int32)),
                                self.abstract_params, self.abstract_bias)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def set_base(self, base_state) -> None:
        """Holds a LoRA run's frozen base (an nnx.State of the model without adapters), checked against the
        base this run expects (every tensor by path and shape) and placed in the trainer's shardings."""
        want = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(self.abstract_base_source)}
        have = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(base_state)}
        for name, shape in want.items():
            if have.get(name) != shape:
                raise CheckpointError(f"LoRA base: tensor {name} is {'missing' if name not in have else have[name]}"
                                      f", expected shape {list(shape)}")
        base_state = nnx.filter_state(base_state, nnx.Not(LoraParam))
        if self.base_quant:  # quantised under jit, each array straight into its shards
            from k2jax.model.quant import quantize_base

            with jax.set_mesh(self.mesh):
                self.base = jax.jit(lambda b: quantize_base(b, self.base_quant),
                                    out_shardings=self.base_shardings)(base_state)
            return
        base = jax.tree.map(lambda x: x, self.abstract_base)
        nnx.replace_by_pure_dict(base, nnx.to_pure_dict(base_state))
        self.base = jax.device_put(base, self.base_shardings)

    def model_state(self, state: TrainState):
        """The model's nnx.State (params + router biases, and a LoRA run's base), e.g. for k2jax.Model."""
        return nnx.state(nnx.merge(self.graphdef, state.params, state.bias, self.base))

    # ------------------------------------------------------------------ step
    def loss_fn(self, params, bias, batch, base=None, key=None):
        """(sum of token losses + balance/z terms, aux) for one microbatch; sums, normalised by the caller.
        `base`: a LoRA run's frozen weights; `key`: its adapters' dropout key."""
        c = self.config
        model = nnx.merge(self.graphdef, params, bias, base if base is not None else self.abstract_base)
        tokens, seg, pos = batch["tokens"], batch.get("segment_ids"), batch.get("positions")
        h, _, stats = model.forward(tokens, pos, seg, head=False, dropout_key=key)
        targets, mask = next_token_targets(tokens, seg, batch.get("weights"))
        b, t, d = h.shape
        ce, z, max_abs_logit = chunked_cross_entropy(
            h.reshape(b * t, d), model.lm_head[...].astype(h.dtype), targets.reshape(-1), mask.reshape(-1),
            chunk=self.loss_cfg.vocab_chunk)
        alpha = c.aux_loss_alpha if self.loss_cfg.aux_loss_alpha is None else self.loss_cfg.aux_loss_alpha
        balance = sum((v["balance_loss"].sum() for v in stats.values() if "balance_loss" in v), jnp.zeros(()))
        total = ce + self.loss_cfg.z_loss * z
        aux = {"ce_sum": ce, "tokens": mask.sum().astype(jnp.float32), "balance_sum": balance,
               "sequences": jnp.asarray(b, jnp.float32), "max_logit": {k: v["max_logit"] for k, v in stats.items()},
               "expert_load": {k: v["expert_load"] for k, v in stats.items() if "expert_load" in v},
               "max_abs_logit": max_abs_logit,
               "moe_dropped": sum((v["moe_dropped"].sum() for v in stats.values() if "moe_dropped" in v),
                                  jnp.zeros(()))}
        return total, alpha, aux

    def _grads(self, params, bias, batch, base=None, key=None):
        def objective(p, mb, n_tokens, n_seq, key=key):
            total, alpha, aux = self.loss_fn(p, bias, mb, base, key)
            return total / n_tokens + alpha * aux["balance_sum"] / n_seq, aux

        n = self.microbatches
        seg = batch.get("segment_ids")
        _, mask = next_token_targets(batch["tokens"], seg, batch.get("weights"))
        n_tokens = jnp.maximum(mask.sum().astype(jnp.float32), 1.0)
        n_seq = jnp.asarray(batch["tokens"].shape[0], jnp.float32)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if n == 1:
            (loss, aux), grads = grad_fn(params, batch, n_tokens, n_seq)
            return loss, grads, aux
        micro = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)

        def body(carry, inp):
            loss_acc, grad_acc = carry
            mb, i = inp
            (loss, aux), g = grad_fn(params, mb, n_tokens, n_seq, None if key is None else jax.random.fold_in(key, i))
            return (loss_acc + loss, jax.tree.map(lambda a, b: a + b.astype(a.dtype), grad_acc, g)), aux

        f32 = self.optim.grad_accum_dtype == "float32"
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32 if f32 else p.dtype), params)
        (loss, grads), auxs = jax.lax.scan(body, (jnp.zeros(()), zeros), (micro, jnp.arange(n)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        aux = {"ce_sum": auxs["ce_sum"].sum(), "tokens": auxs["tokens"].sum(), "balance_sum": auxs["balance_sum"].sum(),
               "sequences": auxs["sequences"].sum(), "max_logit": jax.tree.map(lambda x: x.max(0), auxs["max_logit"]),
               "expert_load": jax.tree.map(lambda x: x.sum(0), auxs["expert_load"]),
               "max_abs_logit": auxs["max_abs_logit"].max(), "moe_dropped": auxs["moe_dropped"].sum()}
        return loss, grads, aux

    def step_fn(self, state: TrainState, batch, base=None) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch {tokens, segment_ids, positions} [batch, seq] (`base`: a LoRA
        run's frozen weights)."""
        c, o = self.config, self.optim
        key = None
        if self.lora is not None and self.lora.dropout > 0:  # a function of the step: a resumed run draws the same
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
        loss, grads, aux = self._grads(state.params, state.bias, batch, base, key)
        # one pass over the gradients gives the global norm and, per parameter, whether it is finite (a NaN or
        # inf anywhere makes that parameter's sum of squares non-finite)
        sq = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)])
        grad_norm = jnp.sqrt(jnp.sum(sq))
        finite = jnp.isfinite(sq)
        # a step whose loss or gradients are not finite is not applied: the state keeps the last good values
        ok = jnp.isfinite(loss) & jnp.isfinite(aux["ce_sum"]) & jnp.all(finite)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if o.optimizer == "muonclip":
            params = qk_clip(params, aux["max_logit"], o.qk_clip_tau, c.qk_nope_head_dim)
        bias = update_router_bias(state.bias, aux["expert_load"], o.bias_update_rate) if self.lora is None else \
            state.bias  # a LoRA run's router biases are part of its frozen base
        metrics = {"loss": aux["ce_sum"] / jnp.maximum(aux["tokens"], 1.0), "objective": loss,
                   "grad_norm": grad_norm, "learning_rate": jnp.asarray(_lr(o, state.step)),
                   "tokens": aux["tokens"], "max_attention_logit": jnp.max(jnp.stack(
                       [v.max() for v in aux["max_logit"].values()])),
                   "max_abs_output_logit": aux["max_abs_logit"]}
        if aux["expert_load"]:
            imbalance = [load.max(-1) / jnp.maximum(load.mean(-1), 1e-9) for load in aux["expert_load"].values()]
            metrics["expert_load_imbalance"] = jnp.max(jnp.stack([i.max() for i in imbalance]))
            metrics["balance_loss"] = aux["balance_sum"] / aux["sequences"]
            metrics["moe_dropped"] = aux["moe_dropped"]  # (token, expert) assignments past a capacity, all layers
        metrics["step_ok"] = ok
        # any process's stop request (SIGTERM), reduced over the whole batch so that all processes agree
        metrics["stop_requested"] = jnp.max(batch["stop"]) > 0 if "stop" in batch else jnp.asarray(False)
        metrics["first_nonfinite_grad"] = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
        new = TrainState(params, bias, opt_state, state.step + 1)
        keep = TrainState(state.params, state.bias, state.opt_state, state.step + 1)
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, keep), metrics

    def param_names(self) -> list[str]:
        """'path (optimizer group)' of each parameter, in the order of the step's `first_nonfinite_grad`."""
        from k2jax.model.params import spec_of

        flat = jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]
        return [f"{'/'.join(state_path(kp))} ({spec_of(state_path(kp)).group})" for kp, _ in flat]

    @functools.cached_property
    def jit_step(self):
        """The train step jitted with explicit in/out shardings and the state donated; every batch array
        ({tokens, segment_ids, positions[, weights]}) is split over the batch axes."""
        return jax.jit(self.step_fn, in_shardings=(self.state_shardings, self.batch_sharding, self.base_shardings),
                       out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def eval_fn(self, params, bias, batch, base=None) -> dict:
        """Sums over a batch of the held-out loss: {ce_sum, tokens, correct} (loss-weighted tokens only)."""
        model = nnx.merge(self.graphdef, params, bias, base if base is not None else self.abstract_base)
        tokens, seg = batch["tokens"], batch.get("segment_ids")
        h, _, _ = model.forward(tokens, batch.get("positions"), seg, head=False)
        targets, mask = next_token_targets(tokens, seg, batch.get("weights"))
        b, t, d = h.shape
        ce, _, _, correct = chunked_cross_entropy(
            h.reshape(b * t, d), model.lm_head[...].astype(h.dtype), targets.reshape(-1), mask.reshape(-1),
            chunk=self.loss_cfg.vocab_chunk, accuracy=True)
        return {"ce_sum": ce, "tokens": mask.sum().astype(jnp.float32), "correct": correct}

    @functools.cached_property
    def jit_eval(self):
        """`eval_fn` jitted: (state, batch) -> sums, replicated."""
        return jax.jit(lambda state, batch, base: self.eval_fn(state.params, state.bias, batch, base),
                       in_shardings=(self.state_shardings, self.batch_sharding, self.base_shardings),
                       out_shardings=self.replicated)

    def evaluate(self, state: TrainState, batches) -> dict:
        """Loss and next-token accuracy over `batches` (global batches), weighted by their loss tokens."""
        totals = {"ce_sum": 0.0, "tokens": 0.0, "correct": 0.0}
        with jax.set_mesh(self.mesh):
            sums = [self.jit_eval(state, b, self._base()) for b in batches]
        for s in jax.device_get(sums):
            totals = {k: totals[k] + float(s[k]) for k in totals}
        n = max(totals["tokens"], 1.0)
        return {"eval_loss": totals["ce_sum"] / n, "eval_accuracy": totals["correct"] / n,
                "eval_tokens": totals["tokens"]}

    def _base(self):
        if self.base is None:
            raise TrainingError("a LoRA run's base is not loaded: init_state(model_state=base) or set_base(base)")
        return self.base

    def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):
            return self.jit_step(state, batch, self._base())

    def lower(self, state, batch, base=None):
        """The lowered step (`base`: a LoRA run's base, abstract or real; default the loaded one, else abstract)."""
        if base is None:
            base = self.base if self.base is not None else self.abstract_base
        with jax.set_mesh(self.mesh):
            return self.jit_step.lower(state, batch, base)


def _lr(o: OptimConfig, step):
    return make_schedule(o)(step)


def update_router_bias(bias, expert_load: dict, rate: float):
    """Moves every router bias by rate·sign(mean load − load) of its layer's experts (`expert_load[stack]` is
    [layers, experts]): the bias chooses experts, so overloaded ones get chosen less (outside the gradient)."""

    def move(kp, var):
        load = expert_load[state_path(kp)[0]]
        return var.replace(var.get_value() + rate * jnp.sign(load.mean(-1, keepdims=True) - load))

    return jax.tree_util.tree_map_with_path(move, bias, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _opt_shardings(tx, opt_abs, param_shardings, replicated):
    """Optimizer-state shardings: leaves that mirror a parameter (moments, momenta) follow its sharding."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(tx, lambda x, sh: x if masked(x) else sh, opt_abs, param_shardings,
                                 transform_non_params=lambda x: x if masked(x) else replicated, is_leaf=masked)


def analytic_train_flops(config: K2Config, tokens: int, seq: int, lora: LoraConfig | None = None) -> float:
    """6·active_params·tokens + attention (QK^T and PV, causal half, forward + backward). A LoRA step computes no
    base-weight gradient: 4·active·tokens for the base (forward and input gradients) + 6·active adapter
    parameters·tokens."""
    _, active = param_count(config)
    c = config
    active_matmul = active - c.vocab_size * c.hidden_size  # the embedding lookup is not a matmul
    attn = _attention_flops(config, tokens, seq)
    if lora is None:
        return 6.0 * active_matmul * tokens + attn
    return 4.0 * active_matmul * tokens + 6.0 * active_adapter_params(config, lora) * tokens + attn


def analytic_train_flops_parts(config: K2Config, tokens: int, seq: int) -> dict[str, float]:
    """`analytic_train_flops` (full training) by part: the routed experts' matmuls (6·tokens·top-k·3·d·f per MoE
    layer), attention's scores and weighted values, and the rest (projections, shared and dense MLPs, router,
    loss head)."""
    c = config
    total = analytic_train_flops(config, tokens, seq)
    routed = 6.0 * c.num_moe_layers * c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size * tokens
    attn = _attention_flops(config, tokens, seq)
    return {"routed experts": routed, "attention": attn, "the rest": total - routed - attn}


def _attention_flops(c: K2Config, tokens: int, seq: int) -> float:
    """QK^T and PV over the causal half, forward + backward: 6·layers·heads·(qk + v)·seq·tokens/2."""
    return 6 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq * tokens / 2


def active_adapter_params(config: K2Config, lora: LoraConfig) -> int:
    """Adapter parameters one token goes through (the routed experts': its top-k experts' only)."""
    from k2jax.model.init import abstract_model

    _, abstract = abstract_model(config, lora=lora)
    total = 0
    for path, v in nnx.to_flat_state(nnx.filter_state(abstract, LoraParam)):
        n = math.prod(v.shape)
        total += n * config.num_experts_per_tok // config.n_routed_experts if "experts" in str(
            v.get_metadata()["out_sharding"]) else n
    return total
