"""Files shipped with an export (`--config.mode=export`): they run without
rcae_jax, so nothing here may import it."""
