"""Independent references built on this machine: random tiny HF transformers DeepSeek-V3 models (PyTorch, float32)
and their logits, shared by the tests and the benchmarks. Needs the test extras (torch, transformers)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from k2jax.model.config import to_hf_config


def build_hf_model(config, folder, seed=0, attention_gain: float = 1.0):
    """A random transformers DeepseekV3ForCausalLM (float32) of `config`, saved to `folder`; returns the model.

    Norm scales and router correction biases are randomised too, so parity tests exercise them.
    `attention_gain` multiplies the queries (q_b) and the keys (kv_b's key rows, kv_a's rope key) so that every
    attention score is gain² times larger: with HF's initialisation the scores have a std of ~0.03 and softmax is
    nearly uniform, so a RoPE or softmax-scale error barely moves the logits; a sharp reference shows it
    (`mean_max_attention` measures how sharp).
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
        if attention_gain != 1.0:
            nope, v, rope = config.qk_nope_head_dim, config.v_head_dim, config.qk_rope_head_dim
            for layer in model.model.layers:
                attn = layer.self_attn
                attn.q_b_proj.weight.mul_(attention_gain)
                kv_b = attn.kv_b_proj.weight.view(config.num_attention_heads, nope + v, -1)
                kv_b[:, :nope].mul_(attention_gain)  # the key rows of every head, not the values
                attn.kv_a_proj_with_mqa.weight[-rope:].mul_(attention_gain)  # the shared rope key
    model.save_pretrained(folder)
    return model


# group-limited routing and other YaRN factors than the tiny preset's (a second reference model)
GROUPED = dict(n_group=4, topk_group=2, rope_factor=8.0, rope_original_max_position_embeddings=32,
               rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=0.707, rope_mscale_all_dim=1.0)


def mean_max_attention(model, tokens) -> float:
    """The mean over layers, sequences, heads and queries of the largest attention probability (1/keys for
    uniform attention, 1 for one-hot) of a transformers model on int tokens [b, t]."""
    import torch

    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # the only implementation that returns the probabilities
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(np.asarray(tokens, np.int64)), output_attentions=True)
    finally:
        model.config._attn_implementation = previous
    return float(np.mean([a.float().numpy().max(-1).mean() for a in out.attentions]))


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


def dequant_reference(q, s):
    """W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128], written out plainly."""
    w = q.astype(np.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] *= s[bi, bj]
    return w


def write_fp8_release(src: str, out: str, seed: int = 0) -> dict:
    """Writes the HF folder `src` in the official FP8 release's layout to `out` (linear weights e4m3 with random
    128x128 block scales, norms / embedding / lm_head bf16, 3 shards and an index); returns the dequantised
    float32 tensors by name."""
    from k2jax.ckpt.safetensors import SafetensorsFolder, write_safetensors

    folder = SafetensorsFolder(src)
    rng = np.random.default_rng(seed)
    tensors, dequant = {}, {}
    for name in folder.names():
        w = np.array(folder.get(name))
        if w.ndim == 2 and name.endswith("proj.weight"):
            s = rng.uniform(0.5, 2.0, (-(-w.shape[0] // 128), -(-w.shape[1] // 128))).astype(np.float32) / 64
            q = (w / np.repeat(np.repeat(s, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]).astype(ml_dtypes.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            dequant[name] = dequant_reference(q, s)
        else:
            tensors[name] = w.astype(ml_dtypes.bfloat16) if "norm" in name or "embed" in name or "lm_head" in name else w
            dequant[name] = tensors[name].astype(np.float32)
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names, dtype=object), 3), 1):
        fname = f"model-{i}-of-3.safetensors"
        write_safetensors(os.path.join(out, fname), {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f:
        hf_cfg = json.load(f)
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    return dequant


def main(argv=None):
    """python -m k2jax.testing.reference OUT [--preset tiny] [--seed 0]: a random HF-format DeepSeek-V3 model of a
    preset's architecture (what an HF release folder holds), for trying the HF paths on a machine without one."""
    import argparse

    from k2jax.model.config import load_config

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build_hf_model(load_config(args.preset), args.out, seed=args.seed)
    print(f"wrote a random {args.preset} DeepseekV3ForCausalLM to {args.out}")


if __name__ == "__main__":
    main()
