"""Flax NNX building blocks of the K2 architecture."""
