"""Configuration: `K2Config`, the architecture (every field of K2's config.json, what a checkpoint stores), and
`Execution`, how a model runs (dtypes, layer scan, remat, MoE kernel, attention chunking), which is never saved
with the weights. `configure` routes key=value overrides to the one of the two that has the field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Mapping

from k2jax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_moe", "save_moe_attn")
MOE_IMPLS = ("auto", "blocks", "gmm", "ragged", "loop", "gather")
MOE_DISPATCH = ("gather", "a2a")  # expert parallelism: all-gather the group's tokens, or all-to-all each token
KERNELS = ("auto", "pallas", "interpret", "xla")  # Pallas TPU kernels: on a TPU backend, always, interpreted, never
PARAM_DTYPES = ("float32", "bfloat16")  # what parameters and activations may be held in


@dataclasses.dataclass(frozen=True)
class K2Config:
    """Architecture and numerics of a Kimi K2 / DeepSeek-V3 model (names follow HF config.json)."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 131072
    rope_theta: float = 50000.0
    # YaRN (rope_scaling); rope_factor == 1.0 with rope_type "default" disables it.
    rope_type: str = "yarn"
    rope_factor: float = 32.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 1.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584  # None (any of the three): unset in the source config.json, and in an export
    eos_token_id: int | None = 163585
    pad_token_id: int | None = None  # K2's config.json sets none
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.02

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def uses_yarn(self) -> bool:
        return self.rope_type == "yarn"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim) squared."""
        scale = self.qk_head_dim ** -0.5
        if self.uses_yarn and self.rope_mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
        return scale

    def replace(self, **changes: Any) -> "K2Config":
        """Returns a copy with fields changed (type-checked, validated)."""
        return override(self, changes)

    def __post_init__(self):
        validate(self)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model runs, apart from what it is: none of this is in config.json or saved in a checkpoint."""

    param_dtype: str = "float32"
    dtype: str = "bfloat16"  # compute dtype of matmuls (the router, norms and softmax stay float32)
    scan_layers: bool = True
    remat_policy: str = "none"
    moe_impl: str = "auto"  # gmm (Pallas, TPU) | blocks (training, prefill) | ragged | loop (decode-sized) | gather
    moe_dispatch: str = "gather"  # how tokens reach the expert shards (MOE_DISPATCH)
    moe_block_size: int = 0  # rows per block of the grouped matmul; 0 picks one from the token count
    moe_capacity_factor: float = 0.0  # >0: expert-parallel row buffers hold this x the balanced load (drops counted)
    moe_block_unroll: int = 1  # unroll of the loop over blocks; 0 unrolls fully (so cost_analysis counts every block)
    kernels: str = "auto"  # Pallas TPU kernels (KERNELS): "pallas" compiles them for a TPU target from any host
    attn_chunk: int = 0  # >0: query chunks of this length (memory ~chunk x seq) where it divides seq; 0: one matrix

    def replace(self, **changes: Any) -> "Execution":
        """Returns a copy with fields changed (type-checked, validated)."""
        return override(self, changes)

    def __post_init__(self):
        choices = {"param_dtype": PARAM_DTYPES, "dtype": PARAM_DTYPES, "remat_policy": REMAT_POLICIES,
                   "moe_impl": MOE_IMPLS, "moe_dispatch": MOE_DISPATCH, "kernels": KERNELS}
        for name, allowed in choices.items():
            _check(getattr(self, name) in allowed, name, f"expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("moe_block_size", "moe_capacity_factor", "moe_block_unroll", "attn_chunk"):
            _check(getattr(self, name) >= 0, name, f"expected >= 0, got {getattr(self, name)}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(factor) + 1 (1 when the factor does not stretch)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _check(cond: bool, field: str, message: str):
    if not cond:
        raise ConfigError(f"config field '{field}': {message}")


def validate(c: K2Config) -> None:
    """Raises ConfigError naming the first field that k2jax cannot run with."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
        _check(isinstance(getattr(c, name), int) and getattr(c, name) > 0, name,
               f"expected a positive integer, got {getattr(c, name)!r}")
    _check(c.q_lora_rank is not None and c.q_lora_rank > 0, "q_lora_rank",
           f"expected a positive integer (K2 uses a q LoRA of 1536); got {c.q_lora_rank!r}")
    _check(c.num_key_value_heads == c.num_attention_heads, "num_key_value_heads",
           f"MLA has one KV head per query head: expected {c.num_attention_heads}, got {c.num_key_value_heads}")
    _check(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {c.qk_rope_head_dim}")
    _check(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
           f"expected <= n_routed_experts={c.n_routed_experts}, got {c.num_experts_per_tok}")
    _check(c.n_shared_experts >= 0, "n_shared_experts", f"expected >= 0, got {c.n_shared_experts}")
    _check(c.n_group >= 1 and c.n_routed_experts % c.n_group == 0, "n_group",
           f"must divide n_routed_experts={c.n_routed_experts}, got {c.n_group}")
    _check(1 <= c.topk_group <= c.n_group, "topk_group", f"expected 1..n_group={c.n_group}, got {c.topk_group}")
    if c.n_group > 1:
        _check(c.n_routed_experts // c.n_group >= 2, "n_group",
               "group-limited routing scores each group by its top-2 experts: groups need >= 2 experts")
        _check(c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts // c.n_group), "num_experts_per_tok",
               "more experts per token than the kept groups hold")
    _check(c.topk_method == "noaux_tc", "topk_method", f"only 'noaux_tc' is supported, got {c.topk_method!r}")
    _check(c.scoring_func == "sigmoid", "scoring_func", f"only 'sigmoid' is supported, got {c.scoring_func!r}")
    _check(c.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {c.hidden_act!r}")
    _check(not c.attention_bias, "attention_bias", "attention biases are not supported (K2 has none)")
    _check(not c.tie_word_embeddings, "tie_word_embeddings", "K2's lm_head is untied; tied embeddings unsupported")
    _check(c.moe_layer_freq == 1, "moe_layer_freq", f"only 1 (every layer after the dense ones) is supported, got {c.moe_layer_freq}")
    _check(c.num_nextn_predict_layers == 0, "num_nextn_predict_layers",
           f"multi-token prediction (MTP) layers are not supported yet; expected 0, got {c.num_nextn_predict_layers}")
    _check(c.rope_type in ("yarn", "default"), "rope_type", f"expected 'yarn' or 'default', got {c.rope_type!r}")
    if c.uses_yarn:
        _check(c.rope_factor >= 1.0, "rope_factor", f"YaRN factor must be >= 1, got {c.rope_factor}")
        _check(c.rope_original_max_position_embeddings > 0, "rope_original_max_position_embeddings",
               "must be positive")


def override(obj, changes: Mapping[str, Any]):
    """`obj` (a K2Config, Execution or any config dataclass) with `changes` applied; values are coerced from
    strings and type-checked; unknown keys raise ConfigError naming them (with near matches)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    typed = {}
    for key, value in changes.items():
        if key not in fields:
            raise ConfigError(f"unknown {type(obj).__name__} field '{key}'{_hint(key, fields)}")
        typed[key] = _coerce(key, fields[key].type, value)
    return dataclasses.replace(obj, **typed)


def _hint(key: str, names) -> str:
    close = [n for n in names if key.lower() in n or n in key.lower()]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def parse_assignments(items, flag: str = "--set") -> dict[str, str]:
    """['a=1', 'b=x'] (repeated key=value flags) -> {'a': '1', 'b': 'x'}; a malformed item names the flag."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def configure(config: K2Config, execution: Execution | None, changes: Mapping[str, Any]) -> tuple[K2Config, Execution]:
    """Applies key=value `changes` to whichever of (config, execution) has each field; unknown keys raise."""
    execution = execution or Execution()
    arch_fields = {f.name for f in dataclasses.fields(K2Config)}
    exec_fields = {f.name for f in dataclasses.fields(Execution)}
    for key in changes:
        if key not in arch_fields and key not in exec_fields:
            raise ConfigError(f"unknown config field '{key}'{_hint(key, arch_fields | exec_fields)}")
    arch = {k: v for k, v in changes.items() if k in arch_fields}
    run = {k: v for k, v in changes.items() if k in exec_fields}
    return (override(config, arch) if arch else config), (override(execution, run) if run else execution)


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if type_name.endswith(" | None"):  # optional: "none" (or None) means the default rule
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        type_name = type_name[: -len(" | None")]
    try:
        if type_name == "bool":
            words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
            if isinstance(value, str) and value.lower() in words:
                return words[value.lower()]
            if isinstance(value, str) or not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if type_name == "str":
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{key}': expected {type_name}, got {value!r}") from None
    return value


# ---------------------------------------------------------------------- HF config.json
_HF_DIRECT = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
              "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group",
              "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha",
              "seq_aux", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "max_position_embeddings", "rms_norm_eps", "hidden_act", "attention_bias", "tie_word_embeddings",
              "num_nextn_predict_layers", "initializer_range")
SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


def from_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> K2Config:
    """Reads an HF config.json (a file, a folder holding one, or its dict) into a K2Config.

    Unsupported values raise ConfigError naming the field. Multi-token-prediction layers
    (`num_nextn_predict_layers`) are not part of the next-token model: the config drops them, as HF
    transformers does (`mtp_prefixes` names their tensors, which loaders skip with a notice).
    """
    if isinstance(path_or_dict, Mapping):
        raw, where = dict(path_or_dict), "config dict"
    else:
        from k2jax import storage

        path = os.fspath(path_or_dict)
        if storage.isdir(path):
            path = storage.join(path, "config.json")
        if not storage.isfile(path):
            raise ConfigError(f"no config.json at {path}")
        raw, where = json.loads(storage.read_text(path)), path
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: config field 'model_type': expected one of {SUPPORTED_MODEL_TYPES}, "
                          f"got {model_type!r}")
    if raw.get("rope_interleave", True) is not True:
        raise ConfigError(f"{where}: config field 'rope_interleave': only the interleaved RoPE layout of the "
                          "official checkpoints (true) is supported")
    kw: dict[str, Any] = {}
    for name in _HF_DIRECT:
        if name in raw and raw[name] is not None:
            kw[name] = raw[name]
    kw["num_nextn_predict_layers"] = 0  # MTP layers are dropped (mtp_prefixes)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # unset stays unset (K2's ids may not fit)
        v = (raw[name][0] if raw[name] else None) if isinstance(raw.get(name), list) else raw.get(name)
        if v is not None and not (isinstance(v, int) and 0 <= v < raw.get("vocab_size", v + 1)):
            raise ConfigError(f"{where}: config field '{name}': {v!r} is not an id of the vocabulary (config field "
                              f"'vocab_size': {raw.get('vocab_size')})")
        kw[name] = v
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = raw.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        kw["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in ("yarn", "default"):
        raise ConfigError(f"{where}: config field 'rope_scaling.type': expected 'yarn' or none, got {rope_type!r}")
    kw["rope_type"] = rope_type
    if rope_type == "yarn":
        if rope.get("attention_factor") is not None:
            raise ConfigError(f"{where}: config field 'rope_scaling.attention_factor' is not supported "
                              "(K2 derives it from mscale/mscale_all_dim)")
        if rope.get("truncate", True) is not True:
            raise ConfigError(f"{where}: config field 'rope_scaling.truncate': only true is supported")
        kw["rope_factor"] = float(rope["factor"])
        kw["rope_original_max_position_embeddings"] = int(rope.get("original_max_position_embeddings", 4096))
        kw["rope_beta_fast"] = float(rope.get("beta_fast") or 32)
        kw["rope_beta_slow"] = float(rope.get("beta_slow") or 1)
        kw["rope_mscale"] = float(rope.get("mscale") or 0.0)
        kw["rope_mscale_all_dim"] = float(rope.get("mscale_all_dim") or 0.0)
    else:
        kw["rope_factor"] = 1.0
    try:
        cfg = K2Config(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg.replace(**overrides) if overrides else cfg


def mtp_prefixes(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[str, ...]:
    """HF name prefixes of the multi-token-prediction layers a config.json declares (they follow the last
    decoder layer): tensors under them are dropped on load, as transformers does."""
    if isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
    else:
        from k2jax import storage

        path = os.fspath(path_or_dict)
        raw = json.loads(storage.read_text(storage.join(path, "config.json") if storage.isdir(path) else path))
    n = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers")) or 0
    layers = int(raw.get("num_hidden_layers", 0))
    return tuple(f"model.layers.{layers + i}." for i in range(int(n)))


def to_hf_config(c: K2Config, param_dtype: str = "float32") -> dict[str, Any]:
    """The HF config.json dict (model_type deepseek_v3, loadable by transformers) describing `c`."""
    d = {name: getattr(c, name) for name in _HF_DIRECT}
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", rope_theta=c.rope_theta,
             rope_interleave=True, num_mtp_layers=0, torch_dtype=param_dtype)
    d.update({n: getattr(c, n) for n in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(c, n) is not None})
    if c.uses_yarn:
        d["rope_scaling"] = dict(type="yarn", rope_type="yarn", factor=c.rope_factor,
                                 original_max_position_embeddings=c.rope_original_max_position_embeddings,
                                 beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, mscale=c.rope_mscale,
                                 mscale_all_dim=c.rope_mscale_all_dim)
    return d


# ---------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    """Names of the presets shipped in configs/ (importable as k2jax.configs.NAME)."""
    import k2jax.configs as pkg

    d = os.path.dirname(pkg.__file__)
    return sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_"))


def load_preset(spec: str | os.PathLike, **overrides: Any) -> tuple[K2Config, Execution]:
    """(architecture, execution) of a preset name ('tiny'), a preset file ('configs/tiny.py', defining CONFIG and
    optionally EXECUTION) or an HF config.json (default execution), with `overrides` routed by `configure`."""
    spec = os.fspath(spec)
    if spec.endswith(".json") or os.path.isdir(spec):
        return configure(from_hf_config(spec), None, overrides)
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            name = os.path.basename(spec)[:-3]
            if name in preset_names():
                return load_preset(name, **overrides)
            raise ConfigError(f"config file not found: {spec}")
        mod_spec = importlib.util.spec_from_file_location(f"_k2jax_preset_{abs(hash(spec))}", spec)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if spec not in preset_names():
            raise ConfigError(f"unknown preset {spec!r}; known presets: {', '.join(preset_names())}")
        module = importlib.import_module(f"k2jax.configs.{spec}")
    cfg, run = getattr(module, "CONFIG", None), getattr(module, "EXECUTION", Execution())
    if not isinstance(cfg, K2Config):
        raise ConfigError(f"{spec}: a preset file must define CONFIG = K2Config(...)")
    if not isinstance(run, Execution):
        raise ConfigError(f"{spec}: EXECUTION must be an Execution(...), got {type(run).__name__}")
    return configure(cfg, run, overrides)


def load_config(spec: str | os.PathLike, **overrides: Any) -> K2Config:
    """The architecture of a preset or HF config.json (see `load_preset`); overrides are architecture fields."""
    config, _ = load_preset(spec)
    return config.replace(**overrides) if overrides else config
