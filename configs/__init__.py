"""Named model presets; each module defines CONFIG (a k2jax.model.config.K2Config)."""
