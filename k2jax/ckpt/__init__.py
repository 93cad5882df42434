"""Checkpoints: the Orbax layout, official HF tensor names, safetensors reading/writing, conversion."""
