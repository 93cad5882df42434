"""Named model presets; each module defines CONFIG (a k2jax.config.K2Config)."""
