"""Kimi K2's pretraining stage: the same architecture at 4,096 tokens with plain RoPE (no YaRN).

K2 was pretrained at 4K, then its context extended to 128K with YaRN (factor 32 over the original 4,096
positions; configs/kimi_k2.py, the released model). YaRN also scales the attention logits by mscale² (about
1.81 for factor 32), so the softmax scale differs between the stages: `K2Config.softmax_scale` reads it from the
rope fields. Train from scratch with this preset, then continue with kimi_k2 on long documents.
"""

from k2jax.configs.kimi_k2 import CONFIG as _LONG, EXECUTION

CONFIG = _LONG.replace(max_position_embeddings=4096, rope_type="default", rope_factor=1.0)

__all__ = ["CONFIG", "EXECUTION"]
