"""rcae_jax: RcAE (recursive autoencoder) anomaly detection in JAX/Flax."""

__version__ = "0.1.0"
