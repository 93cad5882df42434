"""Inference: the `Model` handle (load, logits, generate) and the sampler over the latent cache."""
