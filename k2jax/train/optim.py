"""Optimizers: AdamW, and MuonClip (Muon on matrices + AdamW elsewhere, QK-Clip after the update); schedules."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k2jax.errors import ConfigError
from k2jax.model.params import is_stacked, spec_of, state_path

NS_COEFFS = (3.4445, -4.7750, 2.0315)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule settings (train-time, apart from the model config)."""

    optimizer: str = "muonclip"  # muonclip | adamw
    learning_rate: float = 3e-3  # the peak; k2jax-train's --lr takes its default from here
    min_learning_rate: float | None = None  # where the decay ends; None: a tenth of learning_rate, whichever was given
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 500
    decay_steps: int = 0  # wsd: length of the final decay; 0 = 20% of total steps
    total_steps: int = 1000
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    muon_momentum: float = 0.95
    ns_steps: int = 5
    # "whole": every weight matrix orthogonalised whole, as K2's MuonClip (and Moonlight) do: q_b, kv_b as one
    # [in, heads·out] matrix, kv_a as one [d, latent + rope] matrix; "per_head": q_b and kv_b per head, kv_a as its
    # latent and rope-key parts
    muon_split: str = "whole"
    # global-norm gradient clipping before the update; None: off for MuonClip (K2's recipe clips no gradient:
    # QK-Clip bounds the attention logits instead), 1.0 for AdamW. 0 turns it off.
    grad_clip: float | None = None
    qk_clip_tau: float = 100.0
    bias_update_rate: float = 1e-3
    # gradient sums over microbatches: "param" (the parameters' dtype) or "float32" (exact for bf16 parameters,
    # at twice the accumulator's memory: docs/scale.md has what that costs K2)
    grad_accum_dtype: str = "param"

    @property
    def clip(self) -> float:
        """The global-norm clipping threshold in effect (0: none)."""
        if self.grad_clip is None:
            return 0.0 if self.optimizer == "muonclip" else 1.0
        return self.grad_clip

    def __post_init__(self):
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"grad_clip: expected >= 0 (0: off), got {self.grad_clip}")
        if self.grad_accum_dtype not in ("param", "float32"):
            raise ConfigError(f"grad_accum_dtype: expected 'param' or 'float32', got {self.grad_accum_dtype!r}")
        if self.muon_split not in ("whole", "per_head"):
            raise ConfigError(f"muon_split: expected 'whole' or 'per_head', got {self.muon_split!r}")
        if self.optimizer not in ("muonclip", "adamw"):
            raise ConfigError(f"optimizer: expected 'muonclip' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("wsd", "cosine", "constant"):
            raise ConfigError(f"schedule: expected 'wsd', 'cosine' or 'constant', got {self.schedule!r}")
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate: expected >= 0, got {self.learning_rate}")
        if self.min_learning_rate is not None and not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(f"min_learning_rate ({self.min_learning_rate}) must lie between 0 and learning_rate "
                              f"({self.learning_rate}): the schedule would decay upwards or below zero")

    @property
    def final_learning_rate(self) -> float:
        """The learning rate the decay ends at: min_learning_rate, or a tenth of learning_rate when unset."""
        return self.learning_rate / 10 if self.min_learning_rate is None else self.min_learning_rate


def make_schedule(o: OptimConfig) -> optax.Schedule:
    """Warm-up-stable-decay (K2's: linear warm-up, constant, cosine decay to min) or warm-up + cosine."""
    warm = max(o.warmup_steps, 0)
    peak, low, total = o.learning_rate, o.final_learning_rate, max(o.total_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm_lr = peak * jnp.minimum(1.0, (step + 1) / max(warm, 1))
        if o.schedule == "constant":
            return warm_lr
        if o.schedule == "cosine":
            frac = jnp.clip((step - warm) / max(total - warm, 1), 0, 1)
        else:
            decay = o.decay_steps or max(total // 5, 1)
            frac = jnp.clip((step - (total - decay)) / decay, 0, 1)
        cos = low + 0.5 * (peak - low) * (1 + jnp.cos(math.pi * frac))
        return jnp.where(step < warm, warm_lr, cos)

    return schedule


# ------------------------------------------------------------------------------------------------ Muon
def newton_schulz(g, steps: int = 5, eps: float = 1e-7):
    """Orthogonalises each matrix [..., m, n] (quintic Newton-Schulz, Muon's coefficients) in float32."""
    a, b, c = NS_COEFFS
    x = g.astype(jnp.float32)
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-1, -2), keepdims=True)) + eps)
    for _ in range(steps):
        xx = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * xx + c * xx @ xx) @ x
    return jnp.swapaxes(x, -1, -2) if transpose else x


def _orthogonalized_update(split: str, m, steps, kv_lora_rank, mode: str = "whole"):
    """Muon direction for one parameter's momentum m, scaled to AdamW's RMS: 0.2·sqrt(max(fan_in, fan_out));
    `split` is the parameter's declared Muon layout (k2jax.model.params.ParamSpec.muon), `mode` whether the
    per-head and kv_a splits apply ("per_head") or every weight is one matrix ("whole")."""

    def ortho(x):
        fan_in, fan_out = x.shape[-2], x.shape[-1]
        return newton_schulz(x, steps) * 0.2 * math.sqrt(max(fan_in, fan_out))

    if mode == "whole" and split == "per_head":  # [..., in, heads, out] as one [in, heads·out] matrix
        return ortho(m.reshape(m.shape[:-2] + (-1,))).reshape(m.shape)
    if mode == "whole" and split == "kv_a":
        return ortho(m)
    if split == "kv_a":  # the latent and the shared rope key are separate maps
        return jnp.concatenate([ortho(m[..., :kv_lora_rank]), ortho(m[..., kv_lora_rank:])], axis=-1)
    if split == "per_head":
        mt = jnp.moveaxis(m, -2, -3)  # [..., in, heads, out] -> [..., heads, in, out]
        return jnp.moveaxis(ortho(mt), -3, -2)
    if split == "heads_in":  # [..., heads, v, d]: the heads' outputs are summed, so it is one [heads·v, d] matrix
        return ortho(m.reshape(m.shape[:-3] + (-1, m.shape[-1]))).reshape(m.shape)
    return ortho(m)


