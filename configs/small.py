"""A K2-shaped model of ~250M total parameters for CPU benchmarks (64 experts top-6)."""

from k2jax.model.config import Execution, K2Config

CONFIG = K2Config(
    vocab_size=32768,
    hidden_size=768,
    intermediate_size=2048,
    moe_intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=64,
    n_shared_experts=1,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    q_lora_rank=384,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    max_position_embeddings=8192,
    rope_theta=50000.0,
    rope_type="yarn",
    rope_factor=4.0,
    rope_original_max_position_embeddings=2048,
    bos_token_id=32512,
    eos_token_id=32513,
    pad_token_id=32767,
)

EXECUTION = Execution(param_dtype="float32", dtype="float32")
