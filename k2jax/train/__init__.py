"""Training: the jitted train step, loss, optimizers (MuonClip, AdamW), the loop and its metrics."""
