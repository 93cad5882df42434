"""Shared fixtures: 8 simulated CPU devices, tiny random HF reference checkpoints built once per session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from k2jax.config import load_config, to_hf_config  # noqa: E402


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


GROUPED = dict(n_group=4, topk_group=2, rope_factor=8.0, rope_original_max_position_embeddings=32,
               rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=0.707, rope_mscale_all_dim=1.0)


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory, tiny_config):
    """(folder, torch model) of the tiny preset's shape (n_group = 1)."""
    folder = str(tmp_path_factory.mktemp("hf_tiny"))
    return folder, build_hf_model(tiny_config, folder)


@pytest.fixture(scope="session")
def hf_grouped(tmp_path_factory, tiny_config):
    """(folder, torch model) with group-limited routing (n_group 4, topk_group 2) and other YaRN factors."""
    folder = str(tmp_path_factory.mktemp("hf_grouped"))
    return folder, build_hf_model(tiny_config.replace(**GROUPED), folder, seed=1)


@pytest.fixture(scope="session")
def tokens_2x64(tiny_config):
    return np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, 64)).astype(np.int32)


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A K2-format tokenizer (3840 BPE ranks + 256 specials = the tiny preset's 4096) trained on pydoc's topics."""
    from pydoc_data.topics import topics

    from k2jax.bpe import train_tokenizer_file
    from k2jax.tokenizer import load_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tiktoken.model")
    train_tokenizer_file("\n".join(topics[k] for k in sorted(topics)), path, 3840)
    return load_tokenizer(path)


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