class MuonState(NamedTuple):
    momentum: Any


def muon(*, momentum: float, weight_decay: float, ns_steps: int, kv_lora_rank: int,
         layer_loop: bool = True, split_mode: str = "whole") -> optax.GradientTransformation:
    """Muon as in the K2 report: M <- mu·M + G; direction -(NS5(M)·0.2·sqrt(max(fan_in, fan_out)) + wd·θ).

    `split_mode="whole"` (K2's recipe) orthogonalises each weight matrix whole: q_b, kv_b as one [in, heads·out]
    matrix, kv_a as one matrix, o as one [heads·v, d] matrix; `"per_head"` splits q_b, kv_b per head and kv_a into
    its latent and rope-key parts. Experts are a batch of matrices either way. The learning rate is
    applied after. With `layer_loop`, stacked layers go one at a time through a loop that updates the
    momentum in place, so Newton-Schulz's float32 temporaries are one layer's, not the whole model's (README:
    what that saves for K2); without it (unrolled models, FLOP counting) all layers are one batched update.
    """

    def init(params):
        return MuonState(jax.tree.map(jnp.zeros_like, params))

    def leaf_update(path, m_prev, g, p):
        split = spec_of(path).muon

        def one(m_prev, g, p):
            m = momentum * m_prev + g.astype(m_prev.dtype)
            d = _orthogonalized_update(split, m, ns_steps, kv_lora_rank, split_mode)
            return m, -(d + weight_decay * p.astype(jnp.float32)).astype(p.dtype)

        if not (layer_loop and is_stacked(path) and m_prev.shape[0] > 1):
            return one(m_prev, g, p)

        def body(i, carry):
            m_all, u_all = carry
            m, u = one(m_all[i], g[i], p[i])
            return m_all.at[i].set(m), u_all.at[i].set(u)

        return jax.lax.fori_loop(0, m_prev.shape[0], body, (m_prev, jnp.zeros_like(p)))

    def update(grads, state, params):
        pairs = jax.tree_util.tree_map_with_path(
            lambda kp, mm, g, p: leaf_update(state_path(kp), mm, g, p), state.momentum, grads, params)
        is_pair = lambda x: type(x) is tuple  # noqa: E731  (not optax.MaskedNode, also a tuple)
        m = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
        updates = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
        return updates, MuonState(m)

    return optax.GradientTransformation(init, update)


def labels(params):
    """Each parameter's declared optimizer group ('muon' | 'adam' | 'adam_nodecay'), as a tree like params."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: spec_of(state_path(kp)).group, params)


def make_optimizer(o: OptimConfig, params, kv_lora_rank: int, layer_loop: bool = True) -> optax.GradientTransformation:
    """The optax transform for `params` (an nnx.State of Params): gradient clipping (if on), then AdamW or MuonClip
    (`layer_loop`: Muon updates stacked layers one at a time, see `muon`)."""
    schedule = make_schedule(o)
    groups = labels(params)
    adam = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    adam_nodecay = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=0.0)
    if o.optimizer == "adamw":
        inner = optax.multi_transform({"muon": adam, "adam": adam, "adam_nodecay": adam_nodecay, "lora": adam},
                                      groups)
    else:
        mu = optax.chain(muon(momentum=o.muon_momentum, weight_decay=o.weight_decay, ns_steps=o.ns_steps,
                              kv_lora_rank=kv_lora_rank, layer_loop=layer_loop, split_mode=o.muon_split),
                         optax.scale_by_learning_rate(schedule, flip_sign=False))
        inner = optax.multi_transform({"muon": mu, "adam": adam, "adam_nodecay": adam_nodecay}, groups)
    return optax.chain(optax.clip_by_global_norm(o.clip), inner) if o.clip > 0 else inner


# ------------------------------------------------------------------------------------------------ QK-Clip
def qk_clip(params, max_logits: dict, tau: float, nope_dim: int):
    """Rescales the QK-Clip parameters (declared `qk_clip` "q": q_b, "k": kv_b) of heads whose max pre-softmax
    logit exceeds tau (K2's QK-Clip for MLA).

    gamma_h = tau / S_max^h; the nope parts of W_q and of W_kvb's key rows get sqrt(gamma), the query's rope
    part gets gamma; values and the shared rope key (kv_a) are untouched; heads at or under tau keep their
    exact bits. `max_logits[stack]` is [layers, heads]; the clipped parameters are [layers, in, heads, out].
    Returns the new params (an nnx.State).
    """

    def clip(kp, var):
        path = state_path(kp)
        role = spec_of(path).qk_clip
        if role is None or path[0] not in max_logits:
            return var
        s_lh = max_logits[path[0]]
        over = (s_lh > tau)[:, None, :, None]
        gamma = jnp.where(s_lh > tau, tau / jnp.maximum(s_lh, 1e-30), 1.0)[:, None, :, None]
        w = var.get_value()
        nope = jnp.arange(w.shape[-1]) < nope_dim
        scale = jnp.where(nope, jnp.sqrt(gamma), gamma if role == "q" else 1.0)
        return var.replace(jnp.where(over, (w * scale).astype(w.dtype), w))

    return jax.tree_util.tree_map_with_path(clip, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
