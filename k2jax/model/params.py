"""Every parameter of the model declared once: logical axes, initialiser, dtype rule, optimizer group, how Muon
orthogonalises it, its QK-Clip role and its official HF tensor name. The layers create their variables from
this table and every consumer (sharding, optimizer, QK-Clip, router-bias update, HF conversion, dtype casts)
reads it here, so a renamed or new parameter without a declaration fails loudly instead of changing group.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from flax import nnx


class RouterBias(nnx.Variable):
    """MoE e_score_correction_bias: model state moved by load balancing, not by gradients."""


class LoraParam(nnx.Param):
    """A low-rank adapter's A or B: the only parameters a LoRA run trains (the base stays frozen)."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter's facts (axes without the stacked `layers` axis; `hf` relative to `model.layers.N.` for
    block parameters, {e} standing for the expert index)."""

    axes: tuple[str | None, ...]
    hf: str
    group: str  # "muon" | "adam" (with weight decay) | "adam_nodecay" | "router_bias" (not trained by gradients)
    # | "lora" (an adapter of a LoRA run: AdamW; the only trained group then)
    init: str = "normal"  # normal(initializer_range) | ones | zeros | fan_in (normal, std 1/sqrt(fan_in): LoRA's A)
    float32: bool = False  # kept float32 whatever Execution.param_dtype
    muon: str = "matrix"  # matrix | per_head (q_b, kv_b: [in, heads, out]) | heads_in (o: one [heads*v, d]) | kv_a
    qk_clip: str | None = None  # "q" (q_b) or "k" (kv_b): rescaled by QK-Clip
    hf_transposed: bool = True  # HF stores [out, in]; k2jax [in..., out...]
    hf_in_dims: int = 1  # how many leading k2jax dims make HF's `in` dim (o: [heads, v] -> heads·v)

    @property
    def kind(self) -> type[nnx.Variable]:
        return {"router_bias": RouterBias, "lora": LoraParam}.get(self.group, nnx.Param)


def _norm(hf: str) -> ParamSpec:
    return ParamSpec(("norm",), hf, "adam_nodecay", init="ones")


def _mlp(prefix: str, hf: str) -> dict[str, ParamSpec]:
    return {f"{prefix}.gate": ParamSpec(("embed", "mlp"), f"{hf}.gate_proj.weight", "muon"),
            f"{prefix}.up": ParamSpec(("embed", "mlp"), f"{hf}.up_proj.weight", "muon"),
            f"{prefix}.down": ParamSpec(("mlp", "embed"), f"{hf}.down_proj.weight", "muon")}


# the top-level parameters, by path
TOP = {
    "embed": ParamSpec(("vocab", "embed"), "model.embed_tokens.weight", "adam", hf_transposed=False),
    "final_norm.scale": _norm("model.norm.weight"),
    "lm_head": ParamSpec(("vocab", "embed"), "lm_head.weight", "adam", hf_transposed=False),  # HF layout [v, d]
}

# every decoder block's parameters, by path inside the block
BLOCK = {
    "attn_norm.scale": _norm("input_layernorm.weight"),
    "mlp_norm.scale": _norm("post_attention_layernorm.weight"),
    "attn.q_a": ParamSpec(("embed", "q_lora"), "self_attn.q_a_proj.weight", "muon"),
    "attn.q_norm.scale": _norm("self_attn.q_a_layernorm.weight"),
    "attn.q_b": ParamSpec(("q_lora_in", "heads", "head_dim"), "self_attn.q_b_proj.weight", "muon", muon="per_head",
                          qk_clip="q"),
    "attn.kv_a": ParamSpec(("embed", "kv_lora"), "self_attn.kv_a_proj_with_mqa.weight", "muon", muon="kv_a"),
    "attn.kv_norm.scale": _norm("self_attn.kv_a_layernorm.weight"),
    "attn.kv_b": ParamSpec(("kv_lora_in", "heads", "head_dim"), "self_attn.kv_b_proj.weight", "muon",
                           muon="per_head", qk_clip="k"),
    "attn.o": ParamSpec(("heads", "head_dim", "embed"), "self_attn.o_proj.weight", "muon", muon="heads_in",
                        hf_in_dims=2),
}

# the feed-forward of dense blocks and of MoE blocks
DENSE_FFN = _mlp("mlp", "mlp")
MOE_FFN = {
    # the router scores in float32 whatever the parameter dtype (HF keeps it so too)
    "mlp.router": ParamSpec(("embed", "router_experts"), "mlp.gate.weight", "muon", float32=True),
    "mlp.router_bias": ParamSpec(("router_experts",), "mlp.gate.e_score_correction_bias", "router_bias",
                                 init="zeros", float32=True),
    "mlp.wg": ParamSpec(("experts", "expert_embed", "expert_mlp"), "mlp.experts.{e}.gate_proj.weight", "muon"),
    "mlp.wu": ParamSpec(("experts", "expert_embed", "expert_mlp"), "mlp.experts.{e}.up_proj.weight", "muon"),
    "mlp.wd": ParamSpec(("experts", "expert_mlp", "expert_embed"), "mlp.experts.{e}.down_proj.weight", "muon"),
    **_mlp("mlp.shared", "mlp.shared_experts"),
}

# LoRA targets (k2jax-train --lora_targets): group name -> the declared projections it adapts
LORA_TARGETS = {
    "attn": ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", "attn.o"),
    "dense_mlp": ("mlp.gate", "mlp.up", "mlp.down"),
    "shared": ("mlp.shared.gate", "mlp.shared.up", "mlp.shared.down"),
    "experts": ("mlp.wg", "mlp.wu", "mlp.wd"),
}
EXPERT_KERNELS = LORA_TARGETS["experts"]


def lora_split(key: str, spec: ParamSpec) -> tuple[tuple, tuple, tuple]:
    """(leading axes, input axes, output axes) of an adaptable kernel: the experts' leading `experts` axis is
    kept on both factors; `hf_in_dims` leading dims form the input (o: [heads, v])."""
    lead = spec.axes[:1] if key in EXPERT_KERNELS else ()
    rest = spec.axes[len(lead):]
    return lead, rest[:spec.hf_in_dims], rest[spec.hf_in_dims:]


def _lora_specs(table: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
    """The adapter factors of every adaptable kernel in `table`: `<key>_lora.a` [lead, in..., r] (random) and
    `<key>_lora.b` [lead, r, out...] (zeros, so an adapted model starts exactly at its base), kept float32.
    `hf` is the PEFT module name (none for the routed experts, which PEFT holds as fused parameters)."""
    out = {}
    targets = {k for keys in LORA_TARGETS.values() for k in keys}
    for key, spec in table.items():
        if key not in targets:
            continue
        lead, ins, outs = lora_split(key, spec)
        module = "" if key in EXPERT_KERNELS else spec.hf.removesuffix(".weight")
        out[f"{key}_lora.a"] = ParamSpec(lead + ins + ("lora_rank",), module and f"{module}.lora_A.weight", "lora",
                                         init="fan_in", float32=True, hf_in_dims=len(ins))
        out[f"{key}_lora.b"] = ParamSpec(lead + ("lora_rank",) + outs, module and f"{module}.lora_B.weight", "lora",
                                         init="zeros", float32=True, hf_in_dims=1)
    return out


BLOCK.update(_lora_specs(BLOCK))
DENSE_FFN.update(_lora_specs(DENSE_FFN))
MOE_FFN.update(_lora_specs(MOE_FFN))

# the stacks of blocks (each parameter with a leading `layers` axis): name -> block parameters
STACKS = {"dense_layers": {**BLOCK, **DENSE_FFN}, "moe_layers": {**BLOCK, **MOE_FFN}}


def spec_of(path: Sequence[str]) -> ParamSpec:
    """The declaration of the parameter at `path` (a state path such as ('moe_layers', 'attn', 'q_b'))."""
    path = tuple(str(p) for p in path)
    table, key = (STACKS[path[0]], ".".join(path[1:])) if path[0] in STACKS else (TOP, ".".join(path))
    if key not in table:
        raise KeyError(f"parameter {'/'.join(path)} has no declaration in k2jax.model.params")
    return table[key]


def is_stacked(path: Sequence[str]) -> bool:
    """Whether the parameter at `path` has a leading `layers` axis."""
    return str(path[0]) in STACKS


def stack_layers(config) -> dict[str, range]:
    """The model's layer indices held by each stack (the dense blocks first)."""
    return {"dense_layers": range(config.num_dense_layers),
            "moe_layers": range(config.num_dense_layers, config.num_hidden_layers)}


def declared(state) -> Iterator[tuple[tuple[str, ...], ParamSpec]]:
    """(path, declaration) of every variable of an nnx.State, in the state's order."""
    for path, _ in nnx.to_flat_state(state):
        names = tuple(str(p) for p in path)
        yield names, spec_of(names)


def state_path(keypath) -> tuple[str, ...]:
    """A jax key path (as from tree_flatten_with_path over an nnx.State) as the names of its parameter path."""
    names = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)
    return tuple(n for n in names if n != "value")
