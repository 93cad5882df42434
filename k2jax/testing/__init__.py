"""Test and benchmark helpers: tiny HF reference models built on this machine (needs torch + transformers)."""
