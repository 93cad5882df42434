"""A K2-shaped model of ~3M parameters for tests and the quick start (MLA, 16 experts top-4, YaRN)."""

from k2jax.model.config import Execution, K2Config

CONFIG = K2Config(
    vocab_size=4096,  # 3840 BPE ranks + K2's block of 256 special tokens
    hidden_size=128,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    q_lora_rank=64,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=4096,
    rope_theta=50000.0,
    rope_type="yarn",
    rope_factor=4.0,
    rope_original_max_position_embeddings=1024,
    rope_beta_fast=1.0,
    rope_beta_slow=1.0,
    rope_mscale=1.0,
    rope_mscale_all_dim=1.0,
    bos_token_id=3840,
    eos_token_id=3841,
    pad_token_id=4095,
)

EXECUTION = Execution(param_dtype="float32", dtype="float32")
