import json

import pytest

import k2jax
from k2jax.model.config import (ConfigError, Execution, K2Config, configure, from_hf_config, load_config,
                                load_preset, to_hf_config)

# Kimi-K2-Instruct's config.json (the architecture fields), as published.
OFFICIAL = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 64, "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384,
    "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
    "tie_word_embeddings": False, "rope_theta": 50000.0, "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 163584, "eos_token_id": 163585, "num_nextn_predict_layers": 0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_param_count_kimi_k2_exact():
    total, active = k2jax.param_count(load_config("kimi_k2"))
    assert total == 1_026_408_232_448
    assert active == 32_861_500_928


def test_preset_sizes():
    total, _ = k2jax.param_count(load_config("tiny"))
    assert 1e6 <= total <= 1e7
    total, _ = k2jax.param_count(load_config("small"))
    assert 100e6 <= total <= 300e6
    tiny = load_config("configs/tiny.py")
    assert tiny.n_routed_experts >= 16 and tiny.num_experts_per_tok == 4 and tiny.n_shared_experts == 1
    assert tiny.first_k_dense_replace == 1 and tiny.uses_yarn and tiny.q_lora_rank


def test_official_config_json_equals_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL))
    official = from_hf_config(path)
    preset = load_config("kimi_k2")
    assert official == preset  # the preset is exactly the architecture (execution lives apart)
    assert official.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * __import__("math").log(32) + 1) ** 2)


def test_hf_round_trip():
    c = load_config("tiny").replace(n_group=4, topk_group=2, rope_mscale=0.707)
    assert from_hf_config(to_hf_config(c)) == c


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"n_group": 5}, "n_group"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
])
def test_hf_config_rejections_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        from_hf_config({**OFFICIAL, **change})


def test_mtp_layers_are_not_part_of_the_config():
    c = from_hf_config({**OFFICIAL, "num_nextn_predict_layers": 1})
    assert c.num_nextn_predict_layers == 0
    from k2jax.model.config import mtp_prefixes

    assert mtp_prefixes({**OFFICIAL, "num_nextn_predict_layers": 1}) == ("model.layers.61.",)
    assert mtp_prefixes(OFFICIAL) == ()


def test_override_type_checks_and_unknown_keys():
    c, run = load_preset("tiny")
    assert c.replace(num_hidden_layers="6").num_hidden_layers == 6
    assert run.replace(scan_layers="false").scan_layers is False
    with pytest.raises(ConfigError, match="unknown K2Config field 'hidden'"):
        c.replace(hidden=3)
    with pytest.raises(ConfigError, match="'num_hidden_layers': expected int"):
        c.replace(num_hidden_layers="six")
    with pytest.raises(ConfigError, match="remat_policy"):
        run.replace(remat_policy="sometimes")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    assert isinstance(c, K2Config) and isinstance(run, Execution)


def test_configure_routes_each_override_to_architecture_or_execution():
    c, run = load_preset("tiny", num_hidden_layers="3", remat_policy="full", attn_chunk="16")
    assert (c.num_hidden_layers, run.remat_policy, run.attn_chunk) == (3, "full", 16)
    assert (run.param_dtype, run.dtype) == ("float32", "float32")  # the preset's EXECUTION
    assert not hasattr(c, "remat_policy")  # the architecture has no execution field
    with pytest.raises(ConfigError, match="unknown config field 'remat'.*remat_policy"):
        configure(c, run, {"remat": "full"})
    with pytest.raises(ConfigError, match="unknown K2Config field 'moe_impl'"):
        c.replace(moe_impl="loop")  # an execution setting is not part of the architecture
