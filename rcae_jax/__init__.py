"""rcae_jax: RcAE (recursive autoencoder) anomaly detection in JAX/Flax.

The Python API (rcae_jax/api.py): `rcae_jax.train`, `rcae_jax.Detector`,
`rcae_jax.Result`, `rcae_jax.DetectorError`. They are imported on first
use, so that `python -m rcae_jax.main --help` and the config files do
not pay for importing JAX.
"""

__version__ = "0.1.0"

__all__ = ['Detector', 'DetectorError', 'Result', 'train']


def __getattr__(name):
  if name in __all__:
    from rcae_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
