"""Independent references built on this machine: random tiny HF transformers DeepSeek-V3 models (PyTorch, float32)
and their logits, shared by the tests and the benchmarks. Needs the test extras (torch, transformers)."""

from __future__ import annotations

import numpy as np

from k2jax.model.config import to_hf_config


def build_hf_model(config, folder, seed=0):
    """A random transformers DeepseekV3ForCausalLM (float32) of `config`, saved to `folder`; returns the model.

    Norm scales and router correction biases are randomised too, so parity tests exercise them.
    """
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**to_hf_config(config))).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.05 * torch.randn_like(mod.e_score_correction_bias))
    model.save_pretrained(folder)
    return model


# group-limited routing and other YaRN factors than the tiny preset's (a second reference model)
GROUPED = dict(n_group=4, topk_group=2, rope_factor=8.0, rope_original_max_position_embeddings=32,
               rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=0.707, rope_mscale_all_dim=1.0)


def hf_logits(model, tokens):
    """float32 logits [b, t, vocab] of a transformers model for int tokens [b, t]."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def load_official_names(torch_model, tensors):
    """Loads {official tensor name: tensor} into transformers' DeepseekV3 (which fuses each layer's experts)."""
    import re

    import torch

    params = dict(torch_model.named_parameters())
    buffers = dict(torch_model.named_buffers())
    fused = {}
    with torch.no_grad():
        for name, value in tensors.items():
            m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
            if m:
                fused.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
            elif name in params:
                params[name].copy_(value)
            else:
                buffers[name].copy_(value)
        for prefix, parts in fused.items():
            gate_up, down = params[prefix + ".gate_up_proj"], params[prefix + ".down_proj"]
            half = gate_up.shape[1] // 2
            for (e, kind), value in parts.items():
                if kind == "down":
                    down[e].copy_(value)
                else:
                    gate_up[e, :half].copy_(value) if kind == "gate" else gate_up[e, half:].copy_(value)
